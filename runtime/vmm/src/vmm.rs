//! Runs a microVM to its end: [`run`] has the [`builder`](mod@crate::builder) make the VM from
//! its configuration, then starts it (the devices' I/O thread, the signal thread, one
//! thread per vCPU) and waits for the event that ends it.

use std::{
    io::Write,
    os::unix::net::UnixListener,
    sync::{mpsc, Arc, Mutex},
    time::Instant,
};

use seccompiler::SeccompAction;
use vmm_sys_util::eventfd::EventFd;

use crate::{
    api_server::{ApiContext, ApiError, SnapshotSource},
    arch::layout,
    builder::{self, BuildError},
    config::{SeccompMode, VmConfig},
    device_manager::{lock, DeviceBus, DeviceManager, DeviceManagerError},
    devices::legacy::{GuestExit, LegacyBus},
    event_loop::{self, EventLoopError},
    jail::{Jail, JailError},
    seccomp::{self, Filters, SeccompError, SpawnError, ThreadKind},
    signals::{self, SignalError, StopSignals},
    vstate::{
        pause::{Pause, PauseError},
        snapshot::SnapshotError,
        vcpu::{Entry, Shared, Vcpu, VcpuEnd, VcpuError},
        vcpu_stats::VcpuStats,
        vm::{Vm, VmError},
    },
};

/// Why the VMM could not build or run the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Creating the serial console's interrupt eventfd.
    #[error("an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Starting a thread (with its seccomp filter).
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// Building the seccomp filters, or installing the main thread's.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Jail(#[from] JailError),
    /// Counting its threads before the jail.
    #[error("reading /proc/self/task to count the VMM's threads before it enters its jail")]
    ThreadCount(#[source] std::io::Error),
    /// Threads started before the jail (a bug of the VMM's).
    #[error("the VMM has {0} threads before entering its jail; it must enter alone")]
    Threads(usize),
    /// A vCPU stopped on an error of its own.
    #[error("vCPU {0} failed: {1}")]
    VcpuRun(u8, String),
    #[error(transparent)]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The template of `--restore` could not be restored (see
    /// [`husk_vmm_api::EXIT_TEMPLATE_REFUSED`]).
    #[error("restoring the VM from its template: {0}")]
    Restore(Box<VmmError>),
}

impl VmmError {
    /// The VMM's exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Restore(_) => husk_vmm_api::EXIT_TEMPLATE_REFUSED,
            _ => 1,
        }
    }

    pub(crate) fn restore(e: impl Into<VmmError>) -> VmmError {
        VmmError::Restore(Box::new(e.into()))
    }
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

/// What ends a VM, sent to the thread that waits for its end.
#[derive(Debug)]
pub(crate) enum Event {
    Guest(GuestExit),
    Crash,
    Stop,
    VcpuFailed(u8, String),
}

impl Event {
    /// The event of vCPU `id`'s end.
    fn of_vcpu(id: u8, end: VcpuEnd) -> Event {
        match end {
            VcpuEnd::Reset => Event::Guest(GuestExit::Reset),
            VcpuEnd::Crash => Event::Crash,
            VcpuEnd::Failed(e) => Event::VcpuFailed(id, e),
        }
    }
}

