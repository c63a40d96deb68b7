//! vCPU setup for the 64-bit Linux boot protocol.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::arch::layout;

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
