//! Builds a microVM from its configuration and runs it until the guest ends.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixListener,
    },
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuExit;
use linux_loader::{
    cmdline::Cmdline,
    loader::{elf::Elf, load_cmdline, KernelLoader},
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::EventFd,
};

use husk_vmm_api::{Answer, DeviceStatus, Request, VcpuRegs, VcpuStatus, VmStatus};

use crate::{
    arch::{self, layout, mptable},
    config::VmConfig,
    devices::{
        legacy::{CappedWriter, GuestExit, LegacyBus, SERIAL_LOG_MAX},
        virtio::{block::Block, mmio::MmioTransport, vsock::Vsock, IrqLine, VirtioDevice},
    },
    vstate::{vcpu, vm::Vm},
};

/// Why the VMM could not build or run the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("installing the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    #[error("opening the kernel {0}")]
    KernelOpen(PathBuf, #[source] std::io::Error),
    #[error("loading the kernel {0} (an ELF vmlinux is needed)")]
    KernelLoad(PathBuf, #[source] linux_loader::loader::Error),
    #[error("reading the initramfs {0}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    #[error("the kernel command line")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing the kernel command line")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error(transparent)]
    Boot(#[from] arch::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("opening the serial log {0}")]
    SerialLog(PathBuf, #[source] std::io::Error),
    #[error("an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("the control socket {0}")]
    Api(PathBuf, #[source] std::io::Error),
    #[error("the device event loop")]
    Epoll(#[source] std::io::Error),
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    #[error("vCPU {0} failed: {1}")]
    VcpuRun(u8, String),
    #[error("the test guest did not end within {0:?}")]
    Timeout(Duration),
    #[error("the test guest's code ({0} bytes) would overlap the boot stack and page tables")]
    RawCodeTooBig(usize),
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest rebooted or powered off (its normal end).
    GuestExit,
    /// The guest kernel panicked.
    GuestPanic,
    /// Stopped through the control API or by SIGTERM, SIGINT or SIGHUP.
    Stopped,
    /// A triple fault or other guest shutdown.
    GuestCrash,
}

impl Outcome {
    /// The VMM's exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestExit | Outcome::Stopped => 0,
            Outcome::GuestPanic => 2,
            Outcome::GuestCrash => 3,
        }
    }
}

enum Event {
    Guest(GuestExit),
    Crash,
    Stop,
    VcpuFailed(u8, String),
}

type Transports = Arc<Vec<(String, Arc<Mutex<MmioTransport>>)>>;

/// What one vCPU has been doing, for the control API's status: a guest that never gets
/// ready shows whether it still exits to the VMM (and where) or sits inside KVM.
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: AtomicU64,
    io: AtomicU64,
    mmio: AtomicU64,
    /// The last port or MMIO address, with its kind in the top byte (1 port, 2 MMIO).
    last: AtomicU64,
    /// The vCPU thread, to kick out of KVM_RUN with SIGRTMIN (0 until it runs).
    thread: AtomicU64,
    /// Set by a status request: the vCPU thread samples its registers at the next exit.
    want_regs: std::sync::atomic::AtomicBool,
    /// The sampled instruction pointer and CR0/CR3/CR4, valid after a sample.
    rip: AtomicU64,
    cr: [AtomicU64; 3],
    /// The sampled KVM multiprocessing state (runnable, halted, ...), the guest's TSC and
    /// its LAPIC's TSC deadline (0: none armed): a halted vCPU whose deadline is long past
    /// is waiting for a timer interrupt that never came.
    mp_state: AtomicU64,
    tsc: AtomicU64,
    tsc_deadline: AtomicU64,
    samples: AtomicU64,
}

impl VcpuStats {
    fn record(&self, kind: u64, addr: u64) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        match kind {
            1 => self.io.fetch_add(1, Ordering::Relaxed),
            2 => self.mmio.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if kind != 0 {
            self.last
                .store(kind << 56 | (addr & ((1 << 56) - 1)), Ordering::Relaxed);
        }
    }

    /// Samples the registers on the vCPU thread if a status request asked for it.
    fn maybe_sample(&self, fd: &kvm_ioctls::VcpuFd) {
        if !self.want_regs.swap(false, Ordering::AcqRel) {
            return;
        }
        if let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) {
            self.rip.store(r.rip, Ordering::Relaxed);
            for (slot, v) in self.cr.iter().zip([s.cr0, s.cr3, s.cr4]) {
                slot.store(v, Ordering::Relaxed);
            }
            let mp = fd.get_mp_state().map_or(u64::MAX, |m| m.mp_state.into());
            self.mp_state.store(mp, Ordering::Relaxed);
            let mut msrs = Msrs::from_entries(
                &[vcpu::MSR_IA32_TSC, vcpu::MSR_IA32_TSC_DEADLINE].map(|index| kvm_msr_entry {
                    index,
                    ..Default::default()
                }),
            )
            .expect("two MSRs fit");
            if matches!(fd.get_msrs(&mut msrs), Ok(2)) {
                let e = msrs.as_slice();
                self.tsc.store(e[0].data, Ordering::Relaxed);
                self.tsc_deadline.store(e[1].data, Ordering::Relaxed);
            }
            self.samples.fetch_add(1, Ordering::Release);
        }
    }

    /// Asks the vCPU thread for a register sample and kicks it out of KVM_RUN; waits up to
    /// `wait` for the sample.
    fn sample(&self, wait: Duration) -> bool {
        let thread = self.thread.load(Ordering::Acquire);
        if thread == 0 {
            return false;
        }
        let before = self.samples.load(Ordering::Acquire);
        self.want_regs.store(true, Ordering::Release);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            // SAFETY: the thread id is that of a vCPU thread, which lives as long as the VMM;
            // SIGRTMIN has a no-op handler, so the signal only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, libc::SIGRTMIN()) };
            thread::sleep(Duration::from_millis(10));
            if self.samples.load(Ordering::Acquire) != before {
                return true;
            }
        }
        self.want_regs.store(false, Ordering::Release);
        false
    }

    fn status(&self) -> VcpuStatus {
        let sampled = self.sample(Duration::from_millis(300));
        let regs = sampled.then(|| {
            let [cr0, cr3, cr4] = [0, 1, 2].map(|i| self.cr[i].load(Ordering::Relaxed));
            let mp_state = match self.mp_state.load(Ordering::Relaxed) {
                0 => "runnable".to_string(),
                1 => "uninitialized".to_string(),
                2 => "init-received".to_string(),
                3 => "halted".to_string(),
                4 => "sipi-received".to_string(),
                n => format!("unknown ({n})"),
            };
            let (tsc, deadline) = (
                self.tsc.load(Ordering::Relaxed),
                self.tsc_deadline.load(Ordering::Relaxed),
            );
            VcpuRegs {
                rip: format!("{:#x}", self.rip.load(Ordering::Relaxed)),
                cr0: format!("{cr0:#x}"),
                cr3: format!("{cr3:#x}"),
                cr4: format!("{cr4:#x}"),
                mp_state,
                tsc,
                tsc_deadline_in: (deadline != 0).then(|| {
                    let d = deadline as i128 - tsc as i128;
                    d.clamp(i64::MIN as i128, i64::MAX as i128) as i64
                }),
            }
        });
        let last = self.last.load(Ordering::Relaxed);
        let addr = last & ((1 << 56) - 1);
        let last_io = match last >> 56 {
            1 => format!("port {addr:#x}"),
            2 => format!("mmio {addr:#x}"),
            _ => "none".into(),
        };
        VcpuStatus {
            exits: self.exits.load(Ordering::Relaxed),
            io_exits: self.io.load(Ordering::Relaxed),
            mmio_exits: self.mmio.load(Ordering::Relaxed),
            last_io,
            regs,
        }
    }
}

