//! Seccomp filters, one per kind of VMM thread, each an allowlist: a syscall not on the list
//! of the calling thread kills the whole VMM (`SECCOMP_RET_KILL_PROCESS`, seen by whoever
//! waits for it as death by SIGSYS).
//!
//! A guest that breaks a device model runs its code on the thread that emulates the device:
//! a vCPU thread (MMIO and port I/O exits are served there, block and vsock requests
//! included) or the I/O thread (backend fds and the control socket). So those two lists are
//! what such an attacker gets. What none of them allows: creating threads or processes
//! (`clone`, `fork`, `execve`), executable memory (`mmap`/`mprotect` with `PROT_EXEC`), new
//! network sockets (only `AF_UNIX`, for vsock's guest-to-host connections), opening files for
//! writing or creating them, `ptrace`, mounts, namespaces, keyrings, BPF, module loading. ioctls
//! are limited by request number to the few each thread makes: a vCPU thread its own KVM_RUN
//! and the register reads of crash reports and statistics, the tap's offload setting and
//! FIONBIO; the I/O thread only FIONBIO.
//!
//! Each thread installs its own filter as the first thing it runs ([`install`]), before a vCPU
//! enters the guest; the main thread installs its own last, once it has started every other
//! thread, because a thread inherits the filter of the thread that creates it.

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Builds the VM, starts the others, waits for the VM's end and exits.
    Main,
    /// Runs one vCPU and the device emulation its exits lead to.
    Vcpu,
    /// Serves the devices' backend fds and the control socket.
    Io,
    /// Takes the stop signals.
    Signal,
    /// Forwards the guest's exit requests to the main thread.
    Exit,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Io,
        ThreadKind::Signal,
        ThreadKind::Exit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Io => "io",
            ThreadKind::Signal => "signal",
            ThreadKind::Exit => "exit",
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {0} thread")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("installing the seccomp filter of the {0} thread")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// The compiled filters, one per thread kind; empty when seccomp is off.
#[derive(Debug, Clone, Default)]
pub struct Filters(BTreeMap<ThreadKind, BpfProgram>);

impl Filters {
    /// Every kind's filter, compiled, doing `outside` with a syscall outside its list
    /// (KillProcess; Log to find what a list lacks).
    pub fn new(outside: SeccompAction) -> Result<Self, SeccompError> {
        let mut progs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            progs.insert(kind, compile(kind, outside.clone())?);
        }
        Ok(Filters(progs))
    }

    /// No filters: [`install`](Self::install) does nothing (`--seccomp off`).
    pub fn off() -> Self {
        Filters(BTreeMap::new())
    }

    /// Installs `kind`'s filter on the calling thread (and on the threads it creates from
    /// now on).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.0.get(&kind) {
            Some(prog) => {
                seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(kind.name(), e))
            }
            None => Ok(()),
        }
    }
}

/// Why a confined thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("starting thread {0}")]
    Thread(String, #[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Starts thread `name`, which installs `kind`'s filter and then runs `f`. Returns once the
/// filter is in place, or with why it is not (then `f` never runs).
pub fn spawn(
    name: impl Into<String>,
    kind: ThreadKind,
    filters: &Filters,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), SpawnError> {
    let name = name.into();
    let filters = filters.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let installed = filters.install(kind);
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            drop(filters);
            if ok {
                f();
            }
        })
        .map_err(|e| SpawnError::Thread(name.clone(), e))?;
    match rx.recv() {
        Ok(r) => Ok(r?),
        Err(_) => Err(SpawnError::Thread(
            name,
            std::io::Error::other("the thread ended before installing its filter"),
        )),
    }
}

fn compile(kind: ThreadKind, outside: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |e| SeccompError::Build(kind.name(), e);
    let filter = SeccompFilter::new(
        rules(kind).map_err(err)?,
        outside,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type R<T> = Result<T, seccompiler::BackendError>;

/// Allowed whatever the arguments.
fn any(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for s in syscalls {
        rules.insert(*s, Vec::new());
    }
}

/// Allowed when argument `arg` (32 bits) is one of `values`.
fn arg_in(rules: &mut Rules, syscall: libc::c_long, arg: u8, values: &[u64]) -> R<()> {
    let mut alts = Vec::new();
    for v in values {
        alts.push(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            Len::Dword,
            Op::Eq,
            *v,
        )?])?);
    }
    rules.insert(syscall, alts);
    Ok(())
}

/// Allowed when argument `arg` (32 bits) has none of the bits of `mask`.
fn arg_without(rules: &mut Rules, syscall: libc::c_long, arg: u8, mask: u64) -> R<()> {
    let cond = SeccompCondition::new(arg, Len::Dword, Op::MaskedEq(mask), 0)?;
    rules.insert(syscall, vec![SeccompRule::new(vec![cond])?]);
    Ok(())
}

