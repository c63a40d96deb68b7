//! The virtio-vsock packet: its header, the one way we build headers for the guest, and
//! packets in and out of guest buffers (a TX chain's header read and its payload left in
//! place, an RX packet's payload read from the host straight into a chain's buffers and its
//! header written in front of it).

use std::{io::Write, os::unix::net::UnixStream};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError,
    WriteVolatile,
};

use super::connection::{Key, BUF_ALLOC};

/// The host's CID.
pub(super) const HOST_CID: u64 = 2;
/// The size of a virtio-vsock packet header.
pub const HDR_LEN: usize = 44;
pub(super) const TYPE_STREAM: u16 = 1;
/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub(super) const SHUTDOWN_SEND: u32 = 2;
/// The largest payload we accept in one packet from the guest.
pub(super) const MAX_PKT: usize = 64 * 1024;

/// A vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub typ: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses a header from the start of `b`.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2"));
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            typ: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.typ.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a packet from the host side of connection `key` to the guest `cid`: no
    /// payload (data packets set `len`), our [`BUF_ALLOC`] and `fwd_cnt` as the credit we
    /// give. Every packet we send the guest, replies to packets of connections we do not
    /// know included, starts with one of these.
    pub(super) fn from_host(cid: u64, key: Key, op: u16, flags: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            typ: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }
}

/// The payload of a packet from the guest: where its bytes are. The device's packets point
/// into guest memory, at the buffers of their TX chain (checked to be guest memory), and
/// their bytes are copied once, straight to where they go; tests and fuzzers hand in bytes.
#[derive(Debug, Clone)]
pub(super) enum Payload<'a> {
    Bytes(&'a [u8]),
    Guest {
        mem: &'a GuestMemoryMmap,
        /// The payload's pieces in order, each all guest memory.
        bufs: Vec<(GuestAddress, usize)>,
    },
}

impl<'a, T: AsRef<[u8]> + ?Sized> From<&'a T> for Payload<'a> {
    fn from(b: &'a T) -> Payload<'a> {
        Payload::Bytes(b.as_ref())
    }
}

impl Payload<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Guest { bufs, .. } => bufs.iter().map(|b| b.1).sum(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the payload to `w` as far as it takes it now, in order, and returns how much
    /// it took; an error only when it took nothing (WouldBlock: it takes nothing now).
    pub(super) fn write_to(&self, w: &mut UnixStream) -> std::io::Result<usize> {
        match self {
            Payload::Bytes([]) => Ok(0),
            Payload::Bytes(b) => retry_eintr(|| w.write(b)),
            Payload::Guest { mem, bufs } => {
                let mut done = 0;
                for slice in bufs.iter().flat_map(|&(a, len)| mem.get_slices(a, len)) {
                    let written = slice.map_err(std::io::Error::other).and_then(|s| {
                        retry_eintr(|| w.write_volatile(&s).map_err(volatile_to_io))
                            .map(|n| (n, s.len()))
                    });
                    match written {
                        Ok((n, len)) => {
                            done += n;
                            if n < len {
                                break;
                            }
                        }
                        Err(e) if done == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                Ok(done)
            }
        }
    }

    /// Appends the payload from byte `from` on to `out`.
    pub(super) fn append_to(&self, from: usize, out: &mut Vec<u8>) {
        match self {
            Payload::Bytes(b) => out.extend_from_slice(&b[from.min(b.len())..]),
            Payload::Guest { mem, bufs } => {
                let mut skip = from;
                for &(addr, len) in bufs {
                    if skip >= len {
                        skip -= len;
                        continue;
                    }
                    let addr = GuestAddress(addr.0 + skip as u64);
                    for slice in mem.get_slices(addr, len - skip).flatten() {
                        // Into the Vec's spare capacity: cannot fail.
                        let _ = out.write_volatile(&slice);
                    }
                    skip = 0;
                }
            }
        }
    }
}

/// Runs `f` again while it is interrupted by a signal.
fn retry_eintr(mut f: impl FnMut() -> std::io::Result<usize>) -> std::io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn volatile_to_io(e: VolatileMemoryError) -> std::io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        e => std::io::Error::other(e),
    }
}

