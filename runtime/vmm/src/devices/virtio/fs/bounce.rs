//! The bounce area between a virtio-fs guest and virtiofsd: virtiofsd never maps guest
//! memory. It is given one memfd of the VMM's (its memory table has that region alone), with
//! a ring of the VMM's in it per queue (a shadow ring: the VMM is its driver). Each chain
//! the guest makes available is copied there (what the guest wrote, into one buffer; room
//! for the answer, a second one) and put on the shadow ring; what virtiofsd answers is
//! copied back into the guest's writable buffers when it gives the chain back, and the
//! guest's chain is used with that length.
//!
//! So guest memory needs no memfd: it may be anonymous, or a template file mapped privately
//! (clones share its pages even with a shared directory), and virtiofsd, which serves the
//! host's files, can neither read nor write the guest's memory beyond the requests it is
//! handed. The price is one copy of each request and each answer.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::AsRawFd,
    sync::atomic::{fence, Ordering},
};

use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{desc::split::Descriptor, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Entries of each shadow ring: a chain takes one or two, so half as many requests can be
/// with virtiofsd at once.
const RING_SIZE: u16 = 256;
/// Each ring's descriptor table, available ring and used ring take a page each.
const RING_BYTES: u64 = 3 * 4096;
/// Where the buffers start (after the rings of up to 4 queues).
const DATA_START: u64 = 4 * RING_BYTES;
/// Room for requests and answers: a FUSE request or answer is at most about 1 MiB (its
/// header and `max_write`, 1 MiB in virtiofsd), so several of the largest fit at once;
/// chains that do not fit now wait in the guest's ring until answers free room.
const DATA_BYTES: u64 = 4 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// What became of the guest's chains on one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Moved {
    /// Chains put on the shadow ring (virtiofsd is to be kicked).
    pub to_backend: usize,
    /// Chains given back to the guest at once, unanswered (bad buffers, or larger than the
    /// whole bounce area): the guest is to be interrupted.
    pub refused: usize,
}

/// One guest chain with virtiofsd.
#[derive(Debug)]
struct InFlight {
    guest_head: u16,
    /// The guest's writable buffers, in order.
    writable: Vec<(GuestAddress, u32)>,
    /// The shadow descriptors it took.
    descs: Vec<u16>,
    /// Its request's and its answer's bytes in the area.
    read: (u64, u64),
    write: (u64, u64),
}

/// One shadow ring: where its parts are, where the VMM stands on it.
#[derive(Debug)]
struct Ring {
    base: u64,
    avail_idx: u16,
    used_idx: u16,
    free_descs: Vec<u16>,
    in_flight: HashMap<u16, InFlight>,
}

impl Ring {
    fn new(base: u64) -> Ring {
        Ring {
            base,
            avail_idx: 0,
            used_idx: 0,
            free_descs: (0..RING_SIZE).rev().collect(),
            in_flight: HashMap::new(),
        }
    }

    fn desc(&self, i: u16) -> u64 {
        self.base + 16 * u64::from(i)
    }

    fn avail(&self) -> u64 {
        self.base + 4096
    }

    fn used(&self) -> u64 {
        self.base + 2 * 4096
    }
}

/// A first-fit allocator of the data area's bytes.
#[derive(Debug)]
struct Space {
    /// Free ranges: start -> length, never adjacent.
    free: BTreeMap<u64, u64>,
}

impl Space {
    fn new() -> Space {
        Space {
            free: BTreeMap::from([(DATA_START, DATA_BYTES)]),
        }
    }

    fn take(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return Some(DATA_START);
        }
        let (&at, &have) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&at);
        if have > len {
            self.free.insert(at + len, have - len);
        }
        Some(at)
    }

    fn give(&mut self, at: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut at, mut len) = (at, len);
        if let Some((&prev, &plen)) = self.free.range(..at).next_back() {
            if prev + plen == at {
                self.free.remove(&prev);
                (at, len) = (prev, plen + len);
            }
        }
        if let Some(&nlen) = self.free.get(&(at + len)) {
            self.free.remove(&(at + len));
            len += nlen;
        }
        self.free.insert(at, len);
    }
}

/// The bounce area and its shadow rings.
#[derive(Debug)]
pub(super) struct Bounce {
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    space: Space,
}

