//! Crash diagnostics: what a vCPU's state says after the guest died without a word (a
//! triple fault), in one log line.

use kvm_ioctls::VcpuFd;

/// A vCPU's registers and pending events, in one line, for a guest that crashed.
pub(super) fn crash_state(fd: &VcpuFd) -> String {
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