/// The default kernel command line: serial console, reboot via the i8042, no probing of
/// hardware that is not there.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable quiet";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VMM's own memory: its proportional set size minus what the guest touched, in KiB.
pub fn overhead_kib(guest_start: u64) -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let pss = field_kib(&rollup, "Pss:")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
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

/// Builds the VM described by `cfg` and runs it to its end.
/// A no-op handler for SIGRTMIN: the signal only kicks a vCPU thread out of KVM_RUN.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn register_kick_handler() -> Result<(), VmmError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Signal(std::io::Error::from_raw_os_error(e.errno())))
}

/// SIGTERM, SIGINT and SIGHUP stop the VM like the control API's `stop` (sockets removed,
/// exit 0): blocked here, before any thread exists, so every thread inherits the mask and
/// only [`spawn_signal_thread`] takes them.
fn block_stop_signals() -> Result<libc::sigset_t, VmmError> {
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; the signal numbers are valid constants.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(VmmError::Signal(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(set)
}

/// Waits for a stop signal and ends the VM with [`Event::Stop`].
fn spawn_signal_thread(set: libc::sigset_t, event_tx: mpsc::Sender<Event>) -> Result<(), VmmError> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` and `sig` are live locals; sigwait only reads/writes them.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                eprintln!("husk-vmm: signal {sig}: stopping the VM");
                let _ = event_tx.send(Event::Stop);
            }
        })
        .map_err(VmmError::Thread)?;
    Ok(())
}

pub fn run(cfg: &VmConfig) -> Result<Outcome, VmmError> {
    let started = Instant::now();
    let stop_signals = block_stop_signals()?;
    register_kick_handler()?;
    let vm = Vm::new(cfg.mem_mib as u64)?;
    let mem_size = (cfg.mem_mib as u64) << 20;

    let mut kernel =
        File::open(&cfg.kernel).map_err(|e| VmmError::KernelOpen(cfg.kernel.clone(), e))?;
    let loaded = Elf::load(
        &vm.mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM)),
    )
    .map_err(|e| VmmError::KernelLoad(cfg.kernel.clone(), e))?;
    let entry = loaded.kernel_load.0;

    let initrd = match &cfg.initramfs {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| VmmError::Initramfs(p.clone(), e))?;
            let addr = arch::initrd_addr(mem_size, bytes.len() as u64)?;
            vm.mem.write_slice(&bytes, addr)?;
            Some((addr, bytes.len() as u64))
        }
        None => None,
    };

    // Devices: block drives first (so they are vda, vdb, ... in order), then vsock.
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for d in &cfg.drives {
        devices.push((
            d.id.clone(),
            Box::new(Block::new(&d.id, d.path.as_deref(), d.read_only)?),
        ));
    }
    let mut sockets: Vec<PathBuf> = Vec::new();
    if let Some(uds) = &cfg.vsock_uds {
        devices.push(("vsock".into(), Box::new(Vsock::new(cfg.guest_cid, uds)?)));
        sockets.push(uds.clone());
    }

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX)?;
    cmdline.insert_str(BASE_CMDLINE)?;
    let attached = attach_devices(&vm, devices)?;
    for arg in &attached.cmdline {
        cmdline.insert_str(arg)?;
    }
    let (transports, backend_fds) = (attached.transports, attached.backend_fds);
    if !cfg.cmdline_extra.is_empty() {
        cmdline.insert_str(&cfg.cmdline_extra)?;
    }
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    load_cmdline(&vm.mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(VmmError::CmdlineLoad)?;
    arch::write_boot_tables(&vm.mem)?;
    arch::write_boot_params(&vm.mem, mem_size, cmdline_len, initrd)?;
    mptable::write(&vm.mem, cfg.vcpus, layout::MPTABLE)?;

    // Serial console and the rest of the port-I/O bus.
    let serial_out: Box<dyn Write + Send> = match &cfg.serial_log {
        Some(p) => Box::new(CappedWriter::new(
            File::create(p).map_err(|e| VmmError::SerialLog(p.clone(), e))?,
            SERIAL_LOG_MAX,
        )),
        None => Box::new(std::io::stdout()),
    };
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)?;
    let (exit_tx, exit_rx) = mpsc::channel::<GuestExit>();
    let (event_tx, event_rx) = mpsc::channel::<Event>();
    spawn_exit_forwarder(exit_rx, event_tx.clone())?;
    spawn_signal_thread(stop_signals, event_tx.clone())?;
    let guest_start = vm.host_range().0;
    let mut legacy = LegacyBus::new(serial_evt, serial_out, exit_tx, started);
    legacy.on_ready(Box::new(move || {
        if let Some(kib) = overhead_kib(guest_start) {
            println!(
                "vmm memory overhead {:.1} MiB (PSS minus guest memory)",
                kib as f64 / 1024.0
            );
        }
    }));
    let legacy = Arc::new(Mutex::new(legacy));
    let transports: Transports = Arc::new(transports);

    // Control socket.
    let api = match &cfg.api_sock {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|e| VmmError::Api(p.clone(), e))?;
            sockets.push(p.clone());
            Some(l)
        }
        None => None,
    };
    let stats: Arc<Vec<VcpuStats>> =
        Arc::new((0..cfg.vcpus).map(|_| VcpuStats::default()).collect());
    spawn_io_thread(
        transports.clone(),
        backend_fds,
        api,
        legacy.clone(),
        event_tx.clone(),
        stats.clone(),
    )?;

    // vCPUs.
    for id in 0..cfg.vcpus {
        let fd = vcpu::create(&vm.kvm, &vm.fd, id, cfg.vcpus, (id == 0).then_some(entry))?;
        let legacy = legacy.clone();
        let transports = transports.clone();
        let event_tx = event_tx.clone();
        let stats = stats.clone();
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let stats = &stats[id as usize];
                run_vcpu(id, fd, legacy, transports, event_tx, started, stats)
            })
            .map_err(VmmError::Thread)?;
    }

    let outcome = outcome_of(event_rx.recv().ok(), &legacy);
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    println!(
        "vm ended after {} ms: {:?}",
        started.elapsed().as_millis(),
        outcome
    );
    let _ = std::io::stdout().flush();
    outcome
}

/// How a VM ended, from the first event that ends it (`None`: every sender is gone).
/// A reset after the guest printed "Kernel panic" is a panic, however much it printed after.
fn outcome_of(event: Option<Event>, legacy: &Mutex<LegacyBus>) -> Result<Outcome, VmmError> {
    match event {
        Some(Event::Guest(GuestExit::Reset)) if lock(legacy).saw_panic() => Ok(Outcome::GuestPanic),
        Some(Event::Guest(GuestExit::Reset)) => Ok(Outcome::GuestExit),
        Some(Event::Crash) | None => Ok(Outcome::GuestCrash),
        Some(Event::Stop) => Ok(Outcome::Stopped),
        Some(Event::VcpuFailed(id, e)) => Err(VmmError::VcpuRun(id, e)),
    }
}

/// The virtio-mmio devices of a VM, wired up.
struct Attached {
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Backend fds to poll, with the index of their device.
    backend_fds: Vec<(RawFd, usize)>,
    /// The `virtio_mmio.device=` kernel arguments that announce them.
    cmdline: Vec<String>,
}

/// Puts each device behind a virtio-mmio window: device `i` at
/// `layout::MMIO_BASE + i * layout::MMIO_SIZE`, its interrupt on GSI
/// `layout::MMIO_IRQ_BASE + i`.
fn attach_devices(
    vm: &Vm,
    devices: Vec<(String, Box<dyn VirtioDevice>)>,
) -> Result<Attached, VmmError> {
    let mut a = Attached {
        transports: Vec::new(),
        backend_fds: Vec::new(),
        cmdline: Vec::new(),
    };
    for (i, (id, dev)) in devices.into_iter().enumerate() {
        let base = layout::MMIO_BASE + i as u64 * layout::MMIO_SIZE;
        let gsi = layout::MMIO_IRQ_BASE + i as u32;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&evt, gsi)?;
        a.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        if let Some(fd) = dev.backend_fd() {
            a.backend_fds.push((fd, i));
        }
        let t = MmioTransport::new(dev, vm.mem.clone(), IrqLine::new(evt));
        a.transports.push((id, Arc::new(Mutex::new(t))));
    }
    Ok(a)
}

/// Forwards the legacy devices' guest exits to the VMM's event channel.
fn spawn_exit_forwarder(
    exit_rx: mpsc::Receiver<GuestExit>,
    event_tx: mpsc::Sender<Event>,
) -> Result<(), VmmError> {
    thread::Builder::new()
        .name("exit".into())
        .spawn(move || {
            for e in exit_rx {
                let _ = event_tx.send(Event::Guest(e));
            }
        })
        .map_err(VmmError::Thread)?;
    Ok(())
}

/// The CPU mode a tiny test guest starts in (see [`run_raw_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RawMode {
    /// Flat 16-bit real mode (CS base 0, no paging).
    #[default]
    Real,
    /// 64-bit long mode as the Linux boot protocol enters it (the boot GDT, RSP at
    /// `layout::BOOT_STACK`), with identity-mapped 2 MiB pages for the first GiB and for
    /// 3-4 GiB, where the virtio-mmio windows are.
    Long,
}

/// A tiny test guest: its code, the mode it starts in and its virtio devices.
#[derive(Default)]
pub struct RawGuest<'a> {
    /// Loaded at guest address 0x1000, where the guest starts (in [`RawMode::Long`] at most
    /// 24 KiB: the boot stack and page tables follow).
    pub code: &'a [u8],
    pub mode: RawMode,
    /// Attached as [`run`] attaches its devices: device `i` at
    /// `layout::MMIO_BASE + i * layout::MMIO_SIZE`.
    pub devices: Vec<(String, Box<dyn VirtioDevice>)>,
    /// How long the guest may run before the run fails (default 60 s).
    pub timeout: Option<Duration>,
}

impl std::fmt::Debug for RawGuest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawGuest")
            .field("code_len", &self.code.len())
            .field("mode", &self.mode)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// The page directory for 3-4 GiB in [`RawMode::Long`] (after the boot page tables).
const RAW_HIGH_PD: u64 = layout::PD + 0x1000;

/// Runs flat 16-bit `code` loaded at 0x1000 on one vCPU with the legacy devices, until the
/// guest resets or crashes: the smallest guest that exercises the vCPU loop, for tests on
/// hosts whose KVM cannot boot Linux. The serial output goes to `serial`.
pub fn run_raw(
    code: &[u8],
    serial: Box<dyn Write + Send>,
) -> Result<(Outcome, Option<Duration>), VmmError> {
    run_raw_with(
        RawGuest {
            code,
            ..Default::default()
        },
        serial,
    )
}

/// Runs a tiny guest on one vCPU through the VMM's own vCPU loop, with the legacy devices
/// and `guest.devices` behind virtio-mmio (port I/O and MMIO exits both reach real
/// devices), until it resets or crashes. Returns how it ended (a reset after "Kernel panic"
/// on the serial port is [`Outcome::GuestPanic`], as in [`run`]) and when it wrote the boot
/// timer. Backend events of the devices are served as in [`run`]; there is no control API.
pub fn run_raw_with(
    guest: RawGuest<'_>,
    serial: Box<dyn Write + Send>,
) -> Result<(Outcome, Option<Duration>), VmmError> {
    let started = Instant::now();
    register_kick_handler()?;
    let vm = Vm::new(16)?;
    let mode = guest.mode;
    if mode == RawMode::Long && guest.code.len() > 0x6000 {
        return Err(VmmError::RawCodeTooBig(guest.code.len()));
    }
    vm.mem.write_slice(guest.code, GuestAddress(0x1000))?;
    if mode == RawMode::Long {
        arch::write_boot_tables(&vm.mem)?;
        vm.mem
            .write_obj(RAW_HIGH_PD | 0x03, GuestAddress(layout::PDPT + 3 * 8))?;
        for i in 0..512u64 {
            let page = (3 << 30) + (i << 21);
            // Present, writable, 2 MiB page, cache disabled (device memory).
            vm.mem
                .write_obj(page | 0x83 | 0x10, GuestAddress(RAW_HIGH_PD + i * 8))?;
        }
    }
    let attached = attach_devices(&vm, guest.devices)?;
    let transports: Transports = Arc::new(attached.transports);
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)?;
    let (exit_tx, exit_rx) = mpsc::channel::<GuestExit>();
    let legacy = Arc::new(Mutex::new(LegacyBus::new(
        serial_evt, serial, exit_tx, started,
    )));
    let (event_tx, event_rx) = mpsc::channel::<Event>();
    spawn_exit_forwarder(exit_rx, event_tx.clone())?;
    if !attached.backend_fds.is_empty() {
        spawn_io_thread(
            transports.clone(),
            attached.backend_fds,
            None,
            legacy.clone(),
            event_tx.clone(),
            Arc::new(Vec::new()),
        )?;
    }
    let fd = match mode {
        RawMode::Real => {
            let fd = vcpu::create(&vm.kvm, &vm.fd, 0, 1, None)?;
            vcpu::set_real_mode_entry(&fd, 0x1000)?;
            fd
        }
        RawMode::Long => vcpu::create(&vm.kvm, &vm.fd, 0, 1, Some(0x1000))?,
    };
    {
        let (legacy, transports, event_tx) = (legacy.clone(), transports.clone(), event_tx.clone());
        thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let stats = VcpuStats::default();
                run_vcpu(0, fd, legacy, transports, event_tx, started, &stats)
            })
            .map_err(VmmError::Thread)?;
    }
    drop(event_tx);
    let timeout = guest.timeout.unwrap_or(Duration::from_secs(60));
    let event = match event_rx.recv_timeout(timeout) {
        Ok(e) => Some(e),
        Err(mpsc::RecvTimeoutError::Timeout) => return Err(VmmError::Timeout(timeout)),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
    };
    let outcome = outcome_of(event, &legacy)?;
    let ready = lock(&legacy).ready_after();
    Ok((outcome, ready))
}

