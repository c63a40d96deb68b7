//! The user and group a confined VMM runs as: one per VM, leased from a configured range
//! ([`UidRange`], `[vmm] uids` in the configuration), so that no two VMMs share a user.
//!
//! A lease is an abstract Unix socket, `@husk-vmm-uid-N`, bound in the host's network
//! namespace by the process that starts the VMM and held as long as the VM: the kernel
//! refuses a second bind of the name while the first is open, and releases it when its
//! holder closes it or dies, even by SIGKILL. So there is no lock file to clean up, nothing
//! left behind, and a crashed shim's uids come back by themselves. (A local process could
//! bind names of the range first: husk then takes other uids, and says so once the range is
//! exhausted.)

use std::{fmt, io, os::fd::OwnedFd, str::FromStr};

use anyhow::{bail, Result};
use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};

/// A range of user ids, each also a group id, that VMMs run as: `FIRST-LAST`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl Default for UidRange {
    /// 65536 ids far above those of users and of the usual subordinate-id ranges.
    fn default() -> Self {
        UidRange {
            first: 1_600_000_000,
            last: 1_600_065_535,
        }
    }
}

impl FromStr for UidRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected FIRST-LAST, two user ids from 1 to 4294967294");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || last == u32::MAX {
            return Err(bad());
        }
        if first > last {
            return Err(format!("{s:?}: the first id is above the last"));
        }
        Ok(UidRange { first, last })
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A leased user id (also the group id); released when dropped.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    _socket: OwnedFd,
}

impl UidLease {
    /// Leases a free id of `range`, trying from a random one onwards (concurrent callers
    /// rarely race for the same).
    pub fn acquire(range: UidRange) -> Result<UidLease> {
        let count = u64::from(range.last - range.first) + 1;
        let start = random_u64() % count;
        for i in 0..count {
            let uid = range.first + ((start + i) % count) as u32;
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(io::Error::from)?;
            let addr = UnixAddr::new_abstract(format!("husk-vmm-uid-{uid}").as_bytes())
                .map_err(io::Error::from)?;
            match bind(std::os::fd::AsRawFd::as_raw_fd(&s), &addr) {
                Ok(()) => return Ok(UidLease { uid, _socket: s }),
                Err(nix::errno::Errno::EADDRINUSE) => continue,
                Err(e) => bail!("leasing a user id for the VMM: binding @husk-vmm-uid-{uid}: {e}"),
            }
        }
        bail!(
            "no free user id for the VMM: all {count} of [vmm] uids = \"{range}\" are leased (one per running VM); widen the range"
        )
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n != 8 {
        return std::process::id() as u64;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print() {
        let r: UidRange = "100-101".parse().unwrap();
        assert_eq!((r.first, r.last), (100, 101));
        assert_eq!(r.to_string(), "100-101");
        assert_eq!(
            UidRange::default().to_string().parse::<UidRange>(),
            Ok(UidRange::default())
        );
        for bad in ["", "5", "0-10", "10-4294967295", "a-b", "10-5", "-1-5"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    /// Each lease of a range holds its own id while it lives; the range runs out, and a
    /// dropped lease's id comes back.
    #[test]
    fn leases_are_exclusive_and_released_on_drop() {
        // A range of this test's own, unlikely to meet another's.
        let first = 3_000_000_000 + (random_u64() % 1_000_000) as u32 * 4;
        let range = UidRange {
            first,
            last: first + 2,
        };
        let a = UidLease::acquire(range).unwrap();
        let b = UidLease::acquire(range).unwrap();
        let c = UidLease::acquire(range).unwrap();
        let mut ids = vec![a.uid, b.uid, c.uid];
        ids.sort();
        assert_eq!(ids, vec![first, first + 1, first + 2]);
        let e = UidLease::acquire(range).unwrap_err().to_string();
        assert!(e.contains("all 3 of [vmm] uids"), "{e}");
        let freed = b.uid;
        drop(b);
        assert_eq!(UidLease::acquire(range).unwrap().uid, freed);
    }
}