/// Reads the packet in the guest's TX descriptors `descs` (a chain is one buffer: the header
/// and the payload may be split anywhere): its header, and where in guest memory its payload
/// is, up to [`MAX_PKT`] bytes and the header's `len` (bytes past `len` are not payload),
/// stopping at the first device-writable descriptor. Only the header is copied. None if a
/// descriptor is not all guest memory, or the chain is shorter than a header.
pub(super) fn read_tx_chain(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
) -> Option<(Header, Payload<'_>)> {
    let mut bufs = Vec::new();
    let mut total = 0;
    for d in descs {
        if d.is_write_only() {
            break;
        }
        // A buffer that is not all guest memory (outside it, or of an absurd length)
        // makes the whole packet invalid, whatever part of it we would read.
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return None;
        }
        let room = HDR_LEN + MAX_PKT - total;
        let n = (d.len() as usize).min(room);
        if n > 0 {
            bufs.push((d.addr(), n));
        }
        total += n;
        if room == n {
            break;
        }
    }
    if total < HDR_LEN {
        return None;
    }
    // The header, from the first buffers; the payload is what follows it.
    let mut hdr = [0u8; HDR_LEN];
    let mut at = 0;
    let mut payload = Vec::new();
    for (addr, len) in bufs {
        let take = len.min(HDR_LEN - at);
        if take > 0 {
            mem.read_slice(&mut hdr[at..at + take], addr).ok()?;
            at += take;
        }
        if take < len {
            payload.push((GuestAddress(addr.0 + take as u64), len - take));
        }
    }
    let h = Header::parse(&hdr)?;
    // Only the bytes the header's length names.
    let mut want = h.len as usize;
    payload.retain_mut(|b| {
        b.1 = b.1.min(want);
        want -= b.1;
        b.1 > 0
    });
    Some((h, Payload::Guest { mem, bufs: payload }))
}

/// The device-writable buffers of the guest's RX descriptors `descs`, as (address, length),
/// if a packet can go there: they are all guest memory, with room for a header at least.
/// Otherwise the chain goes back unused, and the packet waits for the next buffers.
pub(super) fn rx_buffers(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
) -> Option<Vec<(GuestAddress, usize)>> {
    let bufs: Vec<(GuestAddress, usize)> = descs
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr(), d.len() as usize))
        .collect();
    let cap: usize = bufs.iter().map(|b| b.1).sum();
    let usable = cap >= HDR_LEN
        && bufs
            .iter()
            .all(|&(a, l)| GuestMemoryBackend::check_range(mem, a, l));
    usable.then_some(bufs)
}

/// Where the payload of a packet goes in the RX buffers `bufs` (as [`rx_buffers`] gives
/// them): everything after the header, up to `max` bytes.
pub(super) fn rx_payload_bufs(
    bufs: &[(GuestAddress, usize)],
    max: usize,
) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (HDR_LEN, max);
    for &(addr, len) in bufs {
        if left == 0 {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(left);
        // Within the buffer: rx_buffers checked that all of it is guest memory.
        out.push((GuestAddress(addr.0 + skip as u64), n));
        left -= n;
        skip = 0;
    }
    out
}

