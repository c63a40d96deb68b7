//! Frames in guest buffers: the 12-byte virtio-net header (virtio 1.0, `num_buffers`
//! included whatever was negotiated), the checks a guest's chains must pass, and the one
//! `readv`/`writev` per frame between the backend and the chains' buffers, in place.

use std::{io, os::fd::RawFd};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The size of the virtio-net header on both rings and on the tap.
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// An Ethernet header with one VLAN tag: what a frame carries beyond its MTU.
pub const ETH_OVERHEAD: usize = ETH_HLEN + 4;
/// The largest segmentation-offload frame: an IP packet of 64 KiB less one, plus
/// [`ETH_OVERHEAD`].
pub const MAX_GSO_FRAME: usize = 65535 + ETH_OVERHEAD;
/// The most descriptors a chain may have (Linux uses up to 19 for one frame).
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;
/// The most pieces one `readv`/`writev` takes (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// `flags`: the guest or the host left the checksum to the other side.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr_v1`, little-endian in guest memory and on the tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (o, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// What the guest may send, from the features it acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRules {
    /// The longest frame (header excluded).
    pub max_frame: usize,
    /// VIRTIO_NET_F_CSUM: frames with a checksum left to the host.
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4, HOST_TSO6, HOST_ECN.
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// Why a guest chain is refused (what the rate-limited warning says).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a transmit chain has a device-writable buffer")]
    WritableInTx,
    #[error("a receive chain has a device-readable buffer")]
    ReadableInRx,
    #[error("a buffer lies outside guest memory")]
    OutsideMemory,
    #[error("a chain of more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a chain of {0} bytes has no room for the {VNET_HDR_LEN}-byte header and an Ethernet header")]
    TooShort(usize),
    #[error("a frame of {0} bytes is longer than the {1} bytes negotiated")]
    TooLong(usize, usize),
    #[error("a frame asks for an offload that was not negotiated (flags {flags:#x}, gso_type {gso_type:#x})")]
    Offload { flags: u8, gso_type: u8 },
}

/// Checks the guest's transmit chain `descs` against `rules` and puts its buffers
/// (header included, as the tap takes them) into `bufs`; returns the header.
pub fn tx_chain(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    rules: &TxRules,
    bufs: &mut Vec<(GuestAddress, usize)>,
) -> Result<VnetHdr, ChainError> {
    bufs.clear();
    let total = append_chain(mem, descs, false, bufs)?;
    if total < VNET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(total));
    }
    if total - VNET_HDR_LEN > rules.max_frame {
        return Err(ChainError::TooLong(total - VNET_HDR_LEN, rules.max_frame));
    }
    let mut h = [0u8; VNET_HDR_LEN];
    if read_at(mem, bufs, 0, &mut h) != VNET_HDR_LEN {
        return Err(ChainError::OutsideMemory);
    }
    let hdr = VnetHdr::parse(&h);
    let gso_ok = match hdr.gso_type & !GSO_ECN {
        GSO_NONE => hdr.gso_type & GSO_ECN == 0,
        GSO_TCPV4 => rules.tso4 && (hdr.gso_type & GSO_ECN == 0 || rules.ecn),
        GSO_TCPV6 => rules.tso6 && (hdr.gso_type & GSO_ECN == 0 || rules.ecn),
        // UDP fragmentation, UDP segmentation and anything newer: never offered.
        _ => false,
    };
    if !gso_ok || (hdr.flags & F_NEEDS_CSUM != 0 && !rules.csum) {
        return Err(ChainError::Offload {
            flags: hdr.flags,
            gso_type: hdr.gso_type,
        });
    }
    Ok(hdr)
}

