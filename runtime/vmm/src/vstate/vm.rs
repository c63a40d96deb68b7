//! The KVM VM: guest memory, the in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("creating the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("{0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("allocating {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("making {0} MiB of shareable guest memory (a memfd)")]
    SharedMemory(u64, #[source] std::io::Error),
    #[error("guest memory of {0} MiB is too large (at most 3072 MiB, below the MMIO hole)")]
    TooMuchMemory(u64),
    #[error("registering guest memory with KVM")]
    MemoryRegion(#[source] kvm_ioctls::Error),
    #[error("registering an irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
}

/// A memfd of `size` bytes, sealed so that it can neither shrink nor grow (a backend that
/// maps it can trust its size).
fn memfd(size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the fd it returns is ours.
    let fd = unsafe {
        libc::memfd_create(
            c"husk-guest-memory".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// A KVM VM and its memory.
#[derive(Debug)]
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
}

impl Vm {
    /// Creates a VM with `mem_mib` MiB of memory at guest address 0, an in-kernel irqchip and
    /// PIT. The memory is a MAP_NORESERVE mapping, so the host pays only for pages the guest
    /// touches: anonymous, or, if `shared`, of a memfd (sealed at its size) that a vhost-user
    /// backend can map too.
    pub fn new(mem_mib: u64, shared: bool) -> Result<Vm, VmError> {
        if mem_mib > 3072 {
            return Err(VmError::TooMuchMemory(mem_mib));
        }
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(|e| VmError::Setup("setting the TSS address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("creating the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Setup("creating the in-kernel PIT", e))?;
        let size = (mem_mib << 20) as usize;
        let mem = match shared {
            false => GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
                .map_err(|e| VmError::Memory(mem_mib, e))?,
            true => {
                let file = memfd(size as u64).map_err(|e| VmError::SharedMemory(mem_mib, e))?;
                let fo = FileOffset::new(file, 0);
                GuestMemoryMmap::<()>::from_ranges_with_files(&[(GuestAddress(0), size, Some(fo))])
                    .map_err(|e| VmError::Memory(mem_mib, e))?
            }
        };
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which lives as long as the
            // VM (both are fields of `Vm`), and the slots do not overlap.
            unsafe { fd.set_user_memory_region(r) }.map_err(VmError::MemoryRegion)?;
        }
        Ok(Vm { kvm, fd, mem })
    }

    /// Makes writes to `evt` raise the guest interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))
    }

    /// The host address range of guest memory (for memory accounting).
    pub fn host_range(&self) -> (u64, u64) {
        let r = self.mem.iter().next().expect("one region");
        (r.as_ptr() as u64, r.len())
    }
}