fn run_vcpu(
    id: u8,
    mut fd: kvm_ioctls::VcpuFd,
    legacy: Arc<Mutex<LegacyBus>>,
    transports: Transports,
    events: mpsc::Sender<Event>,
    started: Instant,
    stats: &VcpuStats,
) {
    // SAFETY: pthread_self has no preconditions.
    stats
        .thread
        .store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
    let mut first = true;
    loop {
        stats.maybe_sample(&fd);
        if first && id == 0 {
            println!(
                "first vCPU entry after {} ms",
                started.elapsed().as_millis()
            );
            first = false;
        }
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                stats.record(1, port.into());
                lock(&legacy).write(port, data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                stats.record(1, port.into());
                lock(&legacy).read(port, data)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                stats.record(2, addr);
                match mmio_slot(addr, transports.len()) {
                    Some((i, off)) => lock(&transports[i].1).read(off, data),
                    None => data.fill(0),
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                stats.record(2, addr);
                if let Some((i, off)) = mmio_slot(addr, transports.len()) {
                    lock(&transports[i].1).write(off, data);
                }
            }
            Ok(VcpuExit::Hlt) => {
                stats.record(0, 0);
                thread::sleep(Duration::from_millis(1))
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: the guest cannot say why. KVM on AMD has already reset the
                // vCPU here, so the registers read back as the reset state; the last exception
                // and interrupt in the vCPU events are what tells the fault (on Intel the
                // registers too).
                println!(
                    "vcpu{id}: guest shutdown (triple fault): {}",
                    crash_state(&fd)
                );
                let _ = std::io::stdout().flush();
                let _ = events.send(Event::Crash);
                return;
            }
            Ok(VcpuExit::SystemEvent(..)) => {
                let _ = events.send(Event::Guest(GuestExit::Reset));
                return;
            }
            Ok(VcpuExit::Intr) => stats.record(0, 0),
            Ok(other) => {
                let _ = events.send(Event::VcpuFailed(id, format!("unexpected exit {other:?}")));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                let _ = events.send(Event::VcpuFailed(id, format!("KVM_RUN: {e}")));
                return;
            }
        }
    }
}

