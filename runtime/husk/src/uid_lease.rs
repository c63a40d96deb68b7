//! The user and group a confined VMM runs as: one per VM, leased from a configured range
//! ([`UidRange`], `[vmm] uids` in the configuration), so that no two VMMs share a user.
//!
//! A lease is an exclusive `flock` on `/run/husk/uids/N`, a directory only root may write:
//! taken by the process that starts the VMM, shared with the VMM (which inherits the open
//! file, so a dying VMM keeps its user until it is gone), and released by the kernel when both
//! have closed it, even if they were SIGKILLed. A released lease's file is removed by its
//! holder, or, after a crash, by the next [`UidLease::acquire`] or [`sweep`], which find it
//! unlocked.
use std::{
    fmt,
    fs::{self, File},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{bail, Context, Result};

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

/// Where the leases are.
pub const LEASE_DIR: &str = "/run/husk/uids";

/// A leased user id (also the group id); released when dropped.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    path: PathBuf,
    file: File,
}

impl UidLease {
    /// Leases a free id of `range` in [`LEASE_DIR`], trying from a random one onwards
    /// (concurrent callers rarely race for the same).
    pub fn acquire(range: UidRange) -> Result<UidLease> {
        Self::acquire_in(Path::new(LEASE_DIR), range)
    }

    fn acquire_in(dir: &Path, range: UidRange) -> Result<UidLease> {
        create_lease_dir(dir)?;
        sweep_in(dir);
        let count = u64::from(range.last - range.first) + 1;
        let start = random_u64() % count;
        for i in 0..count {
            let uid = range.first + ((start + i) % count) as u32;
            let path = dir.join(uid.to_string());
            if path.exists() {
                continue;
            }
            if let Some(file) = lock(&path)? {
                return Ok(UidLease { uid, path, file });
            }
        }
        bail!(
            "no free user id for the VMM: all {count} of [vmm] uids = \"{range}\" are leased (one per running VM, in {}); widen the range",
            dir.display()
        )
    }

    /// The lease's open file, for the VMM to inherit (it keeps the lease while it lives).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        // Removed while locked: whoever opens the name next makes a new file.
        let _ = fs::remove_file(&self.path);
    }
}

/// Makes `dir`, root's alone.
fn create_lease_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        bail!(
            "{} must be a directory only root may write (it holds the VMMs' user leases)",
            dir.display()
        );
    }
    Ok(())
}

/// Opens and locks `path` (made if missing); None if another holds it. The lock counts only
/// if `path` is still the file locked: one removed meanwhile (a lease released, or swept)
/// means the id is tried again.
fn lock(path: &Path) -> Result<Option<File>> {
    loop {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            bail!("locking {}: {e}", path.display());
        }
        let held = file.metadata()?;
        match fs::symlink_metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(file)),
            _ => continue,
        }
    }
}

/// Removes the leases of [`LEASE_DIR`] nobody holds (a shim or `husk run` that was killed).
pub fn sweep() {
    sweep_in(Path::new(LEASE_DIR));
}

fn sweep_in(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if let Ok(Some(_held)) = lock(&path) {
            let _ = fs::remove_file(&path);
        }
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
    use std::os::unix::fs::PermissionsExt;

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

    #[test]
    fn a_lease_dir_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("uids");
        fs::create_dir(&leases).unwrap();
        fs::set_permissions(&leases, fs::Permissions::from_mode(0o777)).unwrap();
        let e = UidLease::acquire_in(&leases, UidRange { first: 5, last: 5 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("only root may write"), "{e}");
    }

    /// Each lease of a range holds its own id while it lives; the range runs out; a dropped
    /// lease's id comes back and its file goes.
    #[test]
    fn leases_are_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("uids");
        let range = UidRange {
            first: 100,
            last: 102,
        };
        let get = || UidLease::acquire_in(&leases, range);
        let a = get().unwrap();
        let b = get().unwrap();
        let c = get().unwrap();
        let mut ids = vec![a.uid, b.uid, c.uid];
        ids.sort();
        assert_eq!(ids, vec![100, 101, 102]);
        let e = get().unwrap_err().to_string();
        assert!(e.contains("all 3 of [vmm] uids"), "{e}");
        let freed = b.uid;
        drop(b);
        assert!(!leases.join(freed.to_string()).exists());
        let again = get().unwrap();
        assert_eq!(again.uid, freed);
        drop((a, c, again));
        assert_eq!(fs::read_dir(&leases).unwrap().count(), 0, "files left");
    }

    /// A holder that dies without releasing (SIGKILL) leaves its file: while the VMM that
    /// inherited it lives, the id stays leased; once both are gone the file is swept and the
    /// id leased again.
    #[test]
    fn a_dead_holders_lease_lasts_while_its_vmm_lives_then_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("uids");
        let range = UidRange { first: 7, last: 7 };
        let a = UidLease::acquire_in(&leases, range).unwrap();
        let vmm = a.file().try_clone().unwrap();
        let holder_fd = a.file().as_raw_fd();
        // The holder dies: no Drop runs, its descriptor closes.
        std::mem::forget(a);
        // SAFETY: closing the descriptor the forgotten lease owned, once.
        unsafe { libc::close(holder_fd) };
        let e = UidLease::acquire_in(&leases, range)
            .unwrap_err()
            .to_string();
        assert!(e.contains("all 1 of"), "{e}");
        // The VMM dies too.
        drop(vmm);
        let again = UidLease::acquire_in(&leases, range).unwrap();
        assert_eq!(again.uid, 7);
        // sweep() leaves a held lease alone.
        sweep_in(&leases);
        assert!(leases.join("7").exists());
    }
}