/// Reads from `r` straight into the guest buffers `bufs`, in order, as far as `r` gives now
/// (it stops at the first short read), and returns how much it read; an error only when it
/// read nothing (WouldBlock: nothing to read now). 0 with room in `bufs` is `r`'s end.
pub(super) fn read_scattered(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    r: &mut impl ReadVolatile,
) -> std::io::Result<usize> {
    let mut done = 0;
    for slice in bufs.iter().flat_map(|&(a, len)| mem.get_slices(a, len)) {
        let read = slice.map_err(std::io::Error::other).and_then(|mut s| {
            retry_eintr(|| r.read_volatile(&mut s).map_err(volatile_to_io)).map(|n| (n, s.len()))
        });
        match read {
            Ok((n, len)) => {
                done += n;
                if n < len {
                    break;
                }
            }
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// Writes `parts` one after the other across the guest buffers `bufs` (as [`rx_buffers`]
/// gives them), straight from where they are; returns how much fit.
pub(super) fn write_scattered(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    parts: &[&[u8]],
) -> usize {
    let mut done = 0;
    let mut bufs = bufs.iter().copied();
    // What is left of the buffer being filled.
    let (mut addr, mut left) = (GuestAddress(0), 0);
    for part in parts {
        let mut part = *part;
        while !part.is_empty() {
            if left == 0 {
                let Some(next) = bufs.next() else {
                    return done;
                };
                (addr, left) = next;
                continue;
            }
            let n = left.min(part.len());
            if mem.write_slice(&part[..n], addr).is_err() {
                return done;
            }
            done += n;
            part = &part[n..];
            // Within the buffer: rx_buffers checked that all of it is guest memory.
            addr = GuestAddress(addr.0 + n as u64);
            left -= n;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_utils::hdr;

    #[test]
    fn header_round_trips_and_short_input_is_rejected() {
        let h = hdr(OP_RW, 1, 2, 3);
        assert_eq!(Header::parse(&h.to_bytes()), Some(h));
        assert_eq!(Header::parse(&[0u8; 43]), None);
    }

    /// Parts written one after the other over buffers of any sizes (empty ones too), as
    /// one stream; what does not fit is left out.
    #[test]
    fn parts_are_scattered_over_the_buffers_in_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bufs = [
            (GuestAddress(0x100), 3),
            (GuestAddress(0x200), 0),
            (GuestAddress(0x300), 5),
            (GuestAddress(0x400), 4),
        ];
        let written = write_scattered(&mem, &bufs, &[b"ab", b"", b"cdefg", b"hijklmn"]);
        assert_eq!(written, 12);
        let mut got = Vec::new();
        for &(a, l) in &bufs {
            let mut b = vec![0u8; l];
            mem.read_slice(&mut b, a).unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(&got, b"abcdefghijkl");
    }

    /// The payload goes after the header, however the buffers split it, and is read in
    /// order up to the room asked for; a short read stops, and the end of the input reads 0.
    #[test]
    fn rx_payload_is_read_after_the_header_across_buffers() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bufs = [
            (GuestAddress(0x100), 30),
            (GuestAddress(0x200), 20),
            (GuestAddress(0x300), 0),
            (GuestAddress(0x400), 7),
            (GuestAddress(0x500), 100),
        ];
        let payload = rx_payload_bufs(&bufs, 20);
        assert_eq!(
            payload,
            [
                (GuestAddress(0x200 + 14), 6),
                (GuestAddress(0x400), 7),
                (GuestAddress(0x500), 7)
            ]
        );
        assert_eq!(rx_payload_bufs(&bufs[..2], 100).len(), 1);
        assert!(rx_payload_bufs(&bufs[..1], 100).is_empty());
        let data: Vec<u8> = (0..30).collect();
        let mut input = &data[..];
        assert_eq!(read_scattered(&mem, &payload, &mut input).unwrap(), 20);
        let mut got = Vec::new();
        for &(a, l) in &payload {
            let mut b = vec![0u8; l];
            mem.read_slice(&mut b, a).unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(got, data[..20]);
        // 10 bytes left for 20 bytes of room: a short read, then the end.
        assert_eq!(read_scattered(&mem, &payload, &mut input).unwrap(), 10);
        assert_eq!(read_scattered(&mem, &payload, &mut input).unwrap(), 0);
        let mut first = vec![0u8; 6];
        mem.read_slice(&mut first, payload[0].0).unwrap();
        assert_eq!(first, data[20..26]);
    }

    /// A TX chain with its header split over two buffers and bytes past the header's
    /// length: only the header is read; the payload is where the guest put it, cut at the
    /// length, and written or appended from any offset in order.
    #[test]
    fn a_tx_chain_payload_stays_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let h = hdr(OP_RW, 1, 2, 10).to_bytes();
        mem.write_slice(&h[..20], GuestAddress(0x100)).unwrap();
        mem.write_slice(&h[20..], GuestAddress(0x200)).unwrap();
        mem.write_slice(b"abc", GuestAddress(0x200 + 24)).unwrap();
        mem.write_slice(b"defghijIGNORED", GuestAddress(0x300))
            .unwrap();
        let descs = [(0x100, 20), (0x200, 27), (0x300, 14)]
            .map(|(a, l)| Descriptor::new(a, l, 0, 0))
            .into_iter();
        let (got, payload) = read_tx_chain(&mem, descs).expect("a packet");
        assert_eq!(got, hdr(OP_RW, 1, 2, 10));
        let Payload::Guest { bufs, .. } = &payload else {
            panic!("not in guest memory");
        };
        assert_eq!(
            bufs,
            &[(GuestAddress(0x200 + 24), 3), (GuestAddress(0x300), 7)]
        );
        assert_eq!(payload.len(), 10);
        let mut rest = b"..".to_vec();
        payload.append_to(2, &mut rest);
        assert_eq!(rest, b"..cdefghij");
        let (mut a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(payload.write_to(&mut a).unwrap(), 10);
        let mut read = [0u8; 10];
        std::io::Read::read_exact(&mut b, &mut read).unwrap();
        assert_eq!(&read, b"abcdefghij");
        // Shorter than a header, or a buffer outside guest memory: no packet.
        let short = [Descriptor::new(0x100, 20, 0, 0)].into_iter();
        assert!(read_tx_chain(&mem, short).is_none());
        let outside = [(0x100, 20), (0x200, 24), (0x20000, 8)]
            .map(|(a, l)| Descriptor::new(a, l, 0, 0))
            .into_iter();
        assert!(read_tx_chain(&mem, outside).is_none());
    }
}
