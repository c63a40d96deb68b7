//! The KVM state of a paused VM, saved and put back: the first piece of VM templates (a
//! booted, agent-ready VM saved once, then restored for each pod instead of booted).
//!
//! [`VcpuState`] is everything KVM keeps of one vCPU, [`VmState`] what it keeps of the VM
//! (the PIT, kvmclock, both PICs and the IOAPIC). Guest memory goes to a file of its own
//! ([`Vm::dump_memory`](super::vm::Vm::dump_memory)), which a restored VM maps privately
//! ([`Vm::from_memory_file`](super::vm::Vm::from_memory_file)): clones of one template share
//! the pages none of them wrote, through the host's page cache.
//!
//! Both are taken while no vCPU runs (KVM_GET_VCPU_EVENTS and KVM_GET_MP_STATE are only
//! consistent then) and put back before any vCPU runs, the VM's state after its vCPUs'
//! (restoring the LAPICs would undo interrupts the irqchip had pending), as Firecracker and
//! Cloud Hypervisor do.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::vcpu::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};

/// Why a state could not be read from KVM or put back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM took or gave fewer MSRs than asked: the first one it stopped at.
    #[error("{what} MSR {index:#x}: KVM stopped there ({done} of {asked})")]
    Msr {
        what: &'static str,
        index: u32,
        done: usize,
        asked: usize,
    },
    #[error("the saved CPUID has {0} entries (KVM takes at most {KVM_MAX_CPUID_ENTRIES})")]
    Cpuid(usize),
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// A file that is not a template of this VMM's, or a damaged one.
    #[error("not a husk VM template: {0}")]
    NotATemplate(String),
}

/// The MSRs a vCPU's state includes: those KVM lists as saved and restored across
/// migration (KVM_GET_MSR_INDEX_LIST) that a guest's run depends on, and the MTRRs (which
/// the list leaves out). Not the machine-check banks' control registers or anything KVM
/// emulates from the host's values.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| SnapshotError::Kvm("reading KVM's MSR index list", e))?;
    let mut indices: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| msr_is_state(i))
        .collect();
    // The MTRRs: the variable pairs, the fixed ranges, PAT's neighbour def type.
    for i in (0x200..0x210)
        .chain([0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b])
        .chain([0x26c, 0x26d, 0x26e, 0x26f, 0x277, 0x2ff])
    {
        if !indices.contains(&i) {
            indices.push(i);
        }
    }
    // The TSC deadline last: KVM arms the LAPIC timer from it against the guest's TSC, which
    // must be back by then (else the timer fires at once or far too late).
    indices.retain(|&i| i != MSR_IA32_TSC_DEADLINE);
    indices.push(MSR_IA32_TSC_DEADLINE);
    Ok(indices)
}

/// Whether MSR `i` is guest state worth saving (Firecracker's allowlist, by range): the TSC
/// and its adjustment, the APIC base, SYSENTER and SYSCALL, the segment bases, speculation
/// controls, the misc enable, PAT and EFER, x2APIC registers, and KVM's paravirtual MSRs
/// (kvmclock, async page faults, steal time, PV EOI). The TSC deadline is added last by
/// [`msr_indices`].
fn msr_is_state(i: u32) -> bool {
    matches!(i,
        0x10 | 0x1b | 0x3a | 0x3b | 0x48 | 0x174..=0x176 | 0x1a0 | 0x1d9 | 0x277 | 0x6e0
        | 0x800..=0x8ff | 0xc000_0080..=0xc000_0084 | 0xc000_0100..=0xc000_0103
        | 0x4b56_4d00..=0x4b56_4dff | 0x11..=0x12 | 0xda0)
}

