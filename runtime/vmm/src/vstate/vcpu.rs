//! vCPUs: their setup for the 64-bit Linux boot protocol (or flat real mode, for tiny test
//! guests), and the loop that runs one, sends its I/O exits to the devices and holds it while
//! the VM is paused.

use std::{
    io::Write,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use super::{
    crash::crash_state,
    pause::Pause,
    vcpu_stats::{ExitKind, VcpuStats},
    vm::Vm,
};
use crate::{arch::layout, device_manager::DeviceBus};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0}: {1}")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's deadline in TSC-deadline mode.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;

/// CPUID.1:ECX bit: the LAPIC timer has TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 24;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Creates vCPU `id` with CPUID, MSRs and LAPIC set up. Only the boot vCPU (id 0) gets
/// registers: the others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn create(
    kvm: &Kvm,
    vm: &VmFd,
    id: u8,
    count: u8,
    entry: Option<u64>,
) -> Result<VcpuFd, VcpuError> {
    let err = |what| move |e| VcpuError::Kvm(id, what, e);
    let fd = vm.create_vcpu(id as u64).map_err(err("creating"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("reading the supported CPUID"))?;
    // KVM emulates the LAPIC's TSC-deadline mode but leaves announcing it to us. With it the
    // guest skips calibrating the LAPIC timer against the PIT or the TSC (a busy loop with
    // interrupts on, 100 ms of guest time, that was seen to never end in nested KVM).
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count; we run on a hypervisor.
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << CPUID_1_ECX_TSC_DEADLINE;
                }
            }
            0xb => e.edx = id as u32,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid).map_err(err("setting CPUID"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1), // fast strings
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fit");
    fd.set_msrs(&msrs).map_err(err("setting MSRs"))?;

    let mut lapic = fd.get_lapic().map_err(err("reading the LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[off + i] as u8;
        }
        let v = u32::from_le_bytes(b);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    fd.set_lapic(&lapic).map_err(err("setting the LAPIC"))?;

    if let Some(entry) = entry {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(err("setting the FPU"))?;
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK,
            rbp: layout::BOOT_STACK,
            rsi: layout::ZERO_PAGE,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(err("setting registers"))?;
        let mut sregs = fd.get_sregs().map_err(err("reading special registers"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xfffff,
            selector: 0x08,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        let tss = kvm_segment {
            selector: 0x18,
            type_: 0xb,
            s: 0,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = layout::GDT;
        sregs.gdt.limit = (crate::arch::BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = layout::IDT;
        sregs.idt.limit = 7;
        sregs.cr3 = layout::PML4;
        sregs.cr4 |= 0x20; // PAE
        sregs.cr0 |= 0x1 | 0x8000_0000; // PE, PG
        sregs.efer |= 0x100 | 0x400; // LME, LMA
        fd.set_sregs(&sregs)
            .map_err(err("setting special registers"))?;
    }
    Ok(fd)
}

/// Sets up vCPU `fd` to run flat 16-bit code at `addr` (for tests with tiny guests).
pub fn set_real_mode_entry(fd: &VcpuFd, addr: u64) -> Result<(), VcpuError> {
    let err = |what| move |e| VcpuError::Kvm(0, what, e);
    let mut sregs = fd.get_sregs().map_err(err("reading special registers"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs)
        .map_err(err("setting special registers"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: addr,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err("setting registers"))
}

/// Where the boot vCPU (id 0) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// In 64-bit mode as the Linux boot protocol enters the kernel, at this address.
    Long(u64),
    /// In flat 16-bit real mode at this address (tiny test guests).
    Real(u64),
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest asked KVM for a reset or power-off (a system event).
    Reset,
    /// The guest shut down by a triple fault (logged with the vCPU's state).
    Crash,
    /// KVM_RUN failed, or gave an exit the VMM does not handle.
    Failed(String),
}

/// What the vCPUs of a VM share: every vCPU's stats (each at its id) and the VM's pause.
#[derive(Debug, Clone)]
pub struct Shared {
    pub stats: Arc<Vec<VcpuStats>>,
    pub pause: Arc<Pause>,
}

/// A vCPU ready to run: its KVM fd, the devices its exits reach and its stats.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: DeviceBus,
    /// When the VMM started, for the boot timing line.
    started: Instant,
    /// Every vCPU's stats, this one's at index `id`.
    stats: Arc<Vec<VcpuStats>>,
    /// The VM's pause, checked before each entry.
    pause: Arc<Pause>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` in `vm`; the boot vCPU (id 0) starts at `entry`.
    pub fn new(
        vm: &Vm,
        id: u8,
        count: u8,
        entry: Entry,
        bus: DeviceBus,
        started: Instant,
        shared: Shared,
    ) -> Result<Vcpu, VcpuError> {
        let fd = match entry {
            Entry::Long(addr) if id == 0 => create(&vm.kvm, &vm.fd, id, count, Some(addr))?,
            Entry::Real(addr) if id == 0 => {
                let fd = create(&vm.kvm, &vm.fd, id, count, None)?;
                set_real_mode_entry(&fd, addr)?;
                fd
            }
            _ => create(&vm.kvm, &vm.fd, id, count, None)?,
        };
        Ok(Vcpu {
            id,
            fd,
            bus,
            started,
            stats: shared.stats,
            pause: shared.pause,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Puts back what a snapshot saved of this vCPU, before it first runs.
    pub fn restore(
        &self,
        state: &super::snapshot::VcpuState,
    ) -> Result<(), super::snapshot::SnapshotError> {
        state.restore(&self.fd)
    }

    /// Runs the vCPU on the calling thread until the guest ends it (or KVM fails): port I/O
    /// goes to the legacy devices, MMIO to the virtio-mmio windows.
    pub fn run(&mut self) -> VcpuEnd {
        let (id, stats) = (self.id, &self.stats[self.id as usize]);
        // SAFETY: pthread_self has no preconditions.
        stats.set_thread(unsafe { libc::pthread_self() });
        let mut first = true;
        loop {
            #[cfg(feature = "seccomp-trigger")]
            if id == 0 && crate::seccomp::trigger::vcpu_asked() {
                crate::seccomp::trigger::forbidden_syscall();
            }
            stats.maybe_sample(&self.fd);
            self.pause.check(id.into(), &mut self.fd);
            if first && id == 0 {
                crate::log_line!(
                    "first vCPU entry after {} ms",
                    self.started.elapsed().as_millis()
                );
                first = false;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    stats.record(ExitKind::Port, port.into());
                    self.bus.pio_write(port, data);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    stats.record(ExitKind::Port, port.into());
                    self.bus.pio_read(port, data)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    stats.record(ExitKind::Mmio, addr);
                    self.bus.mmio_read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    stats.record(ExitKind::Mmio, addr);
                    self.bus.mmio_write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    stats.record(ExitKind::Other, 0);
                    thread::sleep(Duration::from_millis(1))
                }
                Ok(VcpuExit::Shutdown) => {
                    // A triple fault: the guest cannot say why. KVM on AMD has already reset
                    // the vCPU here, so the registers read back as the reset state; the last
                    // exception and interrupt in the vCPU events are what tells the fault (on
                    // Intel the registers too).
                    crate::log_line!(
                        "vcpu{id}: guest shutdown (triple fault): {}",
                        crash_state(&self.fd)
                    );
                    let _ = std::io::stdout().flush();
                    return VcpuEnd::Crash;
                }
                Ok(VcpuExit::SystemEvent(..)) => return VcpuEnd::Reset,
                Ok(VcpuExit::Intr) => stats.record(ExitKind::Other, 0),
                Ok(other) => return VcpuEnd::Failed(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VcpuEnd::Failed(format!("KVM_RUN: {e}")),
            }
        }
    }
}