/// A vCPU's registers and pending events, in one line, for a guest that crashed.
fn crash_state(fd: &kvm_ioctls::VcpuFd) -> String {
    let mut s = String::new();
    match fd.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        )),
        Err(e) => s.push_str(&format!("regs: {e}")),
    }
    match fd.get_sregs() {
        Ok(r) => s.push_str(&format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} ss={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x} tr={:#x}",
            r.cr0, r.cr2, r.cr3, r.cr4, r.efer, r.cs.selector, r.ss.selector, r.gdt.base, r.gdt.limit,
            r.idt.base, r.idt.limit, r.tr.selector
        )),
        Err(e) => s.push_str(&format!(" sregs: {e}")),
    }
    match fd.get_vcpu_events() {
        Ok(e) => s.push_str(&format!(
            " exception(injected={} pending={} nr={} error_code={:#x}) interrupt(injected={} nr={}) nmi(injected={} pending={})",
            e.exception.injected, e.exception.pending, e.exception.nr, e.exception.error_code,
            e.interrupt.injected, e.interrupt.nr, e.nmi.injected, e.nmi.pending
        )),
        Err(e) => s.push_str(&format!(" events: {e}")),
    }
    s
}

/// The device index and offset of an MMIO address, if it falls in a device window.
fn mmio_slot(addr: u64, count: usize) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(layout::MMIO_BASE)?;
    let i = (rel / layout::MMIO_SIZE) as usize;
    (i < count).then_some((i, rel % layout::MMIO_SIZE))
}