/// What every thread needs: memory (never executable), locks and channels, time, signals of
/// its own (a vCPU's kick, an abort), writing to the fds it has (logs), closing them, exiting.
fn common() -> R<Rules> {
    let mut r = Rules::new();
    any(
        &mut r,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettimeofday,
            libc::SYS_getrandom,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_tgkill,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_fcntl,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    arg_without(&mut r, libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?;
    arg_without(&mut r, libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)?;
    // Rust's fault handler resets SIGSEGV or SIGBUS to its default before the fault comes
    // again, so that a segfault kills the VMM as a segfault.
    arg_in(
        &mut r,
        libc::SYS_rt_sigaction,
        0,
        &[libc::SIGSEGV as u64, libc::SIGBUS as u64],
    )?;
    Ok(r)
}

/// Device emulation: block requests (files opened at start or handed over through the
/// control socket), vsock's Unix sockets, the tap.
fn device_io(r: &mut Rules) -> R<()> {
    any(
        r,
        &[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_connect,
            libc::SYS_epoll_ctl,
            // The vsock muxer's own epoll set and connection timer.
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_timerfd_settime,
            // A host connection accepted while a vCPU serves the vsock device.
            libc::SYS_accept4,
        ],
    );
    // Guest-to-host vsock connections are Unix sockets.
    arg_in(r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])
}

fn rules(kind: ThreadKind) -> R<Rules> {
    let mut r = common()?;
    match kind {
        ThreadKind::Main => {
            // At the end: the VMM's sockets go.
            any(&mut r, &[libc::SYS_unlink]);
        }
        ThreadKind::Vcpu => {
            device_io(&mut r)?;
            arg_in(&mut r, libc::SYS_ioctl, 1, &vcpu_ioctls())?;
        }
        ThreadKind::Io => {
            device_io(&mut r)?;
            any(&mut r, &[libc::SYS_setsockopt]);
            // std's set_nonblocking on an accepted vsock peer; the VM's state, read for a
            // snapshot.
            arg_in(&mut r, libc::SYS_ioctl, 1, &io_ioctls())?;
            // A snapshot's template file, sized to guest memory (passed, never opened).
            any(&mut r, &[libc::SYS_ftruncate]);
            // update_drive and add_layer open the file named: never created, never
            // truncated.
            arg_without(
                &mut r,
                libc::SYS_openat,
                2,
                (libc::O_CREAT | libc::O_TRUNC | libc::O_TMPFILE) as u64,
            )?;
        }
        ThreadKind::Signal => {
            any(&mut r, &[libc::SYS_rt_sigtimedwait]);
        }
        ThreadKind::Exit => {}
    }
    Ok(r)
}

/// A way for tests to make a VMM thread break its filter, as a guest that took over a device
/// model would: only in a build with the `seccomp-trigger` feature, never in a release. The
/// control socket takes `{"seccomp_trigger":"io"}` (the I/O thread breaks it at once) or
/// `{"seccomp_trigger":"vcpu"}` (vCPU 0 breaks it at its next exit, which a kick causes).
#[cfg(feature = "seccomp-trigger")]
pub mod trigger {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set: vCPU 0 calls [`forbidden_syscall`] at its next exit.
    pub static VCPU: AtomicBool = AtomicBool::new(false);

    /// The thread a trigger line asks for ("io" or "vcpu"), if `line` is one.
    pub fn parse(line: &str) -> Option<&'static str> {
        match line.trim() {
            r#"{"seccomp_trigger":"io"}"# => Some("io"),
            r#"{"seccomp_trigger":"vcpu"}"# => Some("vcpu"),
            _ => None,
        }
    }

    /// Whether vCPU 0 was asked to break its filter.
    pub fn vcpu_asked() -> bool {
        VCPU.load(Ordering::Acquire)
    }

    pub fn ask_vcpu() {
        VCPU.store(true, Ordering::Release);
    }

    /// execve of a shell: what an attacker in the VMM wants, and on no thread's list. The
    /// filter kills the VMM here; if it did not, the shell says so and the VMM ends with 99.
    pub fn forbidden_syscall() -> ! {
        let sh = c"/bin/sh";
        let argv = [
            sh.as_ptr(),
            c"-c".as_ptr(),
            c"echo husk-vmm: the seccomp filter let execve through".as_ptr(),
            std::ptr::null(),
        ];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated strings and arrays that outlive the call.
        unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        std::process::exit(99)
    }
}

/// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;
const KVMIO: u64 = 0xAE;

