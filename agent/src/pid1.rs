//! What the agent does as the guest's PID 1: mount the basic filesystems, bring up loopback,
//! tell the VMM it is ready, and power the VM off at the end.

use std::{fs, path::Path};

use nix::mount::{mount, MsFlags};

/// Why the guest could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("creating {0}")]
    Mkdir(&'static str, #[source] std::io::Error),
    #[error("switching the root to {0}: {1}")]
    SwitchRoot(&'static str, &'static str, #[source] nix::Error),
}

/// The guest's mounts, in order: (fstype, target, flags, data).
const MOUNTS: &[(&str, &str, MsFlags, &str)] = &[
    (
        "proc",
        "/proc",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "sysfs",
        "/sys",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    ("devtmpfs", "/dev", MsFlags::MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "mode=0620,ptmxmode=0666",
    ),
    (
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "mqueue",
        "/dev/mqueue",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "tmpfs",
        "/tmp",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=0755",
    ),
];

/// Moves PID 1 off the initramfs onto a fresh tmpfs root, as switch_root does. The kernel's
/// initial rootfs can never be pivot_root'ed away, so without this every container would need
/// the chroot fallback, which a process with CAP_SYS_CHROOT can climb out of into the guest.
/// Nothing of the initramfs is needed afterwards: containers run the agent as /proc/self/exe.
pub fn leave_initramfs() -> Result<(), Pid1Error> {
    // linux/magic.h; nix does not name it.
    const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);
    let on_rootfs = nix::sys::statfs::statfs("/")
        .map(|s| {
            let t = s.filesystem_type();
            t == RAMFS_MAGIC || t == nix::sys::statfs::TMPFS_MAGIC
        })
        .unwrap_or(false);
    if !on_rootfs {
        return Ok(());
    }
    const NEW_ROOT: &str = "/newroot";
    fs::create_dir_all(NEW_ROOT).map_err(|e| Pid1Error::Mkdir(NEW_ROOT, e))?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| Pid1Error::Mount {
        fstype: "tmpfs",
        target: NEW_ROOT,
        source,
    })?;
    let step = |what: &'static str| move |e| Pid1Error::SwitchRoot(NEW_ROOT, what, e);
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("moving it over /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Mounts the guest's filesystems. An already-mounted target (EBUSY) is fine.
pub fn mount_basics() -> Result<(), Pid1Error> {
    for &(fstype, target, flags, data) in MOUNTS {
        fs::create_dir_all(target).map_err(|e| Pid1Error::Mkdir(target, e))?;
        let data = (!data.is_empty()).then_some(data);
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(Pid1Error::Mount {
                    fstype,
                    target,
                    source,
                })
            }
        }
    }
    // Conventional links containers and tools expect.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// Brings the loopback interface up (containers share the VM's network namespace).
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the returned fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket this function owns from here on.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a live, properly sized ifreq.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member was just written by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a live, properly sized ifreq.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The I/O port of husk-vmm's boot timer: a byte written there marks the guest ready.
pub const BOOT_TIMER_PORT: u16 = 0x03f0;
/// The value the agent writes when its listeners are up.
pub const BOOT_TIMER_READY: u8 = 1;

/// Tells the VMM the agent is ready, by a write to the boot-timer port. Harmless where no VMM
/// listens (the write is dropped), but only done as PID 1 in a VM.
pub fn signal_ready() {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(BOOT_TIMER_PORT as libc::c_ulong, 1, 1) } != 0 {
        tracing::warn!(
            "no access to the boot-timer port: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: the port was granted by ioperm above; an OUT to it has no effect on our memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT, in("al") BOOT_TIMER_READY,
            options(nomem, nostack, preserves_flags));
    }
}

/// Ends the VM: sync, then reboot, which husk-vmm (with `reboot=k`) sees as the guest's end.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    tracing::error!("reboot failed: {err:?}");
    std::process::exit(1)
}