const API_TOKEN: u64 = u64::MAX;

fn spawn_io_thread(
    transports: Transports,
    backends: Vec<(std::os::fd::RawFd, usize)>,
    api: Option<UnixListener>,
    legacy: Arc<Mutex<LegacyBus>>,
    events: mpsc::Sender<Event>,
    stats: Arc<Vec<VcpuStats>>,
) -> Result<(), VmmError> {
    let epoll = Epoll::new().map_err(VmmError::Epoll)?;
    for (fd, i) in &backends {
        epoll
            .ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, *i as u64),
            )
            .map_err(VmmError::Epoll)?;
    }
    if let Some(l) = &api {
        epoll
            .ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, API_TOKEN),
            )
            .map_err(VmmError::Epoll)?;
    }
    thread::Builder::new()
        .name("io".into())
        .spawn(move || {
            let mut evs = [EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut evs) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for ev in &evs[..n] {
                    if ev.data() == API_TOKEN {
                        if let Some(l) = &api {
                            serve_api(l, &transports, &legacy, &events, &stats);
                        }
                    } else if let Some((_, t)) = transports.get(ev.data() as usize) {
                        lock(t).device_mut().process_backend();
                    }
                }
            }
        })
        .map_err(VmmError::Thread)?;
    Ok(())
}