/// Everything KVM keeps of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// In the order they are put back: the TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of vCPU `fd`, which must not be running, with the MSRs of `msrs`
    /// ([`msr_indices`]).
    pub fn save(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, SnapshotError> {
        let kvm = |what| move |e| SnapshotError::Kvm(what, e);
        // First: reading it makes KVM take the LAPIC's pending INIT/SIPI events, which can
        // change the rest.
        let mp_state = fd.get_mp_state().map_err(kvm("reading the MP state"))?;
        let regs = fd.get_regs().map_err(kvm("reading the registers"))?;
        let sregs = fd
            .get_sregs()
            .map_err(kvm("reading the special registers"))?;
        let xsave = fd.get_xsave().map_err(kvm("reading the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("reading the XCRs"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm("reading the debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm("reading the LAPIC"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("reading the CPUID"))?
            .as_slice()
            .to_vec();
        let mut saved = Vec::with_capacity(msrs.len());
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = Msrs::from_entries(&entries).expect("a chunk fits");
            let n = fd.get_msrs(&mut m).map_err(kvm("reading the MSRs"))?;
            if n != entries.len() {
                return Err(SnapshotError::Msr {
                    what: "reading",
                    index: entries[n].index,
                    done: n,
                    asked: entries.len(),
                });
            }
            saved.extend_from_slice(m.as_slice());
        }
        // A deadline of 0 with the timer in deadline mode is a tick the guest was promised
        // and KVM cleared when it fired, before the guest saw the interrupt: put back as is,
        // the timer would never fire again (Firecracker saw restored guests without ticks).
        // The TSC now makes it fire at once after the restore.
        let tsc = saved
            .iter()
            .find(|e| e.index == MSR_IA32_TSC)
            .map(|e| e.data);
        if let (Some(tsc), Some(deadline)) = (
            tsc,
            saved
                .iter_mut()
                .find(|e| e.index == MSR_IA32_TSC_DEADLINE && e.data == 0),
        ) {
            deadline.data = tsc;
        }
        // Last, once nothing else is read that could change it.
        let events = fd
            .get_vcpu_events()
            .map_err(kvm("reading the vCPU events"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs: saved,
            events,
        })
    }

    /// Puts the state back into vCPU `fd` (new, or not running), in the order KVM needs:
    /// CPUID before anything that depends on it, the registers before the pending events
    /// (setting them clears pending exceptions), the special registers (EFER, the APIC base)
    /// before the LAPIC, the LAPIC (its timer mode) before the MSRs (the TSC deadline), the
    /// TSC before the deadline.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let kvm = |what| move |e| SnapshotError::Kvm(what, e);
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Cpuid(self.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("setting the CPUID"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("setting the MP state"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm("setting the registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("setting the special registers"))?;
        // SAFETY: a kvm_xsave read from KVM_GET_XSAVE: the legacy 4 KiB area, which KVM reads
        // no further than (no AMX state: the guest's CPUID offers none).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("setting the XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("setting the XCRs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("setting the debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("setting the LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let m = Msrs::from_entries(chunk).expect("a chunk fits");
            let n = fd.set_msrs(&m).map_err(kvm("setting the MSRs"))?;
            if n != chunk.len() {
                return Err(SnapshotError::Msr {
                    what: "setting",
                    index: chunk[n].index,
                    done: n,
                    asked: chunk.len(),
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("setting the vCPU events"))?;
        // Tells a kvmclock guest that it was paused, so that its soft-lockup watchdog does not
        // take the time it spent saved for a hang. EINVAL when the guest uses no kvmclock.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

/// What KVM keeps of the VM beyond its vCPUs: the PIT, kvmclock and the interrupt
/// controllers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl VmState {
    /// Reads the VM's state; no vCPU may run.
    pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        let kvm = |what| move |e| SnapshotError::Kvm(what, e);
        let pit = vm.get_pit2().map_err(kvm("reading the PIT"))?;
        let mut clock = vm.get_clock().map_err(kvm("reading kvmclock"))?;
        // Only the clock's value is put back (KVM_SET_CLOCK takes no other flag we set).
        clock.flags = 0;
        let chip = |id| -> Result<kvm_irqchip, SnapshotError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(kvm("reading the interrupt controllers"))?;
            Ok(c)
        };
        Ok(VmState {
            pit,
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts the state back into `vm` (whose irqchip and PIT exist), after its vCPUs' states.
    /// kvmclock goes on from the saved value: the guest's monotonic time does not jump, and
    /// its wall clock lags until the guest is told the time.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let kvm = |what| move |e| SnapshotError::Kvm(what, e);
        vm.set_pit2(&self.pit).map_err(kvm("setting the PIT"))?;
        vm.set_clock(&self.clock).map_err(kvm("setting kvmclock"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(kvm("setting the interrupt controllers"))?;
        }
        Ok(())
    }
}

/// The end of a template file: the length of its state (JSON, just before) and this magic.
const TEMPLATE_MAGIC: &[u8; 8] = b"HUSKVMT1";
/// The state's format, in the file: a template of another version is refused.
const TEMPLATE_VERSION: u32 = 1;
/// More state than any VM of ours has (its vCPUs' XSAVE areas are the bulk, 4 KiB each).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// What a template file holds besides guest memory: a paused VM's vCPUs, its VM state and
/// each virtio-mmio transport's (in the VM's device order, with its id).
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// The guest memory's size: the file's first bytes.
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: Vec<(String, crate::devices::virtio::mmio::MmioState)>,
}

impl Snapshot {
    /// A snapshot of this format's version.
    pub fn new(
        memory_bytes: u64,
        vcpus: Vec<VcpuState>,
        vm: VmState,
        devices: Vec<(String, crate::devices::virtio::mmio::MmioState)>,
    ) -> Snapshot {
        Snapshot {
            version: TEMPLATE_VERSION,
            memory_bytes,
            vcpus,
            vm,
            devices,
        }
    }

    /// Writes the template file: `vm`'s guest memory from byte 0 (so that a restored VM
    /// maps it as it is; zero pages left as holes), then this state as JSON, then its
    /// length and the magic. No vCPU may run meanwhile.
    pub fn write(&self, vm: &super::vm::Vm, out: &mut std::fs::File) -> Result<(), SnapshotError> {
        use std::io::{Seek, SeekFrom, Write};
        let io = |what| move |e| SnapshotError::Io(what, e);
        vm.dump_memory(out).map_err(io("writing guest memory"))?;
        let json = serde_json::to_vec(self).expect("a snapshot serializes");
        out.seek(SeekFrom::Start(self.memory_bytes))
            .and_then(|_| out.write_all(&json))
            .and_then(|()| out.write_all(&(json.len() as u64).to_le_bytes()))
            .and_then(|()| out.write_all(TEMPLATE_MAGIC))
            .and_then(|()| out.sync_all())
            .map_err(io("writing the VM's state"))
    }

    /// Reads the state of the template file `file` (its guest memory stays in the file, for
    /// [`Vm::from_memory_file`](super::vm::Vm::from_memory_file)). A file that is not one,
    /// is cut short, or is of another version is refused, naming what is wrong.
    pub fn read(file: &std::fs::File) -> Result<Snapshot, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let bad = |why: String| SnapshotError::NotATemplate(why);
        let len = file
            .metadata()
            .map_err(|e| SnapshotError::Io("reading the template's size", e))?
            .len();
        let mut tail = [0u8; 16];
        if len < 16 {
            return Err(bad(format!("{len} bytes")));
        }
        file.read_exact_at(&mut tail, len - 16)
            .map_err(|e| SnapshotError::Io("reading the template's end", e))?;
        if &tail[8..] != TEMPLATE_MAGIC {
            return Err(bad("no template mark at its end".into()));
        }
        let json_len = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
        if json_len > MAX_STATE_BYTES || json_len > len - 16 {
            return Err(bad(format!(
                "a state of {json_len} bytes in a file of {len}"
            )));
        }
        let mut json = vec![0u8; json_len as usize];
        file.read_exact_at(&mut json, len - 16 - json_len)
            .map_err(|e| SnapshotError::Io("reading the template's state", e))?;
        let version = serde_json::from_slice::<serde_json::Value>(&json)
            .map_err(|e| bad(format!("its state is not JSON: {e}")))?
            .get("version")
            .and_then(|v| v.as_u64());
        if version != Some(u64::from(TEMPLATE_VERSION)) {
            return Err(bad(format!(
                "its state is of version {version:?}, this VMM reads {TEMPLATE_VERSION}"
            )));
        }
        let snap: Snapshot =
            serde_json::from_slice(&json).map_err(|e| bad(format!("its state: {e}")))?;
        if snap.memory_bytes != len - 16 - json_len {
            return Err(bad(format!(
                "{} bytes of guest memory before a state that starts at byte {}",
                snap.memory_bytes,
                len - 16 - json_len
            )));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::{vcpu, vm::Vm};

    const CODE: u64 = 0x1000;
    /// Where the guest keeps its count in memory (clear of the boot GDT and page tables).
    const COUNT: u64 = 0x3000;
    const PORT: u16 = 0x10;
    const DONE: u16 = 0x11;

    /// 64-bit code (entered as the Linux boot protocol enters a kernel): counts from 1 to
    /// 200 twice over, in ECX (stored at COUNT) and in R12D (passed through the stack),
    /// reports the R12D count on PORT each time, then writes DONE. (Not on the x87 or SSE
    /// registers: PVM's KVM, on the development hosts, fails such a guest's first x87
    /// instruction with an internal error.)
    #[rustfmt::skip]
    const COUNTER: &[u8] = &[
        0x31, 0xc9,                                     // xor ecx, ecx
        0x45, 0x31, 0xe4,                               // xor r12d, r12d
        0xff, 0xc1,                                     // l: inc ecx
        0x41, 0xff, 0xc4,                               // inc r12d
        0x89, 0x0c, 0x25, 0x00, 0x30, 0x00, 0x00,       // mov [0x3000], ecx
        0x41, 0x54,                                     // push r12
        0x58,                                           // pop rax
        0x66, 0xe7, PORT as u8,                         // out PORT, ax
        0x3d, 0xc8, 0x00, 0x00, 0x00,                   // cmp eax, 200
        0x75, 0xe7,                                     // jne l
        0xe6, DONE as u8,                               // out DONE, al
        0xf4,                                           // hlt
    ];

    fn need_kvm() {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "this test needs /dev/kvm (CI machines have it)"
        );
    }

    /// Runs `fd` until the guest reports `until` on PORT (or is done, with `None`); returns
    /// the last count reported.
    fn run_until(fd: &mut VcpuFd, until: Option<u16>) -> u16 {
        let mut last = 0;
        loop {
            match fd.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) if port == PORT => {
                    last = u16::from_le_bytes([data[0], data[1]]);
                    if Some(last) == until {
                        return last;
                    }
                }
                VcpuExit::IoOut(DONE, _) => return last,
                other => {
                    let other = format!("{other:?}");
                    panic!(
                        "unexpected exit {other} after {last}, rip {:#x}",
                        fd.get_regs().map(|r| r.rip).unwrap_or(0)
                    )
                }
            }
        }
    }

    #[test]
    fn a_vm_saved_mid_run_goes_on_where_it_was_from_its_state_and_memory_file() {
        need_kvm();
        let dir = tempfile::tempdir().unwrap();
        let mem_path = dir.path().join("memory");

        // The template: run to 100, then save everything.
        let (vcpu_state, vm_state) = {
            let vm = Vm::new(16).unwrap();
            vm.mem.write_slice(COUNTER, GuestAddress(CODE)).unwrap();
            crate::arch::write_boot_tables(&vm.mem).unwrap();
            let mut fd = vcpu::create(&vm.kvm, &vm.fd, 0, 1, Some(CODE)).unwrap();
            assert_eq!(run_until(&mut fd, Some(100)), 100);
            let msrs = msr_indices(&vm.kvm).unwrap();
            assert_eq!(msrs.last(), Some(&MSR_IA32_TSC_DEADLINE));
            let vcpu_state = VcpuState::save(&fd, &msrs).unwrap();
            let vm_state = VmState::save(&vm.fd).unwrap();
            let mut file = std::fs::File::create(&mem_path).unwrap();
            vm.dump_memory(&mut file).unwrap();
            (vcpu_state, vm_state)
        };
        // Through the state file's format and back.
        let json = serde_json::to_vec(&(&vcpu_state, &vm_state)).unwrap();
        let (vcpu_state, vm_state): (VcpuState, VmState) = serde_json::from_slice(&json).unwrap();
        assert!(
            vcpu_state
                .msrs
                .iter()
                .any(|m| m.index == MSR_IA32_TSC && m.data > 0),
            "the guest's TSC is saved"
        );

        // Two clones from the same files: each counts on from 101 to 200 on its own.
        let mut file = std::fs::File::open(&mem_path).unwrap();
        let size = file.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(size, 16 << 20);
        for clone in 0..2 {
            let vm = Vm::from_memory_file(std::fs::File::open(&mem_path).unwrap()).unwrap();
            assert_eq!(vm.mem.read_obj::<u16>(GuestAddress(COUNT)).unwrap(), 100);
            let mut fd = vm.fd.create_vcpu(0).unwrap();
            vcpu_state.restore(&fd).unwrap();
            vm_state.restore(&vm.fd).unwrap();
            let next = match fd.run().expect("KVM_RUN") {
                VcpuExit::IoOut(PORT, data) => u16::from_le_bytes([data[0], data[1]]),
                other => panic!("clone {clone}: unexpected first exit {other:?}"),
            };
            assert_eq!(next, 101, "clone {clone} goes on where the template was");
            assert_eq!(
                run_until(&mut fd, None),
                200,
                "clone {clone} counts to its end"
            );
            assert_eq!(vm.mem.read_obj::<u16>(GuestAddress(COUNT)).unwrap(), 200);
        }
        // The clones wrote their own copies: the template's file is as it was saved.
        let template = Vm::from_memory_file(std::fs::File::open(&mem_path).unwrap()).unwrap();
        assert_eq!(
            template.mem.read_obj::<u16>(GuestAddress(COUNT)).unwrap(),
            100
        );
    }

    #[test]
    fn a_memory_file_of_no_whole_mib_is_refused() {
        need_kvm();
        for len in [0, 1 << 20 | 1, 3073 << 20] {
            let file = tempfile::tempfile().unwrap();
            file.set_len(len).unwrap();
            match Vm::from_memory_file(file) {
                Err(crate::vstate::vm::VmError::MemoryFileSize(n)) => assert_eq!(n, len),
                other => panic!("{len} bytes: {:?}", other.map(|_| ())),
            }
        }
    }
}
