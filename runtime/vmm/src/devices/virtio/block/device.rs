//! The virtio-blk device: its features, configuration (the capacity) and requests, on
//! whatever backs the drive.

use crate::devices::virtio::FileArg;
use std::{fs::File, ops::Range, path::Path, sync::Arc};

use husk_vmm_api::drives::LAYERED_CAPACITY;
use virtio_queue::{desc::split::Descriptor, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    copy::{file_to_guest, guest_to_file},
    layers::{LayerError, Layers},
};
use crate::devices::virtio::{IoCounters, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;
const QUEUE_SIZES: &[u16] = &[256];
/// The most descriptors one request may have.
const MAX_DESCRIPTORS: usize = 258;

/// Errors giving a drive its backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening the drive file {0}")]
    Open(String, #[source] std::io::Error),
    #[error("drive {0:?} is layered: its layers come and go with add_layer and remove_layer")]
    Layered(String),
    #[error("the drive file {name} ({len} bytes) is bigger than the VMM's file size limit ({limit} bytes, its largest writable drive at start): writes past that would fail")]
    TooBig { name: String, len: u64, limit: u64 },
}

/// What backs a drive.
#[derive(Debug)]
enum Backing {
    /// An empty slot: a disk of size 0 on which I/O fails.
    Empty,
    /// One file; the disk is its whole sectors.
    File { file: File, sectors: u64 },
    /// Image layers on a read-only disk of [`LAYERED_CAPACITY`] bytes.
    Layers(Layers),
}

impl Backing {
    /// The disk's size in sectors.
    fn sectors(&self) -> u64 {
        match self {
            Backing::Empty => 0,
            Backing::File { sectors, .. } => *sectors,
            Backing::Layers(_) => LAYERED_CAPACITY / SECTOR,
        }
    }

    /// Reads the disk's bytes `offset..offset + len` (within its size) into guest memory.
    fn read(&self, mem: &GuestMemoryMmap, offset: u64, addr: GuestAddress, len: u64) -> bool {
        match self {
            Backing::Empty => false,
            Backing::File { file, .. } => file_to_guest(mem, file, offset, addr, len),
            Backing::Layers(l) => l.read(mem, offset, addr, len),
        }
    }

    /// Writes guest memory to the disk's bytes `offset..offset + len` (within its size).
    fn write(&self, mem: &GuestMemoryMmap, offset: u64, addr: GuestAddress, len: u64) -> bool {
        match self {
            Backing::File { file, .. } => guest_to_file(mem, file, offset, addr, len),
            Backing::Empty | Backing::Layers(_) => false,
        }
    }
}

/// A block device.
#[derive(Debug)]
pub struct Block {
    id: String,
    backing: Backing,
    read_only: bool,
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    irq: Option<Arc<IrqLine>>,
    counters: IoCounters,
}

impl Block {
    /// A drive with `path` as backing file, or an empty slot.
    pub fn new(id: &str, path: Option<&Path>, read_only: bool) -> Result<Block, BlockError> {
        let mut b = Block {
            id: id.to_string(),
            backing: Backing::Empty,
            read_only,
            mem: None,
            queue: None,
            irq: None,
            counters: IoCounters::default(),
        };
        if let Some(p) = path {
            b.set_backing(Some(FileArg::Path(p.to_path_buf())))?;
        }
        Ok(b)
    }

    /// A layered drive: read-only, [`LAYERED_CAPACITY`] bytes of zeros until layers come.
    pub fn layered(id: &str) -> Block {
        Block {
            id: id.to_string(),
            backing: Backing::Layers(Layers::new()),
            read_only: true,
            mem: None,
            queue: None,
            irq: None,
            counters: IoCounters::default(),
        }
    }

    /// Replaces the backing file (the caller then signals a configuration change). None
    /// empties the slot: the guest sees a disk of size 0, and I/O to it fails. A layered
    /// drive has no backing file to replace.
    pub fn set_backing(&mut self, file: Option<FileArg>) -> Result<(), BlockError> {
        if matches!(self.backing, Backing::Layers(_)) {
            return Err(BlockError::Layered(self.id.clone()));
        }
        let Some(file) = file else {
            self.backing = Backing::Empty;
            return Ok(());
        };
        let name = file.name();
        let file = file
            .open(!self.read_only)
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open(name.clone(), e))?
            .len();
        if !self.read_only {
            within_file_size_limit(&name, len, crate::jail::file_size_limit())?;
        }
        self.backing = Backing::File {
            file,
            sectors: len / SECTOR,
        };
        Ok(())
    }

    /// Puts the image file `file` on this layered drive; returns its byte range.
    pub fn add_layer(&mut self, file: FileArg) -> Result<Range<u64>, LayerError> {
        match &mut self.backing {
            Backing::Layers(l) => l.add(file),
            _ => Err(LayerError::NotLayered(self.id.clone())),
        }
    }

    /// Takes the layer that starts at byte `start` off this layered drive.
    pub fn remove_layer(&mut self, start: u64) -> Result<(), LayerError> {
        match &mut self.backing {
            Backing::Layers(l) => l.remove(start),
            _ => Err(LayerError::NotLayered(self.id.clone())),
        }
    }

    /// The drive's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn process(&mut self) {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queue.as_mut()) else {
            return;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(MAX_DESCRIPTORS).collect();
            let len = serve(
                mem,
                &descs,
                &self.backing,
                self.read_only,
                &self.id,
                &mut self.counters,
            );
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            if let Some(irq) = &self.irq {
                irq.signal_used();
            }
        }
    }
}

