//! Test helpers: the driver's side of a split virtqueue, laid out in guest memory by hand
//! (descriptor table, available ring, used ring) so device code runs on real rings.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
pub const F_INDIRECT: u16 = 4;

/// One buffer of a chain: guest address, length, device-writable.
pub type Buf = (u64, u32, bool);

/// A driver's view of one split virtqueue of `size` entries at `base` (the descriptor table,
/// then the available ring one page on, then the used ring one more page on).
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_idx: u16,
    /// The buffers of each chain made available, by head index.
    chains: Vec<Vec<Buf>>,
}

impl DriverQueue {
    pub fn new(base: u64, size: u16) -> Self {
        assert!(size <= 256, "the descriptor table must fit in a page");
        DriverQueue {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_idx: 0,
            chains: vec![Vec::new(); size as usize],
        }
    }

    /// The device's side, set up as a driver does through the transport.
    pub fn device_queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(self.size).expect("a power of two");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Writes descriptor `index` as it is.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    /// Makes a chain of `bufs` available; returns its head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= self.size as usize);
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(mem, index, (addr, len, flags, next));
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.chains[head as usize] = bufs.to_vec();
        self.publish(mem, head);
        head
    }

    /// Puts `head` on the available ring, whatever the descriptor table holds there.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The chains the device used since the last call: (head, bytes written).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        let mut out = Vec::new();
        while self.used_idx != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
            let id = u32::from_le(mem.read_obj(GuestAddress(e)).unwrap());
            let len = u32::from_le(mem.read_obj(GuestAddress(e + 4)).unwrap());
            out.push((id as u16, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        out
    }

    /// The first `len` bytes the device wrote into the chain at `head`, gathered from its
    /// buffers in order.
    pub fn read_chain(&self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, blen, _) in &self.chains[head as usize] {
            let n = left.min(blen as usize);
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            left -= n;
        }
        out
    }
}
