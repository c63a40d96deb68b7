//! Copies between files and guest memory in bounded chunks (the guest chooses the lengths,
//! so no copy allocates more than one chunk). Each returns false when a part of the guest
//! range is not guest memory or the file fails; the caller answers with an I/O error.

use std::{fs::File, os::unix::fs::FileExt};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The most one copy holds at a time.
const CHUNK: usize = 64 * 1024;

/// Zeros to write from.
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// The guest address `done` bytes past `addr`, if there is one.
fn at(addr: GuestAddress, done: u64) -> Option<GuestAddress> {
    addr.0.checked_add(done).map(GuestAddress)
}

/// Reads `len` bytes of `f` at `off` into guest memory at `addr` (pread).
pub(super) fn file_to_guest(
    mem: &GuestMemoryMmap,
    f: &File,
    off: u64,
    addr: GuestAddress,
    len: u64,
) -> bool {
    let mut buf = vec![0u8; len.min(CHUNK as u64) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let (Some(pos), Some(to)) = (off.checked_add(done), at(addr, done)) else {
            return false;
        };
        if f.read_exact_at(&mut buf[..n], pos).is_err() || mem.write_slice(&buf[..n], to).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
}

/// Writes `len` bytes of guest memory at `addr` into `f` at `off` (pwrite).
pub(super) fn guest_to_file(
    mem: &GuestMemoryMmap,
    f: &File,
    off: u64,
    addr: GuestAddress,
    len: u64,
) -> bool {
    let mut buf = vec![0u8; len.min(CHUNK as u64) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let (Some(pos), Some(from)) = (off.checked_add(done), at(addr, done)) else {
            return false;
        };
        if mem.read_slice(&mut buf[..n], from).is_err() || f.write_all_at(&buf[..n], pos).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
}

/// Fills `len` bytes of guest memory at `addr` with zeros.
pub(super) fn zeros_to_guest(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        let Some(to) = at(addr, done) else {
            return false;
        };
        if mem.write_slice(&ZEROS[..n], to).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_check_guest_memory_and_the_file() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 200_000], 0).unwrap();
        // More than one chunk each way.
        assert!(file_to_guest(&mem, &f, 0, GuestAddress(0x1000), 150_000));
        let mut got = vec![0u8; 150_000];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert!(got.iter().all(|&b| b == 7));
        assert!(zeros_to_guest(&mem, GuestAddress(0x1000), 100_000));
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert!(got[..100_000].iter().all(|&b| b == 0));
        assert!(got[100_000..].iter().all(|&b| b == 7));
        assert!(guest_to_file(&mem, &f, 1, GuestAddress(0x1000), 100_000));
        let mut b = [9u8; 2];
        f.read_exact_at(&mut b, 100_000).unwrap();
        assert_eq!(b, [0, 7]);
        // Past the file's end, past guest memory, past the address space.
        assert!(!file_to_guest(&mem, &f, 199_999, GuestAddress(0), 2));
        assert!(!file_to_guest(&mem, &f, 0, GuestAddress((1 << 20) - 1), 2));
        assert!(!zeros_to_guest(&mem, GuestAddress((1 << 20) - 1), 2));
        assert!(!zeros_to_guest(&mem, GuestAddress(u64::MAX), 2));
        assert!(!guest_to_file(
            &mem,
            &f,
            0,
            GuestAddress(u64::MAX - 1),
            200_000
        ));
        assert!(!file_to_guest(&mem, &f, u64::MAX, GuestAddress(0), 2));
    }
}