/// A writable drive of `len` bytes must fit under the file size limit `limit`: the kernel
/// refuses writes at offsets past it.
fn within_file_size_limit(name: &str, len: u64, limit: u64) -> Result<(), BlockError> {
    if len > limit {
        return Err(BlockError::TooBig {
            name: name.to_string(),
            len,
            limit,
        });
    }
    Ok(())
}

/// Serves one request; returns the bytes written into the guest's buffers.
#[cfg(test)]
fn handle_request(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    backing: &Backing,
    read_only: bool,
    id: &str,
) -> u32 {
    serve(
        mem,
        descs,
        backing,
        read_only,
        id,
        &mut IoCounters::default(),
    )
}

/// Serves one request, counting the bytes read and written into `counters`; returns the
/// bytes written into the guest's buffers.
fn serve(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    backing: &Backing,
    read_only: bool,
    id: &str,
    counters: &mut IoCounters,
) -> u32 {
    let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
        return 0;
    };
    if descs.len() < 2 || first.is_write_only() || first.len() < 16 || !last.is_write_only() {
        return 0;
    }
    let mut header = [0u8; 16];
    if mem.read_slice(&mut header, first.addr()).is_err() {
        return 0;
    }
    let typ = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let data = &descs[1..descs.len() - 1];
    let mut written = 0u32;
    let status = match typ {
        T_IN | T_OUT if matches!(backing, Backing::Empty) => S_IOERR,
        T_OUT if read_only => S_IOERR,
        T_IN | T_OUT => {
            // At most u64::MAX / SECTOR sectors: no overflow.
            let capacity = backing.sectors() * SECTOR;
            let mut offset = sector.saturating_mul(SECTOR);
            let mut status = S_OK;
            for d in data {
                let len = d.len() as u64;
                let end = offset.checked_add(len);
                if end.is_none_or(|e| e > capacity) || d.is_write_only() != (typ == T_IN) {
                    status = S_IOERR;
                    break;
                }
                let ok = if typ == T_IN {
                    backing.read(mem, offset, d.addr(), len)
                } else {
                    backing.write(mem, offset, d.addr(), len)
                };
                if !ok {
                    status = S_IOERR;
                    break;
                }
                if typ == T_IN {
                    written = written.saturating_add(d.len());
                    counters.to_guest += len;
                } else {
                    counters.from_guest += len;
                }
                offset += len;
            }
            status
        }
        T_FLUSH => match backing {
            Backing::File { file, .. } if !read_only => {
                if file.sync_all().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            _ => S_OK,
        },
        T_GET_ID => match data.first() {
            Some(d) if d.is_write_only() => {
                let mut idb = [0u8; 20];
                let n = id.len().min(20);
                idb[..n].copy_from_slice(&id.as_bytes()[..n]);
                let n = (d.len() as usize).min(20);
                if mem.write_slice(&idb[..n], d.addr()).is_ok() {
                    written = n as u32;
                    S_OK
                } else {
                    S_IOERR
                }
            }
            _ => S_IOERR,
        },
        _ => S_UNSUPP,
    };
    if mem.write_obj(status, last.addr()).is_ok() {
        written = written.saturating_add(1);
    }
    written
}