/// One request of the control API: a JSON line in, a JSON line out.
fn serve_api(
    l: &UnixListener,
    transports: &Transports,
    legacy: &Arc<Mutex<LegacyBus>>,
    events: &mpsc::Sender<Event>,
    stats: &[VcpuStats],
) {
    let Ok((s, _)) = l.accept() else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = api_answer(&line, transports, legacy, events, stats);
    let answer = serde_json::to_string(&answer).expect("answers always serialize");
    let mut w = &s;
    let _ = writeln!(w, "{answer}");
}

fn api_answer(
    line: &str,
    transports: &Transports,
    legacy: &Arc<Mutex<LegacyBus>>,
    events: &mpsc::Sender<Event>,
    stats: &[VcpuStats],
) -> Answer {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return Answer::error(e),
    };
    match req {
        Request::Status {} => Answer::Status(VmStatus {
            state: "running".into(),
            ready_ms: lock(legacy).ready_after().map(|d| d.as_millis() as u64),
            vcpus: stats.iter().map(VcpuStats::status).collect(),
            devices: transports
                .iter()
                .map(|(id, t)| DeviceStatus {
                    id: id.clone(),
                    driver_status: lock(t).driver_status(),
                })
                .collect(),
        }),
        Request::Stop {} => {
            let _ = events.send(Event::Stop);
            Answer::ok()
        }
        Request::UpdateDrive { id, path } => {
            let Some((_, t)) = transports.iter().find(|(i, _)| *i == id) else {
                return Answer::error(format!("no drive {id:?}"));
            };
            let mut t = lock(t);
            match t.device_mut().update_backing(&path) {
                Ok(()) => {
                    t.config_changed();
                    Answer::ok()
                }
                Err(e) => Answer::error(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_addresses_map_to_devices() {
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x70, 2), Some((0, 0x70)));
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x1100, 2), Some((1, 0x100)));
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x2000, 2), None);
        assert_eq!(mmio_slot(0x1000, 2), None);
    }

    #[test]
    fn overhead_is_measurable() {
        assert!(overhead_kib(0).is_some());
    }

    /// A kernel panic line, then a long stack dump (far more than any window of recent
    /// output), then the reset of panic=-1: the VM ended in a panic (exit status 2).
    #[test]
    fn a_panic_then_a_long_dump_then_a_reset_is_a_panic() {
        for panicked in [true, false] {
            let (exit_tx, exit_rx) = mpsc::channel();
            let legacy = Mutex::new(LegacyBus::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
                exit_tx,
                Instant::now(),
            ));
            let print = |s: &[u8]| {
                for b in s {
                    lock(&legacy).write(0x3f8, &[*b]);
                }
            };
            if panicked {
                print(b"[    1.234567] Kernel panic - not syncing: Attempted to kill init!\n");
            }
            for i in 0..20_000 {
                print(format!("[    1.{i:06}]  ? do_exit+0x{i:x}/0xb10\n").as_bytes());
            }
            assert!(lock(&legacy).write(0x64, &[0xfe]));
            let event = exit_rx.try_recv().ok().map(Event::Guest);
            let outcome = outcome_of(event, &legacy).unwrap();
            if panicked {
                assert_eq!(outcome, Outcome::GuestPanic);
                assert_eq!(outcome.exit_code(), 2);
            } else {
                assert_eq!(outcome, Outcome::GuestExit);
            }
        }
    }

    #[test]
    fn other_ends_map_to_their_outcomes() {
        let (exit_tx, _exit_rx) = mpsc::channel();
        let legacy = Mutex::new(LegacyBus::new(
            EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
            exit_tx,
            Instant::now(),
        ));
        let o = |e| outcome_of(e, &legacy);
        assert_eq!(o(Some(Event::Crash)).unwrap(), Outcome::GuestCrash);
        assert_eq!(o(None).unwrap(), Outcome::GuestCrash);
        assert_eq!(o(Some(Event::Stop)).unwrap(), Outcome::Stopped);
        assert!(matches!(
            o(Some(Event::VcpuFailed(1, "x".into()))),
            Err(VmmError::VcpuRun(1, _))
        ));
    }

    /// The control API's inputs: a block drive, an empty drive slot, a vsock device.
    struct Api {
        _dir: tempfile::TempDir,
        disk: PathBuf,
        transports: Transports,
        legacy: Arc<Mutex<LegacyBus>>,
        events: mpsc::Sender<Event>,
        events_rx: mpsc::Receiver<Event>,
        stats: Vec<VcpuStats>,
    }

    impl Api {
        fn new() -> Api {
            let dir = tempfile::tempdir().unwrap();
            let disk = dir.path().join("disk.img");
            std::fs::write(&disk, vec![0u8; 8192]).unwrap();
            let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])
                .unwrap();
            let devices: Vec<(String, Box<dyn VirtioDevice>)> = vec![
                (
                    "rootfs".into(),
                    Box::new(Block::new("rootfs", Some(&disk), true).unwrap()),
                ),
                (
                    "slot1".into(),
                    Box::new(Block::new("slot1", None, true).unwrap()),
                ),
                (
                    "vsock".into(),
                    Box::new(Vsock::new(3, &dir.path().join("v.sock")).unwrap()),
                ),
            ];
            let transports = devices
                .into_iter()
                .map(|(id, d)| {
                    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
                    (
                        id,
                        Arc::new(Mutex::new(MmioTransport::new(d, mem.clone(), irq))),
                    )
                })
                .collect();
            let (exit_tx, _) = mpsc::channel();
            let legacy = LegacyBus::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
                exit_tx,
                Instant::now(),
            );
            let (events, events_rx) = mpsc::channel();
            Api {
                _dir: dir,
                disk,
                transports: Arc::new(transports),
                legacy: Arc::new(Mutex::new(legacy)),
                events,
                events_rx,
                stats: (0..2).map(|_| VcpuStats::default()).collect(),
            }
        }

        fn ask(&self, line: &str) -> serde_json::Value {
            serde_json::to_value(api_answer(
                line,
                &self.transports,
                &self.legacy,
                &self.events,
                &self.stats,
            ))
            .unwrap()
        }

        fn error(&self, line: &str) -> String {
            let a = self.ask(line);
            a["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{line} answered {a} without an error"))
                .to_string()
        }

        /// A register of device `i`'s mmio window.
        fn reg(&self, i: usize, off: u64) -> u32 {
            let mut d = [0u8; 4];
            lock(&self.transports[i].1).read(off, &mut d);
            u32::from_le_bytes(d)
        }
    }

    #[test]
    fn api_refuses_unknown_and_malformed_requests() {
        let api = Api::new();
        assert!(api
            .error(r#"{"frobnicate":{}}"#)
            .contains("unknown request"));
        assert!(api.error("{}").contains("unknown request"));
        assert!(api.error("[1, 2]").contains("unknown request"));
        for bad in [r#"{"status""#, "", "status", "{\"stop\":}"] {
            assert!(api.error(bad).starts_with("not JSON"), "{bad:?}");
        }
        assert!(api.events_rx.try_recv().is_err(), "nothing was stopped");
    }

    #[test]
    fn api_update_drive() {
        let api = Api::new();
        let disk = api.disk.display().to_string();
        // Missing or mistyped fields.
        for bad in [
            r#"{"update_drive":{}}"#.to_string(),
            r#"{"update_drive":{"id":"slot1"}}"#.to_string(),
            format!(r#"{{"update_drive":{{"path":"{disk}"}}}}"#),
            format!(r#"{{"update_drive":{{"id":1,"path":"{disk}"}}}}"#),
            r#"{"update_drive":"slot1"}"#.to_string(),
        ] {
            assert_eq!(api.error(&bad), "update_drive needs id and path", "{bad}");
        }
        // An unknown drive, a device that is not a drive, a file that does not open.
        let e = api.error(&format!(
            r#"{{"update_drive":{{"id":"nope","path":"{disk}"}}}}"#
        ));
        assert_eq!(e, r#"no drive "nope""#);
        let e = api.error(&format!(
            r#"{{"update_drive":{{"id":"vsock","path":"{disk}"}}}}"#
        ));
        assert_eq!(e, "not a block device");
        let e = api.error(r#"{"update_drive":{"id":"slot1","path":"/nonexistent/disk.img"}}"#);
        assert!(
            e.contains("opening the drive file /nonexistent/disk.img"),
            "{e}"
        );
        // None of that changed a device's configuration.
        for i in 0..3 {
            assert_eq!(api.reg(i, 0xfc), 0, "config generation of device {i}");
        }
        // Filling the slot: the capacity and config generation move, the driver is told.
        let a = api.ask(&format!(
            r#"{{"update_drive":{{"id":"slot1","path":"{disk}"}}}}"#
        ));
        assert_eq!(a, serde_json::json!({"ok": true}));
        assert_eq!(api.reg(1, 0x100), 16, "8 KiB in sectors");
        assert_eq!(api.reg(1, 0xfc), 1);
        assert_eq!(api.reg(1, 0x60) & 2, 2, "a configuration-change interrupt");
        // Emptying it again.
        let a = api.ask(r#"{"update_drive":{"id":"slot1","path":""}}"#);
        assert_eq!(a, serde_json::json!({"ok": true}));
        assert_eq!(api.reg(1, 0x100), 0);
    }

    #[test]
    fn api_status_and_stop() {
        let api = Api::new();
        api.stats[0].record(1, 0x3f8);
        api.stats[1].record(2, layout::MMIO_BASE + 0x70);
        let st = api.ask(r#"{"status":{}}"#);
        assert_eq!(st["state"], "running");
        assert!(st["ready_ms"].is_null(), "not ready yet: {st}");
        let vcpus = st["vcpus"].as_array().expect("vcpus");
        assert_eq!(vcpus.len(), 2);
        for v in vcpus {
            for k in ["exits", "io_exits", "mmio_exits", "last_io", "regs"] {
                assert!(v.get(k).is_some(), "vcpu field {k} missing: {v}");
            }
            assert!(v["regs"].is_null(), "no vCPU thread to sample");
        }
        assert_eq!(vcpus[0]["io_exits"], 1);
        assert_eq!(vcpus[0]["last_io"], "port 0x3f8");
        assert_eq!(vcpus[1]["mmio_exits"], 1);
        assert_eq!(vcpus[1]["last_io"], "mmio 0xd0000070");
        let devices = st["devices"].as_array().expect("devices");
        let ids: Vec<_> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["rootfs", "slot1", "vsock"]);
        assert!(devices.iter().all(|d| d["driver_status"] == 0));
        // The guest signals ready and acknowledges a device.
        lock(&api.legacy).write(crate::devices::legacy::BOOT_TIMER_PORT, &[1]);
        lock(&api.transports[2].1).write(0x70, &1u32.to_le_bytes());
        let st = api.ask(r#"{"status":{}}"#);
        assert!(st["ready_ms"].is_u64(), "{st}");
        assert_eq!(st["devices"][2]["driver_status"], 1);
        assert!(api.events_rx.try_recv().is_err());
        // Stop.
        assert_eq!(api.ask(r#"{"stop":{}}"#), serde_json::json!({"ok": true}));
        assert!(matches!(api.events_rx.try_recv(), Ok(Event::Stop)));
    }
}
