//! What each vCPU has been doing, for the control API's status: a guest that never gets
//! ready shows whether it still exits to the VMM (and where) or sits inside KVM.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use husk_vmm_api::{VcpuRegs, VcpuStatus};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::vcpu::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use crate::signals;

/// The kind of a vCPU exit, as far as the status tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O at an address (the port).
    Port,
    /// MMIO at an address.
    Mmio,
    /// Anything else (HLT, a kick out of KVM_RUN): counted, no address.
    Other,
}

/// The bits of [`VcpuStats::last`] below the kind's tag.
const ADDR_MASK: u64 = (1 << 56) - 1;

impl ExitKind {
    /// The tag of an address kind in the top byte of [`VcpuStats::last`] (0: none yet).
    fn tag(self) -> u64 {
        match self {
            ExitKind::Other => 0,
            ExitKind::Port => 1,
            ExitKind::Mmio => 2,
        }
    }

    fn from_tag(tag: u64) -> ExitKind {
        match tag {
            1 => ExitKind::Port,
            2 => ExitKind::Mmio,
            _ => ExitKind::Other,
        }
    }
}

/// One vCPU's counters and its last register sample, shared between its thread (which
/// writes them) and the control API (which reads them).
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: AtomicU64,
    io: AtomicU64,
    mmio: AtomicU64,
    /// The last port or MMIO address, with its [`ExitKind::tag`] in the top byte.
    last: AtomicU64,
    /// The vCPU thread, to kick out of KVM_RUN with SIGRTMIN (0 until it runs).
    thread: AtomicU64,
    /// Set by a status request: the vCPU thread samples its registers at the next exit.
    want_regs: AtomicBool,
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
    /// Counts one exit of `kind`, at `addr` for port I/O and MMIO.
    pub(crate) fn record(&self, kind: ExitKind, addr: u64) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        match kind {
            ExitKind::Port => self.io.fetch_add(1, Ordering::Relaxed),
            ExitKind::Mmio => self.mmio.fetch_add(1, Ordering::Relaxed),
            ExitKind::Other => return,
        };
        self.last
            .store(kind.tag() << 56 | (addr & ADDR_MASK), Ordering::Relaxed);
    }

    /// Called on the vCPU's own thread before it first runs: the thread to kick.
    pub(crate) fn set_thread(&self, thread: libc::pthread_t) {
        // pthread_t is an unsigned long: u64 here, narrower on 32-bit hosts.
        #[allow(clippy::unnecessary_cast)]
        self.thread.store(thread as u64, Ordering::Release);
    }

    /// Samples the registers on the vCPU thread if a status request asked for it.
    pub(crate) fn maybe_sample(&self, fd: &VcpuFd) {
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
            let mut msrs =
                Msrs::from_entries(&[MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE].map(|index| {
                    kvm_msr_entry {
                        index,
                        ..Default::default()
                    }
                }))
                .expect("two MSRs fit");
            if matches!(fd.get_msrs(&mut msrs), Ok(2)) {
                let e = msrs.as_slice();
                self.tsc.store(e[0].data, Ordering::Relaxed);
                self.tsc_deadline.store(e[1].data, Ordering::Relaxed);
            }
            self.samples.fetch_add(1, Ordering::Release);
        }
    }

    /// Kicks the vCPU thread out of KVM_RUN once (a pause, a test's seccomp trigger); no-op
    /// before the thread runs.
    pub(crate) fn kick(&self) {
        let thread = self.thread.load(Ordering::Acquire);
        if thread != 0 {
            signals::kick(thread as libc::pthread_t);
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
            signals::kick(thread as libc::pthread_t);
            thread::sleep(Duration::from_millis(10));
            if self.samples.load(Ordering::Acquire) != before {
                return true;
            }
        }
        self.want_regs.store(false, Ordering::Release);
        false
    }

    /// The status of this vCPU, with a fresh register sample if its thread gives one soon.
    pub(crate) fn status(&self) -> VcpuStatus {
        let sampled = self.sample(Duration::from_millis(300));
        self.status_with(sampled)
    }

    /// Its counts alone: the vCPU is not disturbed (no kick, no register sample).
    pub(crate) fn counts(&self) -> VcpuStatus {
        self.status_with(false)
    }

    fn status_with(&self, sampled: bool) -> VcpuStatus {
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
        let addr = last & ADDR_MASK;
        let last_io = match ExitKind::from_tag(last >> 56) {
            ExitKind::Port => format!("port {addr:#x}"),
            ExitKind::Mmio => format!("mmio {addr:#x}"),
            ExitKind::Other => "none".into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Port and MMIO exits count apart and leave their address; other exits only count.
    #[test]
    fn exits_count_by_kind_and_keep_the_last_address() {
        let s = VcpuStats::default();
        assert_eq!(s.status().last_io, "none");
        s.record(ExitKind::Port, 0x3f8);
        s.record(ExitKind::Other, 0);
        let st = s.status();
        assert_eq!((st.exits, st.io_exits, st.mmio_exits), (2, 1, 0));
        assert_eq!(st.last_io, "port 0x3f8");
        s.record(ExitKind::Mmio, 0xd000_0070);
        let st = s.status();
        assert_eq!((st.exits, st.io_exits, st.mmio_exits), (3, 1, 1));
        assert_eq!(st.last_io, "mmio 0xd0000070");
        assert!(st.regs.is_none(), "no vCPU thread to sample");
    }
}