/// An error and its sources on one line, for the control API's answers.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn io_counters(&self) -> Option<IoCounters> {
        Some(self.counters)
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.backing.sectors().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, mut queues: Vec<Queue>, irq: Arc<IrqLine>) {
        self.mem = Some(mem);
        self.queue = queues.pop();
        self.irq = Some(irq);
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process();
    }

    fn reset(&mut self) {
        self.queue = None;
        self.mem = None;
    }

    fn update_backing(&mut self, file: Option<FileArg>) -> Result<(), String> {
        self.set_backing(file).map_err(|e| chain(&e))
    }

    fn add_layer(&mut self, file: FileArg) -> Result<Range<u64>, String> {
        Block::add_layer(self, file).map_err(|e| chain(&e))
    }

    fn remove_layer(&mut self, start: u64) -> Result<(), String> {
        Block::remove_layer(self, start).map_err(|e| chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as D;
    use vm_memory::GuestAddress;

    const WRITE: u16 = 2;

    fn desc(addr: u64, len: u32, flags: u16) -> D {
        D::new(addr, len, flags, 0)
    }

    fn setup() -> (GuestMemoryMmap, tempfile::NamedTempFile) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 8192];
        data[512..516].copy_from_slice(b"abcd");
        std::fs::write(f.path(), &data).unwrap();
        (mem, f)
    }

    fn header(mem: &GuestMemoryMmap, typ: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&typ.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x1000)).unwrap();
    }

    #[test]
    fn reads_writes_and_refusals() {
        let (mem, f) = setup();
        let file = File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let disk = Backing::File { file, sectors: 16 };
        header(&mem, T_IN, 1);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        assert_eq!(handle_request(&mem, &d, &disk, false, "x"), 513);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"abcd");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_OK);

        // Write, then read back from the file.
        header(&mem, T_OUT, 2);
        mem.write_slice(b"wxyz", GuestAddress(0x2000)).unwrap();
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, 0),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, &disk, false, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_OK);
        assert_eq!(&std::fs::read(f.path()).unwrap()[1024..1028], b"wxyz");

        // Read-only refuses writes; beyond the end and absurd sectors are I/O errors.
        handle_request(&mem, &d, &disk, true, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        header(&mem, T_IN, u64::MAX / 2);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, &disk, false, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // A buffer outside guest memory.
        header(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, 0),
            desc(0xfff_0000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, &disk, false, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // An empty slot.
        header(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, &Backing::Empty, false, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // Malformed chains are dropped without a status.
        assert_eq!(handle_request(&mem, &[], &Backing::Empty, false, "x"), 0);
        assert_eq!(
            handle_request(
                &mem,
                &[desc(0x1000, 4, 0), desc(0x3000, 1, WRITE)],
                &Backing::Empty,
                false,
                "x"
            ),
            0
        );
        // GET_ID and unknown types.
        header(&mem, T_GET_ID, 0);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 20, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, &Backing::Empty, false, "rootfs");
        let mut id = [0u8; 6];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"rootfs");
        header(&mem, 99, 0);
        handle_request(&mem, &d, &Backing::Empty, false, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_UNSUPP);
    }

    #[test]
    fn a_writable_drive_past_the_file_size_limit_is_refused() {
        assert!(within_file_size_limit("d", 1 << 20, 1 << 20).is_ok());
        let e = within_file_size_limit("/d.img", (1 << 20) + 1, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("the drive file /d.img (1048577 bytes) is bigger than the VMM's file size limit (1048576 bytes"), "{e}");
    }

    #[test]
    fn drive_update_sets_capacity() {
        let (_mem, f) = setup();
        let mut b = Block::new("slot", None, true).unwrap();
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        b.set_backing(Some(FileArg::Path(f.path().into()))).unwrap();
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        assert!(b
            .set_backing(Some(FileArg::Path("/nonexistent/disk".into())))
            .is_err());
        // None empties the slot again.
        b.set_backing(None).unwrap();
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        assert!(matches!(b.backing, Backing::Empty));
    }

    /// The device end to end on a real split ring in guest memory: a read chain, a write
    /// chain and one whose buffer lies outside guest memory, each answered on the used ring
    /// with its status, and the interrupt raised.
    #[test]
    fn requests_through_the_virtqueue() {
        use crate::devices::virtio::{testing::DriverQueue, IrqLine, VirtioDevice};
        let (mem, f) = setup();
        let mut b = Block::new("vda", Some(f.path()), false).unwrap();
        let mut q = DriverQueue::new(0x10000, 16);
        let irq = IrqLine::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        b.activate(mem.clone(), vec![q.device_queue(&mem)], irq.clone());
        // Status bytes start as neither OK nor IOERR, so each one checked was written.
        for a in [0x3000, 0x6000, 0x7000] {
            mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
        }

        // Read sector 1 (holds "abcd").
        header(&mem, T_IN, 1);
        let read = q.add_chain(
            &mem,
            &[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)],
        );
        b.queue_notify(0);
        assert_eq!(q.take_used(&mem), vec![(read, 513)]);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"abcd");
        let mut status = [0xffu8; 1];
        mem.read_slice(&mut status, GuestAddress(0x3000)).unwrap();
        assert_eq!(status, [S_OK]);
        assert_eq!(irq.evt.read().unwrap(), 1, "no interrupt");

        // Write sector 3, then check the file.
        mem.write_slice(&[0x5a; 512], GuestAddress(0x4000)).unwrap();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x5000)).unwrap();
        let write = q.add_chain(
            &mem,
            &[(0x5000, 16, false), (0x4000, 512, false), (0x6000, 1, true)],
        );
        b.queue_notify(0);
        assert_eq!(q.take_used(&mem), vec![(write, 1)]);
        mem.read_slice(&mut status, GuestAddress(0x6000)).unwrap();
        assert_eq!(status, [S_OK]);
        assert_eq!(
            std::fs::read(f.path()).unwrap()[3 * 512..4 * 512],
            [0x5a; 512]
        );

        // A data buffer beyond guest memory: an I/O error, and the device goes on.
        header(&mem, T_IN, 1);
        let bad = q.add_chain(
            &mem,
            &[(0x1000, 16, false), (1 << 40, 512, true), (0x7000, 1, true)],
        );
        b.queue_notify(0);
        let used = q.take_used(&mem);
        assert_eq!(used.len(), 1, "{used:?}");
        assert_eq!(used[0].0, bad);
        mem.read_slice(&mut status, GuestAddress(0x7000)).unwrap();
        assert_eq!(status, [S_IOERR]);
    }

    /// A status byte that is neither OK nor IOERR, so each one checked was written.
    const UNSET: u8 = 0xff;

    /// Serves one request of `typ` at `sector` with one data buffer of `len` bytes at
    /// 0x10_0000 (device-writable for reads); returns the status and bytes written.
    fn request(b: &Block, mem: &GuestMemoryMmap, typ: u32, sector: u64, len: u32) -> (u8, u32) {
        header(mem, typ, sector);
        mem.write_obj(UNSET, GuestAddress(0x3000)).unwrap();
        let flags = if typ == T_IN { WRITE } else { 0 };
        let d = [
            desc(0x1000, 16, 0),
            desc(0x10_0000, len, flags),
            desc(0x3000, 1, WRITE),
        ];
        let n = handle_request(mem, &d, &b.backing, b.read_only, &b.id);
        (mem.read_obj(GuestAddress(0x3000)).unwrap(), n)
    }

    /// `len` bytes of guest memory at `addr`.
    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A layered drive with layer A (5000 bytes of 0xaa) and layer B (4096 bytes of 0xbb),
    /// and 4 MiB of guest memory.
    fn layered() -> (
        GuestMemoryMmap,
        tempfile::TempDir,
        Block,
        Range<u64>,
        Range<u64>,
    ) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a.erofs"), dir.path().join("b.erofs"));
        std::fs::write(&pa, [0xaa; 5000]).unwrap();
        std::fs::write(&pb, [0xbb; 4096]).unwrap();
        let mut b = Block::layered("layers");
        let a = b.add_layer(FileArg::Path(pa.clone())).unwrap();
        let bb = b.add_layer(FileArg::Path(pb.clone())).unwrap();
        assert_eq!((a.start, a.end - a.start), (1 << 20, 8192));
        assert_eq!((bb.start, bb.end - bb.start), (2 << 20, 4096));
        (mem, dir, b, a, bb)
    }

    /// Bytes read and written are counted; a refused request is not.
    #[test]
    fn reads_and_writes_are_counted() {
        let (mem, f) = setup();
        let b = Block::new("vda", Some(f.path()), false).unwrap();
        let mut c = IoCounters::default();
        header(&mem, T_IN, 1);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        assert_eq!(serve(&mem, &d, &b.backing, false, "vda", &mut c), 513);
        header(&mem, T_OUT, 2);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 1024, 0),
            desc(0x3000, 1, WRITE),
        ];
        serve(&mem, &d, &b.backing, false, "vda", &mut c);
        // Past the end of the 16-sector disk.
        header(&mem, T_IN, 100);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        serve(&mem, &d, &b.backing, false, "vda", &mut c);
        assert_eq!(
            c,
            IoCounters {
                to_guest: 512,
                from_guest: 1024
            }
        );
        assert_eq!(b.io_counters(), Some(IoCounters::default()));
    }

    #[test]
    fn layered_drive_is_read_only_and_a_petabyte() {
        let mut b = Block::layered("layers");
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 50) / 512);
        // No backing file to replace, and no layers on a drive that is not layered.
        let e = b.update_backing(None).unwrap_err();
        assert!(e.contains("is layered"), "{e}");
        let (_, f) = setup();
        let mut plain = Block::new("vda", Some(f.path()), true).unwrap();
        let e = VirtioDevice::add_layer(&mut plain, FileArg::Path(f.path().into())).unwrap_err();
        assert_eq!(e, r#"drive "vda" is not layered"#);
        let e = VirtioDevice::remove_layer(&mut plain, 1 << 20).unwrap_err();
        assert_eq!(e, r#"drive "vda" is not layered"#);
        // Refusals carry their cause.
        let e = VirtioDevice::add_layer(&mut b, FileArg::Path("/nonexistent/l.erofs".into()))
            .unwrap_err();
        assert!(
            e.starts_with("opening the layer file /nonexistent/l.erofs: "),
            "{e}"
        );
        let e = VirtioDevice::remove_layer(&mut b, 1 << 20).unwrap_err();
        assert_eq!(e, "no layer starts at byte 1048576");
    }

    #[test]
    fn layered_reads_writes_and_flushes() {
        let (mem, dir, mut b, a, bb) = layered();
        // Nothing before the first layer: the boot-time partition probe reads zeros.
        mem.write_slice(&[UNSET; 4096], GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(request(&b, &mem, T_IN, 0, 4096), (S_OK, 4097));
        assert_eq!(guest_bytes(&mem, 0x10_0000, 4096), [0; 4096]);
        // A's unaligned tail: 904 bytes of file, then zeros up to the rounded length.
        mem.write_slice(&[UNSET; 4096], GuestAddress(0x10_0000))
            .unwrap();
        let sector = (a.start + 4096) / SECTOR;
        assert_eq!(request(&b, &mem, T_IN, sector, 4096), (S_OK, 4097));
        let got = guest_bytes(&mem, 0x10_0000, 4096);
        assert_eq!(got[..904], [0xaa; 904]);
        assert_eq!(got[904..], [0; 4096 - 904]);
        // Writes fail on a layer and in a hole, and leave the file alone; a flush is fine.
        assert_eq!(request(&b, &mem, T_OUT, a.start / SECTOR, 512).0, S_IOERR);
        assert_eq!(request(&b, &mem, T_OUT, 0, 512).0, S_IOERR);
        assert_eq!(
            std::fs::read(dir.path().join("a.erofs")).unwrap(),
            [0xaa; 5000]
        );
        assert_eq!(request(&b, &mem, T_FLUSH, 0, 0), (S_OK, 1));
        // The last sector reads; past it, and sectors whose byte offset overflows, fail.
        let last = (1u64 << 50) / SECTOR - 1;
        assert_eq!(request(&b, &mem, T_IN, last, 512), (S_OK, 513));
        for (sector, len) in [
            (last, 1024),
            (last + 1, 512),
            (u64::MAX / SECTOR, 512),
            (u64::MAX / SECTOR + 1, 512),
            (u64::MAX, 512),
            (last, u32::MAX),
        ] {
            let (status, n) = request(&b, &mem, T_IN, sector, len);
            assert_eq!(status, S_IOERR, "sector {sector}, {len} bytes");
            assert_eq!(n, 1, "sector {sector}, {len} bytes");
        }
        // B reads; once removed its range reads zeros, and A is unchanged.
        assert_eq!(request(&b, &mem, T_IN, bb.start / SECTOR, 512), (S_OK, 513));
        assert_eq!(guest_bytes(&mem, 0x10_0000, 512), [0xbb; 512]);
        b.remove_layer(bb.start).unwrap();
        assert_eq!(request(&b, &mem, T_IN, bb.start / SECTOR, 512), (S_OK, 513));
        assert_eq!(guest_bytes(&mem, 0x10_0000, 512), [0; 512]);
        assert_eq!(request(&b, &mem, T_IN, a.start / SECTOR, 512), (S_OK, 513));
        assert_eq!(guest_bytes(&mem, 0x10_0000, 512), [0xaa; 512]);
        // A new layer goes past B's old range, not into it.
        let c = b
            .add_layer(FileArg::Path(dir.path().join("b.erofs")))
            .unwrap();
        assert_eq!(c.start, 3 << 20);
    }

    /// One read through the device's queue from a hole, across A (and its zero tail), the
    /// hole up to B, all of B and past it, over buffers whose edges fall anywhere.
    #[test]
    fn layered_read_spanning_layers_and_holes_through_the_virtqueue() {
        use crate::devices::virtio::{testing::DriverQueue, IrqLine};
        let (mem, _dir, mut b, a, bb) = layered();
        let mut q = DriverQueue::new(0x10000, 16);
        let irq = IrqLine::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        b.activate(mem.clone(), vec![q.device_queue(&mem)], irq.clone());
        let offset = a.start - 1024;
        let total = bb.end + 1536 - offset;
        let first = 1024 + 3000 + 512;
        let second = 5 * 512;
        let third = total as u32 - first - second;
        mem.write_slice(&vec![UNSET; total as usize], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(UNSET, GuestAddress(0x3000)).unwrap();
        header(&mem, T_IN, offset / SECTOR);
        let head = q.add_chain(
            &mem,
            &[
                (0x1000, 16, false),
                (0x10_0000, first, true),
                (0x10_0000 + u64::from(first), second, true),
                (0x10_0000 + u64::from(first + second), third, true),
                (0x3000, 1, true),
            ],
        );
        b.queue_notify(0);
        assert_eq!(q.take_used(&mem), vec![(head, total as u32 + 1)]);
        assert_eq!(irq.evt.read().unwrap(), 1, "no interrupt");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_OK);
        let got = q.read_chain(&mem, head, total as u32 + 16);
        let got = &got[16..];
        let at = |x: u64| (x - offset) as usize;
        let expect = |r: Range<usize>, v: u8| {
            let bad = got[r.clone()].iter().position(|&x| x != v);
            assert_eq!(bad, None, "{r:?} should be {v:#x}");
        };
        expect(0..at(a.start), 0);
        expect(at(a.start)..at(a.start + 5000), 0xaa);
        expect(at(a.start + 5000)..at(bb.start), 0);
        expect(at(bb.start)..at(bb.end), 0xbb);
        expect(at(bb.end)..total as usize, 0);
    }
}