impl Bounce {
    /// A bounce area for `queues` queues (at most 4), in a memfd of its own.
    pub fn new(queues: usize) -> std::io::Result<Bounce> {
        assert!(queues <= 4, "the area has rings for 4 queues");
        let size = DATA_START + DATA_BYTES;
        let file = crate::vstate::vm::memfd(size, c"husk-virtio-fs-bounce")?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(std::io::Error::other)?;
        Ok(Bounce {
            mem,
            rings: (0..queues as u64)
                .map(|i| Ring::new(i * RING_BYTES))
                .collect(),
            space: Space::new(),
        })
    }

    /// virtiofsd's memory table: the area alone.
    pub fn region(&self) -> Result<VhostUserMemoryRegionInfo, String> {
        let r = self
            .mem
            .iter()
            .next()
            .ok_or("the bounce area has no region")?;
        let fo = r.file_offset().ok_or("the bounce area is not a memfd")?;
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            mmap_offset: fo.start(),
            mmap_handle: fo.file().as_raw_fd(),
        })
    }

    /// Shadow ring `q` as virtiofsd is told it (addresses in the VMM's mapping).
    pub fn ring_config(&self, q: usize) -> Result<VringConfigData, String> {
        let r = &self.rings[q];
        let host = |a: u64| -> Result<u64, String> {
            self.mem
                .get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|e| format!("the bounce area at {a:#x}: {e}"))
        };
        Ok(VringConfigData {
            queue_max_size: RING_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: host(r.desc(0))?,
            used_ring_addr: host(r.used())?,
            avail_ring_addr: host(r.avail())?,
            log_addr: None,
        })
    }

    pub fn ring_size(&self) -> u16 {
        RING_SIZE
    }

    /// Fresh rings, nothing with virtiofsd (a reset device; the backend's rings stopped).
    pub fn reset(&mut self) {
        for r in &mut self.rings {
            let _ = self
                .mem
                .write_slice(&[0u8; RING_BYTES as usize], GuestAddress(r.base));
            *r = Ring::new(r.base);
        }
        self.space = Space::new();
    }

    /// Moves the chains the guest made available on `queue` (ring `q`) onto the shadow
    /// ring, as long as there is room for them.
    pub fn forward(&mut self, q: usize, guest: &GuestMemoryMmap, queue: &mut Queue) -> Moved {
        let mut moved = Moved::default();
        while let Some(chain) = queue.pop_descriptor_chain(guest) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(usize::from(queue.size())).collect();
            match self.take_chain(q, guest, head, &descs) {
                Took::Yes => moved.to_backend += 1,
                Took::NoRoom => {
                    queue.go_to_previous_position();
                    break;
                }
                Took::Refused => {
                    let _ = queue.add_used(guest, head, 0);
                    moved.refused += 1;
                }
            }
        }
        moved
    }

    fn take_chain(
        &mut self,
        q: usize,
        guest: &GuestMemoryMmap,
        head: u16,
        descs: &[Descriptor],
    ) -> Took {
        // What the guest wrote, then room for the answer: its readable buffers come first.
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for d in descs {
            if !GuestMemoryBackend::check_range(guest, d.addr(), d.len() as usize) {
                return Took::Refused;
            }
            match d.is_write_only() {
                false if writable.is_empty() => readable.push((d.addr(), d.len())),
                false => return Took::Refused,
                true => writable.push((d.addr(), d.len())),
            }
        }
        let rlen: u64 = readable.iter().map(|&(_, l)| u64::from(l)).sum();
        let wlen: u64 = writable.iter().map(|&(_, l)| u64::from(l)).sum();
        let n_descs = usize::from(rlen > 0) + usize::from(wlen > 0);
        if n_descs == 0 || rlen + wlen > DATA_BYTES {
            return Took::Refused;
        }
        if self.rings[q].free_descs.len() < n_descs {
            return Took::NoRoom;
        }
        let Some(r_at) = self.space.take(rlen) else {
            return Took::NoRoom;
        };
        let Some(w_at) = self.space.take(wlen) else {
            self.space.give(r_at, rlen);
            return Took::NoRoom;
        };
        let mut at = r_at;
        let mut buf = Vec::new();
        for &(addr, len) in &readable {
            buf.resize(len as usize, 0);
            if guest.read_slice(&mut buf, addr).is_err()
                || self.mem.write_slice(&buf, GuestAddress(at)).is_err()
            {
                self.space.give(r_at, rlen);
                self.space.give(w_at, wlen);
                return Took::Refused;
            }
            at += u64::from(len);
        }
        let ring = &mut self.rings[q];
        let parts: Vec<(u64, u64, u16)> = [(r_at, rlen, 0), (w_at, wlen, F_WRITE)]
            .into_iter()
            .filter(|&(_, len, _)| len > 0)
            .collect();
        let ids: Vec<u16> = (0..parts.len())
            .map(|_| ring.free_descs.pop().expect("counted above"))
            .collect();
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let (flags, next) = match ids.get(i + 1) {
                Some(&n) => (flags | F_NEXT, n),
                None => (flags, 0),
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            let _ = self.mem.write_slice(&d, GuestAddress(ring.desc(ids[i])));
        }
        let slot = ring.avail() + 4 + 2 * u64::from(ring.avail_idx % RING_SIZE);
        let _ = self.mem.write_obj(ids[0].to_le(), GuestAddress(slot));
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        // The entry before the index that shows it.
        fence(Ordering::Release);
        let _ = self
            .mem
            .write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail() + 2));
        ring.in_flight.insert(
            ids[0],
            InFlight {
                guest_head: head,
                writable,
                descs: ids,
                read: (r_at, rlen),
                write: (w_at, wlen),
            },
        );
        Took::Yes
    }

    /// Gives back to the guest's `queue` the chains virtiofsd used on ring `q`, with its
    /// answers copied into their writable buffers; returns how many.
    pub fn complete(&mut self, q: usize, guest: &GuestMemoryMmap, queue: &mut Queue) -> usize {
        let ring = &mut self.rings[q];
        let Ok(used_idx) = self
            .mem
            .read_obj::<u16>(GuestAddress(ring.used() + 2))
            .map(u16::from_le)
        else {
            return 0;
        };
        // The entries after the index that shows them.
        fence(Ordering::Acquire);
        let mut done = 0;
        let mut buf = Vec::new();
        while ring.used_idx != used_idx {
            let slot = ring.used() + 4 + 8 * u64::from(ring.used_idx % RING_SIZE);
            ring.used_idx = ring.used_idx.wrapping_add(1);
            let (Ok(id), Ok(len)) = (
                self.mem.read_obj::<u32>(GuestAddress(slot)),
                self.mem.read_obj::<u32>(GuestAddress(slot + 4)),
            ) else {
                continue;
            };
            let Some(f) = u16::try_from(u32::from_le(id))
                .ok()
                .and_then(|id| ring.in_flight.remove(&id))
            else {
                // Not a chain of ours: virtiofsd is confused; nothing to give back.
                continue;
            };
            let mut left = u64::from(u32::from_le(len)).min(f.write.1);
            let mut from = f.write.0;
            let mut written = 0u32;
            for &(addr, cap) in &f.writable {
                if left == 0 {
                    break;
                }
                let n = u64::from(cap).min(left);
                buf.resize(n as usize, 0);
                if self.mem.read_slice(&mut buf, GuestAddress(from)).is_err()
                    || guest.write_slice(&buf, addr).is_err()
                {
                    break;
                }
                (from, left, written) = (from + n, left - n, written + n as u32);
            }
            let _ = queue.add_used(guest, f.guest_head, written);
            ring.free_descs.extend(f.descs.iter().rev());
            self.space.give(f.read.0, f.read.1);
            self.space.give(f.write.0, f.write.1);
            done += 1;
        }
        done
    }

    /// Chains with virtiofsd now, over every ring.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.rings.iter().map(|r| r.in_flight.len()).sum()
    }
}

enum Took {
    Yes,
    NoRoom,
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_taken_first_fit_and_merged_when_given_back() {
        let mut s = Space::new();
        let a = s.take(100).unwrap();
        let b = s.take(200).unwrap();
        let c = s.take(300).unwrap();
        assert_eq!((a, b, c), (DATA_START, DATA_START + 100, DATA_START + 300));
        s.give(b, 200);
        assert_eq!(s.take(150), Some(b), "first fit reuses the hole");
        s.give(b, 150);
        s.give(a, 100);
        s.give(c, 300);
        assert_eq!(s.free, BTreeMap::from([(DATA_START, DATA_BYTES)]));
        assert_eq!(s.take(DATA_BYTES + 1), None);
        assert_eq!(s.take(DATA_BYTES), Some(DATA_START));
        assert_eq!(s.take(1), None);
    }
}