/// The ioctls of a vCPU thread: KVM_RUN; the register, run state, MSR and event reads of
/// status requests and crash reports, and the rest of its state when the VM pauses; the
/// tap's offloads, set when the guest's driver
/// accepts features; FIONBIO.
fn vcpu_ioctls() -> Vec<u64> {
    use std::mem::size_of;
    vec![
        ioc(0, KVMIO, 0x80, 0), // KVM_RUN
        ioc(
            IOC_READ,
            KVMIO,
            0x81,
            size_of::<kvm_bindings::kvm_regs>() as u64,
        ), // KVM_GET_REGS
        ioc(
            IOC_READ,
            KVMIO,
            0x83,
            size_of::<kvm_bindings::kvm_sregs>() as u64,
        ), // KVM_GET_SREGS
        ioc(
            IOC_READ,
            KVMIO,
            0x9f,
            size_of::<kvm_bindings::kvm_vcpu_events>() as u64,
        ), // KVM_GET_VCPU_EVENTS
        ioc(
            IOC_READ,
            KVMIO,
            0x98,
            size_of::<kvm_bindings::kvm_mp_state>() as u64,
        ), // KVM_GET_MP_STATE
        ioc(
            IOC_READ_WRITE,
            KVMIO,
            0x88,
            size_of::<kvm_bindings::kvm_msrs>() as u64,
        ), // KVM_GET_MSRS (the TSC and its deadline, for a status request; all, to pause)
        // The rest of a vCPU's state, which its own thread saves when the VM is paused.
        ioc(
            IOC_READ,
            KVMIO,
            0xa4,
            size_of::<kvm_bindings::kvm_xsave>() as u64,
        ), // KVM_GET_XSAVE
        ioc(
            IOC_READ,
            KVMIO,
            0xa6,
            size_of::<kvm_bindings::kvm_xcrs>() as u64,
        ), // KVM_GET_XCRS
        ioc(
            IOC_READ,
            KVMIO,
            0xa1,
            size_of::<kvm_bindings::kvm_debugregs>() as u64,
        ), // KVM_GET_DEBUGREGS
        ioc(
            IOC_READ,
            KVMIO,
            0x8e,
            size_of::<kvm_bindings::kvm_lapic_state>() as u64,
        ), // KVM_GET_LAPIC
        ioc(
            IOC_READ_WRITE,
            KVMIO,
            0x91,
            size_of::<kvm_bindings::kvm_cpuid2>() as u64,
        ), // KVM_GET_CPUID2
        libc::TUNSETOFFLOAD,
        // std's set_nonblocking, on a host connection the vsock device accepts.
        libc::FIONBIO,
    ]
}

/// The ioctls of the I/O thread: FIONBIO, and the VM state reads of a snapshot (the PIT,
/// kvmclock, the interrupt controllers).
fn io_ioctls() -> Vec<u64> {
    use std::mem::size_of;
    vec![
        libc::FIONBIO,
        ioc(
            IOC_READ,
            KVMIO,
            0x9f,
            size_of::<kvm_bindings::kvm_pit_state2>() as u64,
        ), // KVM_GET_PIT2
        ioc(
            IOC_READ,
            KVMIO,
            0x7c,
            size_of::<kvm_bindings::kvm_clock_data>() as u64,
        ), // KVM_GET_CLOCK
        ioc(
            IOC_READ_WRITE,
            KVMIO,
            0x62,
            size_of::<kvm_bindings::kvm_irqchip>() as u64,
        ), // KVM_GET_IRQCHIP
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vcpu_ioctl_numbers_are_the_kernels() {
        // From linux/kvm.h on x86_64, and linux/if_tun.h.
        assert_eq!(
            vcpu_ioctls(),
            [
                0xAE80,
                0x8090_AE81,
                0x8138_AE83,
                0x8040_AE9F,
                0x8004_AE98,
                0xC008_AE88,
                0x9000_AEA4,
                0x8188_AEA6,
                0x8080_AEA1,
                0x8400_AE8E,
                0xC008_AE91,
                0x4004_54D0,
                0x5421
            ]
        );
    }

    #[test]
    fn the_io_ioctl_numbers_are_the_kernels() {
        // From linux/kvm.h on x86_64, and asm-generic/ioctls.h.
        assert_eq!(io_ioctls(), [0x5421, 0x8070_AE9F, 0x8030_AE7C, 0xC208_AE62]);
    }

    #[test]
    fn every_filter_compiles_and_none_allows_what_an_attacker_wants() {
        Filters::new(SeccompAction::KillProcess).unwrap();
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            for forbidden in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_bpf,
                libc::SYS_init_module,
                libc::SYS_finit_module,
                libc::SYS_open,
                libc::SYS_open_by_handle_at,
                libc::SYS_process_vm_writev,
                libc::SYS_kill,
            ] {
                assert!(!r.contains_key(&forbidden), "{kind:?} allows {forbidden}");
            }
            if matches!(
                kind,
                ThreadKind::Main | ThreadKind::Signal | ThreadKind::Exit
            ) {
                assert!(!r.contains_key(&libc::SYS_ioctl), "{kind:?} allows ioctl");
            }
        }
    }
}