/// Builds the VM described by `cfg` and runs it to its end.
pub fn run(cfg: &VmConfig) -> Result<Outcome, VmmError> {
    let started = Instant::now();
    no_core_dumps();
    // Before any thread exists, so that every thread inherits the mask.
    let stop_signals = signals::block_stop_signals()?;
    let filters = match cfg.seccomp {
        SeccompMode::Kill => Filters::new(SeccompAction::KillProcess)?,
        SeccompMode::Log => Filters::new(SeccompAction::Log)?,
        SeccompMode::Off => Filters::off(),
    };
    let jail = Jail::of(cfg);
    let (machine, sockets) = builder::build(cfg, started, stop_signals, jail.as_ref())?;
    if let Some(j) = &jail {
        // Alone: a thread keeps the namespaces, root and bounding set it started with.
        let threads = std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .map_err(VmmError::ThreadCount)?;
        if threads != 1 {
            return Err(VmmError::Threads(threads));
        }
        let t = Instant::now();
        j.enter(builder::jail_limits(cfg)?)?;
        crate::log_line!(
            "jail entered in {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    let running = start(machine, &filters)?;
    // Last: every other thread is started (a thread inherits its creator's filter).
    filters.install(ThreadKind::Main)?;
    let outcome = running.wait();
    // A jailed VMM cannot write its root: its caller removes the sockets.
    if jail.is_none() {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
    }
    crate::log_line!(
        "vm ended after {} ms: {:?}",
        started.elapsed().as_millis(),
        outcome
    );
    let _ = std::io::stdout().flush();
    outcome
}

/// A VMM that dies (of its seccomp filter, of a bug) leaves no core file: one would hold the
/// guest's memory, a tenant's data, on the host's disk.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct; prctl(PR_SET_DUMPABLE) takes plain integers.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// A VM with its guest loaded and its virtio devices attached: what [`start`] runs.
pub(crate) struct Machine {
    pub(crate) vm: Vm,
    pub(crate) devices: DeviceManager,
    pub(crate) vcpus: u8,
    /// Where the boot vCPU starts.
    pub(crate) entry: Entry,
    /// Where the serial console's output goes.
    pub(crate) serial: Box<dyn Write + Send>,
    /// Called once when the guest writes the boot timer.
    pub(crate) on_ready: Option<Box<dyn FnMut() + Send>>,
    /// The control socket, if the VM has one.
    pub(crate) api: Option<UnixListener>,
    /// The stop signals a signal thread takes, if they are blocked.
    pub(crate) stop_signals: Option<StopSignals>,
    /// When the VMM started, for the boot timings.
    pub(crate) started: Instant,
    /// The vCPUs' and the VM's state from a snapshot, put back before the vCPUs first run
    /// (guest memory and the devices' states were restored with the VM and its devices).
    pub(crate) restore: Option<Restore>,
}

/// What a VM restored from a snapshot gets back once its vCPUs exist.
pub(crate) struct Restore {
    pub(crate) vcpus: Vec<crate::vstate::snapshot::VcpuState>,
    pub(crate) vm: crate::vstate::snapshot::VmState,
}

/// A started VM: the vCPUs run on their threads until an [`Event`] ends it.
pub(crate) struct Running {
    legacy: Arc<Mutex<LegacyBus>>,
    events: mpsc::Receiver<Event>,
    /// The vCPUs' stats (their threads, to kick) and their pause (the control API's
    /// snapshot request holds them too).
    #[cfg_attr(not(test), allow(dead_code))]
    vcpus: Shared,
    /// The VM, kept as long as its vCPUs may run (the control API's snapshot reads it too).
    #[cfg_attr(not(test), allow(dead_code))]
    vm: Arc<Vm>,
}

/// Starts `m`: the serial console and the other port-I/O devices, the guest-exit
/// forwarder, the signal thread, the I/O thread and one thread per vCPU, each under its
/// seccomp filter from `filters`.
pub(crate) fn start(m: Machine, filters: &Filters) -> Result<Running, VmmError> {
    signals::register_kick_handler()?;
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    m.vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)?;
    let (exit_tx, exit_rx) = mpsc::channel::<GuestExit>();
    let (event_tx, event_rx) = mpsc::channel::<Event>();
    spawn_exit_forwarder(exit_rx, event_tx.clone(), filters)?;
    if let Some(set) = m.stop_signals {
        signals::spawn_signal_thread(set, event_tx.clone(), filters)?;
    }
    let mut legacy = LegacyBus::new(serial_evt, m.serial, exit_tx, m.started);
    if let Some(f) = m.on_ready {
        legacy.on_ready(f);
    }
    let legacy = Arc::new(Mutex::new(legacy));
    let vcpus = Shared {
        stats: Arc::new((0..m.vcpus).map(|_| VcpuStats::default()).collect()),
        pause: Arc::new(Pause::new(m.vcpus.into())),
    };
    let transports = m.devices.transports;
    let vm = Arc::new(m.vm);
    if !m.devices.backend_fds.is_empty() || m.api.is_some() {
        let ctx = ApiContext {
            transports: transports.clone(),
            legacy: legacy.clone(),
            events: event_tx.clone(),
            stats: vcpus.stats.clone(),
            snapshot: Some(SnapshotSource {
                vm: vm.clone(),
                pause: vcpus.pause.clone(),
                msrs: crate::vstate::snapshot::msr_indices(&vm.kvm).map_err(|e| e.to_string()),
            }),
        };
        event_loop::spawn(&m.devices.backend_fds, m.api, ctx, filters)?;
    }
    let bus = DeviceBus::new(legacy.clone(), transports.clone());
    let mut created = Vec::with_capacity(m.vcpus.into());
    for id in 0..m.vcpus {
        created.push(Vcpu::new(
            &vm,
            id,
            m.vcpus,
            m.entry,
            bus.clone(),
            m.started,
            vcpus.clone(),
        )?);
    }
    if let Some(r) = &m.restore {
        if r.vcpus.len() != created.len() {
            return Err(VmmError::restore(SnapshotError::NotATemplate(format!(
                "it has {} vCPUs, the VM {}",
                r.vcpus.len(),
                created.len()
            ))));
        }
        // The vCPUs' states first, then the VM's (the LAPICs would undo what the irqchip
        // has pending), then the devices' pending interrupts again.
        for (vcpu, state) in created.iter().zip(&r.vcpus) {
            vcpu.restore(state).map_err(VmmError::restore)?;
        }
        r.vm.restore(&vm.fd).map_err(VmmError::restore)?;
        for (_, t) in transports.iter() {
            lock(t).resignal();
        }
        crate::log_line!(
            "restored from the snapshot {} ms after the VMM started",
            m.started.elapsed().as_millis()
        );
    }
    for mut vcpu in created {
        let event_tx = event_tx.clone();
        let name = format!("vcpu{}", vcpu.id());
        seccomp::spawn(name, ThreadKind::Vcpu, filters, move || {
            let end = vcpu.run();
            let _ = event_tx.send(Event::of_vcpu(vcpu.id(), end));
        })?;
    }
    Ok(Running {
        legacy,
        events: event_rx,
        vcpus,
        vm,
    })
}

impl Running {
    /// Waits for the VM's end.
    pub(crate) fn wait(&self) -> Result<Outcome, VmmError> {
        outcome_of(self.events.recv().ok(), &self.legacy)
    }

    /// Waits for the VM's end up to `timeout`; None if it runs on.
    #[cfg(test)]
    pub(crate) fn wait_for(
        &self,
        timeout: std::time::Duration,
    ) -> Option<Result<Outcome, VmmError>> {
        let event = match self.events.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => return None,
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
        };
        Some(outcome_of(event, &self.legacy))
    }

    /// Pauses every vCPU within `wait`: each has completed its last exit and saved its
    /// state, returned in vCPU order, and stays out of the guest until [`Running::resume`].
    #[cfg(test)]
    pub(crate) fn pause(
        &self,
        wait: std::time::Duration,
    ) -> Result<Vec<crate::vstate::snapshot::VcpuState>, VmmError> {
        let msrs = crate::vstate::snapshot::msr_indices(&self.vm.kvm)?;
        Ok(self.vcpus.pause.pause(&self.vcpus.stats, msrs, wait)?)
    }

    /// Lets the paused vCPUs run on.
    #[cfg(test)]
    pub(crate) fn resume(&self) {
        self.vcpus.pause.resume();
    }

    /// The VM's guest memory.
    #[cfg(test)]
    pub(crate) fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        &self.vm.mem
    }

    /// How long after the VMM's start the guest wrote the boot timer, if it did.
    #[cfg(test)]
    pub(crate) fn ready_after(&self) -> Option<std::time::Duration> {
        lock(&self.legacy).ready_after()
    }
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

/// Forwards the legacy devices' guest exits to the VMM's event channel.
fn spawn_exit_forwarder(
    exit_rx: mpsc::Receiver<GuestExit>,
    event_tx: mpsc::Sender<Event>,
    filters: &Filters,
) -> Result<(), VmmError> {
    seccomp::spawn("exit", ThreadKind::Exit, filters, move || {
        for e in exit_rx {
            let _ = event_tx.send(Event::Guest(e));
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
