//! Pausing the vCPUs of a running VM, for a snapshot: each vCPU thread, kicked out of
//! KVM_RUN, completes the exit it was in, saves its own state and waits until the VM resumes.
//!
//! A vCPU's state is read on its own thread, between two KVM_RUNs, so it is never read while
//! the vCPU runs. KVM completes an I/O or MMIO exit (a read's data put into the guest's
//! register, the instruction retired) only on the next KVM_RUN: a pausing thread makes that
//! run with `immediate_exit` set, which completes the exit and returns without entering the
//! guest, and only then saves.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use kvm_ioctls::VcpuFd;

use super::{
    snapshot::{SnapshotError, VcpuState},
    vcpu_stats::VcpuStats,
};

/// How often a vCPU that has not paused yet is kicked again: a kick that lands while the
/// thread is outside KVM_RUN is lost.
const KICK_EVERY: Duration = Duration::from_millis(10);

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("vCPU {0} did not pause within {1:?}")]
    Timeout(usize, Duration),
    #[error("vCPU {0}: {1}")]
    Save(usize, #[source] SnapshotError),
    #[error("the VM is paused already")]
    AlreadyPaused,
}

#[derive(Debug, Default)]
struct Slots {
    /// What each vCPU saved once it paused (None: still running, or taken).
    saved: Vec<Option<Result<VcpuState, SnapshotError>>>,
    /// How many times the VM was resumed: a paused vCPU waits until this changes (a flag
    /// could be set again by the next pause before a slow thread saw it cleared).
    resumes: u64,
    /// The MSRs each vCPU saves ([`super::snapshot::msr_indices`]), given by the pause.
    msrs: Arc<Vec<u32>>,
}

/// The pause of a VM's vCPUs, shared by the vCPU threads and whoever pauses them.
#[derive(Debug)]
pub struct Pause {
    wanted: AtomicBool,
    slots: Mutex<Slots>,
    changed: Condvar,
}

impl Pause {
    /// The pause control of a VM of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Pause {
        Pause {
            wanted: AtomicBool::new(false),
            slots: Mutex::new(Slots {
                saved: (0..vcpus).map(|_| None).collect(),
                resumes: 0,
                msrs: Arc::default(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by vCPU `id`'s thread before each KVM_RUN: if a pause is wanted, completes the
    /// last exit, saves the vCPU's state and waits until the VM resumes.
    pub(crate) fn check(&self, id: usize, fd: &mut VcpuFd) {
        if !self.wanted.load(Ordering::Acquire) {
            return;
        }
        fd.set_kvm_immediate_exit(1);
        // Returns EINTR at once, the last exit completed, the guest not entered.
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
        let msrs = self.lock().msrs.clone();
        let state = VcpuState::save(fd, &msrs);
        let mut slots = self.lock();
        // `wanted` changes only under the lock: a pause that timed out and resumed the VM
        // while this vCPU was saving leaves it nothing to wait for.
        if !self.wanted.load(Ordering::Acquire) {
            return;
        }
        let resumes = slots.resumes;
        slots.saved[id] = Some(state);
        self.changed.notify_all();
        while slots.resumes == resumes {
            slots = self.changed.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pauses every vCPU, kicking each until it has (`stats` holds their threads), within
    /// `wait`; their states with the MSRs `msrs`, in vCPU order. On failure the VM runs on.
    pub fn pause(
        &self,
        stats: &[VcpuStats],
        msrs: Vec<u32>,
        wait: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        let mut slots = self.lock();
        if self.wanted.load(Ordering::Acquire) {
            return Err(PauseError::AlreadyPaused);
        }
        slots.msrs = Arc::new(msrs);
        self.wanted.store(true, Ordering::Release);
        let deadline = Instant::now() + wait;
        loop {
            let waiting: Vec<usize> = (0..slots.saved.len())
                .filter(|&i| slots.saved[i].is_none())
                .collect();
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                drop(slots);
                self.resume();
                return Err(PauseError::Timeout(waiting[0], wait));
            }
            for &i in &waiting {
                if let Some(s) = stats.get(i) {
                    s.kick();
                }
            }
            slots = self
                .changed
                .wait_timeout(slots, KICK_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(slots.saved.len());
        let mut failed = None;
        for (i, s) in slots.saved.iter_mut().enumerate() {
            match s.take().expect("every vCPU saved") {
                Ok(state) => states.push(state),
                Err(e) => {
                    failed.get_or_insert(PauseError::Save(i, e));
                }
            }
        }
        drop(slots);
        match failed {
            None => Ok(states),
            Some(e) => {
                self.resume();
                Err(e)
            }
        }
    }

    /// Lets every paused vCPU run on.
    pub fn resume(&self) {
        let mut slots = self.lock();
        self.wanted.store(false, Ordering::Release);
        slots.resumes += 1;
        slots.saved.iter_mut().for_each(|s| *s = None);
        self.changed.notify_all();
    }
}
