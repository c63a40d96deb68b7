//! Signals: SIGRTMIN kicks a vCPU thread out of KVM_RUN (a no-op handler), and SIGTERM,
//! SIGINT and SIGHUP stop the VM, taken by one thread while every other thread blocks them.

use std::sync::mpsc;

use crate::{
    seccomp::{self, Filters, SpawnError, ThreadKind},
    vmm::Event,
};

/// Errors setting up the VMM's signals.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Installing the vCPU kick signal handler.
    #[error("installing the vCPU kick signal handler")]
    KickHandler(#[source] std::io::Error),
    /// Blocking the stop signals in the VMM's threads.
    #[error("blocking the stop signals")]
    Block(#[source] std::io::Error),
}

/// A no-op handler for SIGRTMIN: the signal only kicks a vCPU thread out of KVM_RUN.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the handler that lets [`kick`] interrupt KVM_RUN.
pub(crate) fn register_kick_handler() -> Result<(), SignalError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGRTMIN(), kick_handler)
        .map_err(|e| SignalError::KickHandler(std::io::Error::from_raw_os_error(e.errno())))
}

/// Kicks the vCPU thread `thread` out of KVM_RUN (once [`register_kick_handler`] ran).
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: the thread id is that of a vCPU thread, which lives as long as the VMM;
    // SIGRTMIN has a no-op handler, so the signal only interrupts KVM_RUN.
    unsafe { libc::pthread_kill(thread, libc::SIGRTMIN()) };
}

/// The stop signals, blocked in every thread: only [`spawn_signal_thread`] takes them.
#[derive(Clone, Copy)]
pub(crate) struct StopSignals(libc::sigset_t);

/// SIGTERM, SIGINT and SIGHUP stop the VM like the control API's `stop` (sockets removed,
/// exit 0): blocked here, before any thread exists, so every thread inherits the mask and
/// only [`spawn_signal_thread`] takes them.
pub(crate) fn block_stop_signals() -> Result<StopSignals, SignalError> {
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
        return Err(SignalError::Block(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(StopSignals(set))
}

/// Waits for a stop signal and ends the VM with [`Event::Stop`].
pub(crate) fn spawn_signal_thread(
    signals: StopSignals,
    event_tx: mpsc::Sender<Event>,
    filters: &Filters,
) -> Result<(), SpawnError> {
    let StopSignals(set) = signals;
    seccomp::spawn("signals", ThreadKind::Signal, filters, move || loop {
        let mut sig = 0;
        // SAFETY: `set` and `sig` are live locals; sigwait only reads/writes them.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            crate::log_err!("husk-vmm: signal {sig}: stopping the VM");
            let _ = event_tx.send(Event::Stop);
        }
    })
}
