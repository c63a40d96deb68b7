//! Builds a Linux microVM from its configuration: guest memory, the kernel and initramfs,
//! the virtio devices and their kernel command line, the boot tables and MP table, and the
//! serial console; [`vmm::run`](crate::vmm::run) starts what it builds.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use husk_vmm_api::net::{MacAddr, NetArg, NetBackendArg};
use linux_loader::{
    cmdline::Cmdline,
    loader::{elf::Elf, load_cmdline, KernelLoader},
};
use vm_memory::{Bytes, GuestAddress};

use crate::{
    api_server,
    arch::{self, layout, mptable},
    config::VmConfig,
    device_manager::{DeviceManager, NamedDevices},
    devices::{
        legacy::{CappedWriter, SERIAL_LOG_MAX},
        virtio::{
            block::{Block, BlockError},
            fs::{Fs, FsError},
            net::{Net, NetBackend, NetError, Tap, TapError, Unconnected},
            vsock::{Vsock, VsockError, MAX_HOST_SOCKETS},
        },
    },
    jail::{Jail, Limits},
    signals::StopSignals,
    vmm::{Machine, Restore, VmmError},
    vstate::{
        snapshot::{Snapshot, SnapshotError},
        vcpu::Entry,
        vm::Vm,
    },
};

/// Errors building the VM from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Opening the kernel image.
    #[error("opening the kernel {0}")]
    KernelOpen(PathBuf, #[source] std::io::Error),
    /// Loading the kernel image into guest memory.
    #[error("loading the kernel {0} (an ELF vmlinux is needed)")]
    KernelLoad(PathBuf, #[source] linux_loader::loader::Error),
    /// Reading the initramfs.
    #[error("reading the initramfs {0}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    /// Building the kernel command line.
    #[error("the kernel command line")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the kernel command line into guest memory.
    #[error("writing the kernel command line")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error(transparent)]
    Boot(#[from] arch::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Writing to guest memory.
    #[error("guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// Reading a writable drive's size.
    #[error("the drive {0}")]
    DriveSize(String, #[source] std::io::Error),
    /// Creating the serial console's log file.
    #[error("opening the serial log {0}")]
    SerialLog(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Neither a kernel to boot nor a template to restore.
    #[error("no --kernel to boot and no --restore template")]
    NoKernel,
    /// A template that cannot be restored as asked.
    #[error("the template {0}: {1}")]
    Template(PathBuf, String),
}

/// The default kernel command line: serial console, reboot via the i8042, no probing of
/// hardware that is not there.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable quiet";

/// Builds the VM `cfg` describes, ready to start; with it the sockets it made, to remove
/// when the VM ends. With a `jail`, its sockets must be inside the jail's root, and the
/// vsock device knows its socket by its path inside.
pub(crate) fn build(
    cfg: &VmConfig,
    started: Instant,
    stop_signals: StopSignals,
    jail: Option<&Jail>,
) -> Result<(Machine, Vec<PathBuf>), VmmError> {
    if let Some(j) = jail {
        for (what, p) in [
            ("control socket", &cfg.api_sock),
            ("vsock socket", &cfg.vsock_uds),
        ] {
            if let Some(p) = p {
                j.inside(what, p).map_err(BuildError::from)?;
            }
        }
    }
    let mem_size = (cfg.mem_mib as u64) << 20;
    let (vm, devices, mut sockets, entry, restore) = match (&cfg.restore, &cfg.kernel) {
        (Some(template), _) => {
            let (vm, snap) = open_template(template, cfg).map_err(VmmError::restore)?;
            let (devices, sockets) = create_devices(cfg, jail)?;
            let devices = DeviceManager::attach_restored(&vm, devices, &snap.devices)
                .map_err(VmmError::restore)?;
            let restore = Restore {
                vcpus: snap.vcpus,
                vm: snap.vm,
            };
            // The entry is never taken: the vCPUs' registers come from the template.
            (vm, devices, sockets, 0, Some(restore))
        }
        (None, Some(kernel)) => {
            let vm = Vm::new(cfg.mem_mib as u64)?;
            let entry = load_kernel(&vm, kernel)?;
            let initrd = load_initramfs(&vm, cfg, mem_size)?;
            let (devices, sockets) = create_devices(cfg, jail)?;
            let devices = DeviceManager::attach(&vm, devices)?;
            let cmdline_len = load_cmdline_for(&vm, &devices.cmdline, &cfg.cmdline_extra)?;
            arch::write_boot_tables(&vm.mem).map_err(BuildError::from)?;
            arch::write_boot_params(&vm.mem, mem_size, cmdline_len, initrd)
                .map_err(BuildError::from)?;
            mptable::write(&vm.mem, cfg.vcpus, layout::MPTABLE).map_err(BuildError::from)?;
            (vm, devices, sockets, entry, None)
        }
        (None, None) => return Err(BuildError::NoKernel.into()),
    };

    let serial: Box<dyn Write + Send> = match &cfg.serial_log {
        Some(p) => Box::new(CappedWriter::new(
            File::create(p).map_err(|e| BuildError::SerialLog(p.clone(), e))?,
            SERIAL_LOG_MAX,
        )),
        None => Box::new(std::io::stdout()),
    };
    let guest_start = vm.host_range().0;
    // Opened now: the vCPU thread that reports at ready may not open files.
    let smaps = SmapsFiles::open();
    let on_ready = Box::new(move || {
        if let Some(kib) = smaps.as_ref().and_then(|f| overhead_kib(f, guest_start)) {
            crate::log_line!(
                "vmm memory overhead {:.1} MiB (PSS minus guest memory)",
                kib as f64 / 1024.0
            );
        }
    });
    let api = match &cfg.api_sock {
        Some(p) => {
            let l = api_server::bind(p)?;
            sockets.push(p.clone());
            Some(l)
        }
        None => None,
    };
    let machine = Machine {
        vm,
        devices,
        vcpus: cfg.vcpus,
        entry: Entry::Long(entry),
        serial,
        on_ready: Some(on_ready),
        api,
        stop_signals: Some(stop_signals),
        started,
        restore,
    };
    Ok((machine, sockets))
}

/// Loads the ELF kernel above 1 MiB; returns its entry point.
fn load_kernel(vm: &Vm, path: &Path) -> Result<u64, BuildError> {
    let mut kernel = File::open(path).map_err(|e| BuildError::KernelOpen(path.to_path_buf(), e))?;
    let loaded = Elf::load(
        &vm.mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM)),
    )
    .map_err(|e| BuildError::KernelLoad(path.to_path_buf(), e))?;
    Ok(loaded.kernel_load.0)
}

/// The VM of the template at `path`, its memory mapped privately from the file (copied, for
/// a VM with a vhost-user backend), and the template's state; refused when its vCPUs or memory are not those `cfg` asks for.
fn open_template(path: &Path, cfg: &VmConfig) -> Result<(Vm, Snapshot), BuildError> {
    let bad = |e: SnapshotError| BuildError::Template(path.to_path_buf(), e.to_string());
    let open = || File::open(path).map_err(|e| bad(SnapshotError::Io("opening it", e)));
    let snap = Snapshot::read(&open()?).map_err(bad)?;
    let mem = (cfg.mem_mib as u64) << 20;
    if snap.vcpus.len() != usize::from(cfg.vcpus) || snap.memory_bytes != mem {
        return Err(BuildError::Template(
            path.to_path_buf(),
            format!(
                "it holds a VM of {} vCPUs and {} MiB, not {} and {} MiB",
                snap.vcpus.len(),
                snap.memory_bytes >> 20,
                cfg.vcpus,
                cfg.mem_mib
            ),
        ));
    }
    let vm = Vm::from_memory_file_part(open()?, snap.memory_bytes)
        .map_err(|e| BuildError::Template(path.to_path_buf(), e.to_string()))?;
    Ok((vm, snap))
}

/// Loads the initramfs, if there is one, as high as it fits; returns where and how big.
fn load_initramfs(
    vm: &Vm,
    cfg: &VmConfig,
    mem_size: u64,
) -> Result<Option<(GuestAddress, u64)>, BuildError> {
    let Some(p) = &cfg.initramfs else {
        return Ok(None);
    };
    let bytes = std::fs::read(p).map_err(|e| BuildError::Initramfs(p.clone(), e))?;
    let addr = arch::initrd_addr(mem_size, bytes.len() as u64)?;
    vm.mem.write_slice(&bytes, addr)?;
    Ok(Some((addr, bytes.len() as u64)))
}

/// The limits a jailed VMM of `cfg` runs under: open files for its own (a few dozen) and
/// every host socket vsock may hold; file size for the largest writable drive (given now,
/// or later to an empty slot: `--max-drive-bytes`), a snapshot (guest memory and its
/// state), and the serial log with room to spare.
pub(crate) fn jail_limits(cfg: &VmConfig) -> Result<Limits, BuildError> {
    let snapshot = ((cfg.mem_mib as u64) << 20) + (16 << 20);
    let mut file_size = (SERIAL_LOG_MAX + (1 << 20))
        .max(cfg.max_drive_bytes)
        .max(snapshot);
    for d in cfg.drives.iter().filter(|d| !d.read_only) {
        if let Some(p) = &d.path {
            let len = std::fs::metadata(p)
                .map_err(|e| BuildError::DriveSize(p.display().to_string(), e))?
                .len();
            file_size = file_size.max(len);
        }
    }
    Ok(Limits {
        open_files: MAX_HOST_SOCKETS as u64 + 128,
        file_size,
    })
}

/// The virtio devices of `cfg`: block drives first (so they are vda, vdb, ... in order),
/// then vsock, then the network interface; with the sockets they listen on.
fn create_devices(
    cfg: &VmConfig,
    jail: Option<&Jail>,
) -> Result<(NamedDevices, Vec<PathBuf>), BuildError> {
    let mut devices: NamedDevices = Vec::new();
    for d in &cfg.drives {
        let block = if d.layered {
            Block::layered(&d.id)
        } else {
            Block::new(&d.id, d.path.as_deref(), d.read_only)?
        };
        devices.push((d.id.clone(), Box::new(block)));
    }
    let mut sockets = Vec::new();
    if let Some(uds) = &cfg.vsock_uds {
        let mut vsock = Vsock::new(cfg.guest_cid, uds)?;
        if let Some(j) = jail {
            vsock.host_ports_at(j.inside("vsock socket", uds)?);
        }
        devices.push(("vsock".into(), Box::new(vsock)));
        sockets.push(uds.clone());
    }
    if let Some(n) = &cfg.net {
        devices.push((NET_ID.into(), Box::new(create_net(n)?)));
    }
    for f in &cfg.fs {
        devices.push((
            format!("fs-{}", f.tag),
            Box::new(Fs::connect(&f.tag, &f.socket)?),
        ));
    }
    Ok((devices, sockets))
}

/// The id of the VM's network interface.
pub const NET_ID: &str = "net0";

/// The network interface `n`: its tap, inherited or attached to by name, and its MAC (a
/// random locally administered one if none was given).
fn create_net(n: &NetArg) -> Result<Net, BuildError> {
    let backend: Box<dyn NetBackend> =
        match &n.backend {
            NetBackendArg::Fd(fd) => {
                // SAFETY: the fd was handed to this process to own (the contract of
                // `--net fd=N`); nothing else here opens or closes it.
                let tap = unsafe { Tap::from_inherited_fd(*fd) };
                Box::new(tap.map_err(NetError::from)?)
            }
            NetBackendArg::Tap(name) => Box::new(Tap::open_named(name).map_err(NetError::from)?),
            NetBackendArg::None => Box::new(Unconnected::new().map_err(|e| {
                NetError::from(TapError::Setup("an unconnected NIC's socket pair", e))
            })?),
        };
    let mac = n.mac.unwrap_or_else(|| MacAddr::local_from(random_bytes()));
    Ok(Net::new(NET_ID, backend, mac.0, n.mtu())?)
}

/// Six bytes from the kernel's random pool (the clock's if it has none to give).
fn random_bytes() -> [u8; 6] {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b
}

/// Writes the kernel command line: [`BASE_CMDLINE`], the devices' arguments, then the
/// configuration's extra ones; returns its length.
fn load_cmdline_for(vm: &Vm, devices: &[String], extra: &str) -> Result<usize, BuildError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX)?;
    cmdline.insert_str(BASE_CMDLINE)?;
    for arg in devices {
        cmdline.insert_str(arg)?;
    }
    if !extra.is_empty() {
        cmdline.insert_str(extra)?;
    }
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    load_cmdline(&vm.mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(BuildError::CmdlineLoad)?;
    Ok(len)
}

/// `/proc/self/smaps_rollup` and `/proc/self/smaps`, kept open: each read from offset 0
/// gives their content at that moment.
#[derive(Debug)]
pub struct SmapsFiles {
    rollup: File,
    smaps: File,
}

impl SmapsFiles {
    pub fn open() -> Option<Self> {
        Some(SmapsFiles {
            rollup: File::open("/proc/self/smaps_rollup").ok()?,
            smaps: File::open("/proc/self/smaps").ok()?,
        })
    }
}

/// The whole of `f`, read from its start (pread: no seek, no reopening).
fn read_from_start(f: &File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).ok()?;
        if n == 0 {
            return String::from_utf8(out).ok();
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The VMM's own memory: its proportional set size minus what the guest touched, in KiB.
pub fn overhead_kib(files: &SmapsFiles, guest_start: u64) -> Option<u64> {
    let rollup = read_from_start(&files.rollup)?;
    let pss = field_kib(&rollup, "Pss:")?;
    let smaps = read_from_start(&files.smaps)?;
    let prefix = format!("{guest_start:x}-");
    let mut guest = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if line.contains('-') && line.split_whitespace().count() >= 5 && !line.ends_with("kB") {
            inside = line.starts_with(&prefix);
        } else if inside && line.starts_with("Pss:") {
            guest = field_kib(line, "Pss:").unwrap_or(0);
        }
    }
    Some(pss.saturating_sub(guest))
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_measurable() {
        let files = SmapsFiles::open().unwrap();
        assert!(overhead_kib(&files, 0).is_some());
        // Read again from the start: the same file answers again.
        assert!(overhead_kib(&files, 0).is_some());
    }
}