/// Checks the guest's receive chain `descs` (all device-writable, all guest memory, room
/// for a header at least) and appends its buffers to `bufs`; returns its capacity. On an
/// error `bufs` is as it was.
pub fn rx_chain(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    bufs: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, ChainError> {
    let before = bufs.len();
    let r = append_chain(mem, descs, true, bufs).and_then(|cap| {
        if cap < VNET_HDR_LEN {
            Err(ChainError::TooShort(cap))
        } else {
            Ok(cap)
        }
    });
    if r.is_err() {
        bufs.truncate(before);
    }
    r
}

/// Appends the buffers of one chain to `bufs`: every descriptor device-writable
/// (`writable`) or every one device-readable, each all guest memory; returns their total.
fn append_chain(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    writable: bool,
    bufs: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, ChainError> {
    let mut total = 0usize;
    for (i, d) in descs.enumerate() {
        if i == MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if d.is_write_only() != writable {
            return Err(if writable {
                ChainError::ReadableInRx
            } else {
                ChainError::WritableInTx
            });
        }
        let len = d.len() as usize;
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            return Err(ChainError::OutsideMemory);
        }
        if len > 0 {
            bufs.push((d.addr(), len));
            total += len;
        }
    }
    Ok(total)
}

/// Reads up to `out.len()` bytes at `offset` in the buffers `bufs`; returns how many.
pub fn read_at(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    offset: usize,
    out: &mut [u8],
) -> usize {
    let mut done = 0;
    for (addr, len) in pieces_at(bufs, offset, out.len()) {
        if mem.read_slice(&mut out[done..done + len], addr).is_err() {
            break;
        }
        done += len;
    }
    done
}

/// Writes `data` at `offset` in the buffers `bufs`; returns how much fit.
pub fn write_at(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    offset: usize,
    data: &[u8],
) -> usize {
    let mut done = 0;
    for (addr, len) in pieces_at(bufs, offset, data.len()) {
        if mem.write_slice(&data[done..done + len], addr).is_err() {
            break;
        }
        done += len;
    }
    done
}

/// The pieces of `bufs` that hold `len` bytes from `offset` on.
fn pieces_at(
    bufs: &[(GuestAddress, usize)],
    mut offset: usize,
    mut len: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    bufs.iter().filter_map(move |&(addr, blen)| {
        if offset >= blen {
            offset -= blen;
            return None;
        }
        let n = (blen - offset).min(len);
        let piece = (GuestAddress(addr.0 + offset as u64), n);
        offset = 0;
        len -= n;
        (n > 0).then_some(piece)
    })
}

/// A reusable list of `iovec`s: filled, used by one `readv`/`writev`, cleared. A read also
/// gets one byte of its own after the guest's buffers, to tell a frame that filled them
/// exactly from one that was longer (a tap cuts such a frame and says only how much it
/// copied).
#[derive(Debug, Default)]
pub struct IoVecs(Vec<libc::iovec>, Box<[u8; 1]>);

// SAFETY: the raw pointers in the list are only ever dereferenced by the kernel, inside the
// one readv/writev of the call that filled the list (the list is cleared before it returns);
// between calls the list is empty, so moving it to another thread moves no live pointer.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Fills the list with the host addresses of `bufs` (each checked to be guest memory);
    /// false if they take more than [`MAX_IOVECS`] pieces.
    fn fill(&mut self, mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)]) -> bool {
        self.0.clear();
        for &(addr, len) in bufs {
            for slice in mem.get_slices(addr, len) {
                let Ok(slice) = slice else {
                    self.0.clear();
                    return false;
                };
                if self.0.len() == MAX_IOVECS {
                    self.0.clear();
                    return false;
                }
                self.0.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        true
    }

    /// Reads one frame from `fd` straight into the guest buffers `bufs`; returns its length,
    /// which is more than the buffers hold when the frame was longer than they are (and is
    /// lost: the kernel cut it).
    pub fn readv(
        &mut self,
        fd: RawFd,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        if !self.fill(mem, bufs) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.0.push(libc::iovec {
            iov_base: self.1.as_mut_ptr().cast(),
            iov_len: 1,
        });
        // SAFETY: each iovec but the last is a piece of guest memory that `mem` keeps
        // mapped for the whole call (get_slices checked every byte of it); the last is our
        // own byte, borrowed mutably for the call. The kernel writes at most iov_len bytes
        // into each.
        let n = unsafe { libc::readv(fd, self.0.as_ptr(), self.0.len() as libc::c_int) };
        self.0.clear();
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes the guest buffers `bufs` to `fd` as one frame.
    pub fn writev(
        &mut self,
        fd: RawFd,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        if !self.fill(mem, bufs) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: as in readv; the kernel only reads from the pieces.
        let n = unsafe { libc::writev(fd, self.0.as_ptr(), self.0.len() as libc::c_int) };
        self.0.clear();
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[10..], [3, 0]);
    }

    /// Reads and writes at an offset go across buffers of any sizes, empty ones too.
    #[test]
    fn offsets_span_buffers() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bufs = [
            (GuestAddress(0x100), 9),
            (GuestAddress(0x200), 0),
            (GuestAddress(0x300), 2),
            (GuestAddress(0x400), 50),
        ];
        assert_eq!(write_at(&mem, &bufs, 10, &[0xaa, 0xbb]), 2);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x301)).unwrap();
        assert_eq!(b[0], 0xaa);
        mem.read_slice(&mut b, GuestAddress(0x400)).unwrap();
        assert_eq!(b[0], 0xbb);
        let mut back = [0u8; 2];
        assert_eq!(read_at(&mem, &bufs, 10, &mut back), 2);
        assert_eq!(back, [0xaa, 0xbb]);
        assert_eq!(write_at(&mem, &bufs, 60, &[1, 2, 3]), 1);
        assert_eq!(read_at(&mem, &bufs, 100, &mut back), 0);
    }
}
