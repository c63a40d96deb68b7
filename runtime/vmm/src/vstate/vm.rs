//! The KVM VM: guest memory, the in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    mmap::MmapRegionBuilder, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};
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
    #[error("guest memory of {0} MiB is too large (at most 3072 MiB, below the MMIO hole)")]
    TooMuchMemory(u64),
    #[error("registering guest memory with KVM")]
    MemoryRegion(#[source] kvm_ioctls::Error),
    #[error("reading the guest memory file")]
    MemoryFile(#[source] std::io::Error),
    #[error("the guest memory file is {0} bytes: not a whole number of MiB from 1 to 3072")]
    MemoryFileSize(u64),
    #[error("mapping {0} MiB of guest memory from its file")]
    MemoryMap(u64, #[source] vm_memory::mmap::MmapRegionError),
    #[error("registering an irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
}

/// The most guest memory: it must end below the MMIO hole at 3 GiB.
const MAX_MEMORY_MIB: u64 = 3072;

/// A memfd of `size` bytes named `name`, sealed so that it can neither shrink nor grow (a
/// backend that maps it can trust its size).
pub(crate) fn memfd(size: u64, name: &std::ffi::CStr) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the fd it returns is ours.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
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

/// At most this many mappings of a template's data extents (far below the kernel's default
/// limit of 65530 per process): beyond it, the narrowest holes between extents are mapped
/// from the file with them (a hole read through a file mapping costs the file a page where
/// the file system is tmpfs).
const MAX_EXTENT_MAPS: usize = 8192;

/// Guest memory of `len` bytes from a template `file`'s first `len` bytes, mapped privately:
/// anonymous memory, with the file's data extents (SEEK_DATA, SEEK_HOLE, in whole pages)
/// mapped over it. Its holes (the guest's zero pages) are never read from the file: a
/// private mapping of a hole in a tmpfs file gives the file a page at the first touch,
/// charged to the VMM's cgroup, on top of the copy the guest's write makes (a clone that
/// wrote most of its memory was killed at its cgroup's limit, charged twice).
fn map_template(file: &std::fs::File, len: u64) -> Result<GuestMemoryMmap, VmError> {
    use std::os::fd::AsRawFd;
    let mem_mib = len >> 20;
    if len == 0 || !len.is_multiple_of(1 << 20) || mem_mib > MAX_MEMORY_MIB {
        return Err(VmError::MemoryFileSize(len));
    }
    let extents = coalesce(
        data_extents(file, len).map_err(VmError::MemoryFile)?,
        MAX_EXTENT_MAPS,
    );
    let region = MmapRegionBuilder::new(len as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| VmError::MemoryMap(mem_mib, e))?;
    let base = region.as_ptr();
    for (start, end) in extents {
        // SAFETY: [start, end) lies within the region's `len` bytes (extents stop at `len`),
        // a mapping of ours that nothing uses yet; MAP_FIXED replaces that part of it with
        // the file's pages, and the region's unmapping at its drop takes them too.
        let p = unsafe {
            libc::mmap(
                base.add(start as usize).cast(),
                (end - start) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::MemoryFile(std::io::Error::last_os_error()));
        }
    }
    let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("at 0, no overflow");
    Ok(GuestMemoryMmap::from_regions(vec![region]).expect("one region"))
}

/// `extents` (in order, apart), as at most `max` by joining those the narrowest holes part.
fn coalesce(mut extents: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = 4096u64;
    while extents.len() > max {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for (start, end) in extents {
            match out.last_mut() {
                Some(last) if start <= last.1 + gap => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        extents = out;
        gap *= 4;
    }
    extents
}

/// The data extents of `file`'s first `len` bytes, widened to whole pages.
fn data_extents(file: &std::fs::File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    const PAGE: u64 = 4096;
    let fd = file.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on an fd we hold.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let start = data / PAGE * PAGE;
        let end = (hole as u64).min(len).next_multiple_of(PAGE).min(len);
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
        at = end.max(data + 1);
    }
    Ok(out)
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
    /// PIT. The memory is an anonymous MAP_NORESERVE mapping, so the host pays only for pages
    /// the guest touches; no other process maps it (virtio-fs goes through a bounce area).
    pub fn new(mem_mib: u64) -> Result<Vm, VmError> {
        if mem_mib > MAX_MEMORY_MIB {
            return Err(VmError::TooMuchMemory(mem_mib));
        }
        let size = (mem_mib << 20) as usize;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| VmError::Memory(mem_mib, e))?;
        Vm::with_memory(mem)
    }

    /// Creates a VM whose memory is `file` (a template's, from [`Vm::dump_memory`]) mapped
    /// privately: the guest reads the file's pages through the host's page cache, shared
    /// with every other VM mapped from it, and its writes go to pages of its own. The file
    /// must not change while any such VM lives.
    pub fn from_memory_file(file: std::fs::File) -> Result<Vm, VmError> {
        let len = file.metadata().map_err(VmError::MemoryFile)?.len();
        Vm::from_memory_file_part(file, len)
    }

    /// [`Vm::from_memory_file`] of the first `len` bytes of `file` (a template's, whose
    /// state follows its memory).
    pub fn from_memory_file_part(file: std::fs::File, len: u64) -> Result<Vm, VmError> {
        Vm::with_memory(map_template(&file, len)?)
    }

    /// The VM around `mem`: KVM's VM, its irqchip and PIT, the memory registered.
    fn with_memory(mem: GuestMemoryMmap) -> Result<Vm, VmError> {
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

    /// Where guest memory ends: the length of the file [`Vm::dump_memory`] writes.
    pub fn memory_len(&self) -> u64 {
        self.mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0)
    }

    /// Writes guest memory to `out`, from its start: what [`Vm::from_memory_file`] maps.
    /// Pages that are all zeros are left as holes (a sparse file that reads back as zeros).
    /// No vCPU may run meanwhile.
    pub fn dump_memory(&self, out: &mut std::fs::File) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        const CHUNK: usize = 64 << 10;
        let mut buf = vec![0u8; CHUNK];
        let mut len = 0;
        out.set_len(0)?;
        for region in self.mem.iter() {
            let start = region.start_addr().0;
            let mut off = 0;
            while off < region.len() {
                let n = CHUNK.min((region.len() - off) as usize);
                self.mem
                    .read_slice(&mut buf[..n], GuestAddress(start + off))
                    .map_err(std::io::Error::other)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    out.seek(SeekFrom::Start(start + off))?;
                    out.write_all(&buf[..n])?;
                }
                off += n as u64;
            }
            len = len.max(start + region.len());
        }
        out.set_len(len)?;
        out.sync_all()
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    /// A template on tmpfs (/dev/shm): its data is the guest's, its holes read as zero, the
    /// guest's writes stay its own, and touching every page gives the file no page (its
    /// holes are anonymous memory, not read from it).
    #[test]
    fn a_template_maps_its_data_and_leaves_its_holes_anonymous() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("memory");
        let f = std::fs::File::create_new(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 10000], 3 << 20).unwrap();
        f.write_all_at(&[3u8; 4096], (8 << 20) - 4096).unwrap();
        f.write_all_at(&[4u8; 4096], 5 << 20).unwrap();
        f.write_all_at(&[4u8; 4096], (5 << 20) + 16384).unwrap();
        let blocks = f.metadata().unwrap().blocks();
        assert_eq!(
            data_extents(&f, 8 << 20).unwrap(),
            [
                (0, 4096),
                (3 << 20, (3 << 20) + 12288),
                (5 << 20, (5 << 20) + 4096),
                ((5 << 20) + 16384, (5 << 20) + 20480),
                ((8 << 20) - 4096, 8 << 20)
            ]
        );
        let mem = map_template(&std::fs::File::open(&path).unwrap(), 8 << 20).unwrap();
        let mut all = vec![0u8; 8 << 20];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        let mut want = vec![0u8; 8 << 20];
        want[..4096].fill(1);
        want[3 << 20..(3 << 20) + 10000].fill(2);
        want[5 << 20..(5 << 20) + 4096].fill(4);
        want[(5 << 20) + 16384..(5 << 20) + 20480].fill(4);
        want[(8 << 20) - 4096..].fill(3);
        assert!(all == want, "guest memory differs from the file");
        mem.write_slice(&[9u8; 8 << 20], GuestAddress(0)).unwrap();
        assert_eq!(f.metadata().unwrap().blocks(), blocks, "the file got pages");
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 4], "the guest's write reached the file");
        assert!(matches!(
            map_template(&f, (8 << 20) + 1),
            Err(VmError::MemoryFileSize(_))
        ));
    }

    /// Too many extents: the narrowest holes go first, until few enough are left.
    #[test]
    fn too_many_extents_are_joined_across_the_narrowest_holes() {
        let e = vec![
            (0, 4096),
            (8192, 12288),
            (1 << 20, (1 << 20) + 4096),
            (4 << 20, 5 << 20),
        ];
        assert_eq!(coalesce(e.clone(), 4), e);
        assert_eq!(
            coalesce(e.clone(), 3),
            [(0, 12288), (1 << 20, (1 << 20) + 4096), (4 << 20, 5 << 20)]
        );
        assert_eq!(coalesce(e.clone(), 1), [(0, 5 << 20)]);
    }
}
