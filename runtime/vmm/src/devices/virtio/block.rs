//! virtio-blk backed by a file: read-only or read-write, or an empty slot that gets its
//! backing file later (drive update), so containers created later in a pod get a rootfs
//! without hotplug.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::Path,
    sync::Arc,
};

use virtio_queue::{desc::split::Descriptor, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

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

/// Errors opening a backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening the drive file {0}")]
    Open(String, #[source] std::io::Error),
}

/// A block device.
#[derive(Debug)]
pub struct Block {
    id: String,
    file: Option<File>,
    read_only: bool,
    capacity: u64,
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    irq: Option<Arc<IrqLine>>,
}

impl Block {
    /// A drive with `path` as backing file, or an empty slot.
    pub fn new(id: &str, path: Option<&Path>, read_only: bool) -> Result<Block, BlockError> {
        let mut b = Block {
            id: id.to_string(),
            file: None,
            read_only,
            capacity: 0,
            mem: None,
            queue: None,
            irq: None,
        };
        if let Some(p) = path {
            b.set_backing(p)?;
        }
        Ok(b)
    }

    /// Replaces the backing file (the caller then signals a configuration change). An empty
    /// path empties the slot: the guest sees a disk of size 0, and I/O to it fails.
    pub fn set_backing(&mut self, path: &Path) -> Result<(), BlockError> {
        if path.as_os_str().is_empty() {
            self.file = None;
            self.capacity = 0;
            return Ok(());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.display().to_string(), e))?;
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open(path.display().to_string(), e))?
            .len();
        self.capacity = len / SECTOR;
        self.file = Some(file);
        Ok(())
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
            let len = handle_request(
                mem,
                &descs,
                self.file.as_ref(),
                self.read_only,
                self.capacity,
                &self.id,
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

/// Serves one request; returns the bytes written into the guest's buffers.
pub fn handle_request(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    file: Option<&File>,
    read_only: bool,
    capacity: u64,
    id: &str,
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
        T_IN | T_OUT => match file {
            None => S_IOERR,
            Some(_) if typ == T_OUT && read_only => S_IOERR,
            Some(f) => {
                let mut offset = sector.saturating_mul(SECTOR);
                let mut status = S_OK;
                for d in data {
                    let len = d.len() as u64;
                    let end = offset.checked_add(len);
                    if end.is_none_or(|e| e > capacity * SECTOR)
                        || d.is_write_only() != (typ == T_IN)
                    {
                        status = S_IOERR;
                        break;
                    }
                    let ok = if typ == T_IN {
                        copy_file_to_guest(mem, f, offset, d.addr(), len)
                    } else {
                        copy_guest_to_file(mem, f, offset, d.addr(), len)
                    };
                    if !ok {
                        status = S_IOERR;
                        break;
                    }
                    if typ == T_IN {
                        written = written.saturating_add(d.len());
                    }
                    offset += len;
                }
                status
            }
        },
        T_FLUSH => match file {
            Some(f) if !read_only => {
                if f.sync_all().is_ok() {
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

/// Copies in bounded chunks: the guest chooses the lengths.
fn copy_file_to_guest(
    mem: &GuestMemoryMmap,
    f: &File,
    off: u64,
    addr: GuestAddress,
    len: u64,
) -> bool {
    let mut buf = vec![0u8; len.min(64 * 1024) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if f.read_exact_at(&mut buf[..n], off + done).is_err() {
            return false;
        }
        if mem
            .write_slice(&buf[..n], GuestAddress(addr.0.wrapping_add(done)))
            .is_err()
        {
            return false;
        }
        done += n as u64;
    }
    true
}

fn copy_guest_to_file(
    mem: &GuestMemoryMmap,
    f: &File,
    off: u64,
    addr: GuestAddress,
    len: u64,
) -> bool {
    let mut buf = vec![0u8; len.min(64 * 1024) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if mem
            .read_slice(&mut buf[..n], GuestAddress(addr.0.wrapping_add(done)))
            .is_err()
        {
            return false;
        }
        if f.write_all_at(&buf[..n], off + done).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        let mut cfg = [0u8; 8];
        cfg.copy_from_slice(&self.capacity.to_le_bytes());
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

    fn update_backing(&mut self, path: &Path) -> Result<(), String> {
        self.set_backing(path).map_err(|e| {
            let src = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("{e}{src}")
        })
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
        header(&mem, T_IN, 1);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        assert_eq!(handle_request(&mem, &d, Some(&file), false, 16, "x"), 513);
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
        handle_request(&mem, &d, Some(&file), false, 16, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_OK);
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, 1024).unwrap();
        assert_eq!(&b, b"wxyz");

        // Read-only refuses writes; beyond the end and absurd sectors are I/O errors.
        handle_request(&mem, &d, Some(&file), true, 16, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        header(&mem, T_IN, u64::MAX / 2);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, Some(&file), false, 16, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // A buffer outside guest memory.
        header(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, 0),
            desc(0xfff_0000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, Some(&file), false, 16, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // An empty slot.
        header(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, 0),
            desc(0x2000, 512, WRITE),
            desc(0x3000, 1, WRITE),
        ];
        handle_request(&mem, &d, None, false, 0, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_IOERR);
        // Malformed chains are dropped without a status.
        assert_eq!(handle_request(&mem, &[], None, false, 0, "x"), 0);
        assert_eq!(
            handle_request(
                &mem,
                &[desc(0x1000, 4, 0), desc(0x3000, 1, WRITE)],
                None,
                false,
                0,
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
        handle_request(&mem, &d, None, false, 0, "rootfs");
        let mut id = [0u8; 6];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"rootfs");
        header(&mem, 99, 0);
        handle_request(&mem, &d, None, false, 0, "x");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), S_UNSUPP);
    }

    #[test]
    fn drive_update_sets_capacity() {
        let (_mem, f) = setup();
        let mut b = Block::new("slot", None, true).unwrap();
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        b.set_backing(f.path()).unwrap();
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        assert!(b.set_backing(Path::new("/nonexistent/disk")).is_err());
        // An empty path empties the slot again.
        b.set_backing(Path::new("")).unwrap();
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        assert!(b.file.is_none());
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
}
