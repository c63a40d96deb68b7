//! A pod's shared directory: the host directory its virtiofsd serves to the guest (virtio-fs
//! tag [`husk_proto::SHARED_FS_TAG`]), and the volumes bind-mounted into it.
//!
//! Each volume is mounted inside virtiofsd's own mount namespace, never in the host's: the
//! source is cloned here as a detached mount (`open_tree`), given its options
//! (`mount_setattr`: read-only, nosuid, nodev, propagation), and moved into virtiofsd's
//! namespace (a thread that leaves the shim's file-system context and enters that namespace
//! through virtiofsd's pidfd, then `move_mount`). So the host's mount table never holds a
//! pod's volumes, and they all go with virtiofsd however the pod ends (rmp, a killed VMM, a
//! killed shim): nothing to unmount, nothing left behind.
//!
//! virtiofsd pivots into the shared directory, so the namespace's root is the share. Once
//! the guest has mounted it, [`SharedDir::seal`] makes that root read-only (the volumes under
//! it keep their own options): the guest can write only into volumes, never make a name in
//! the share that a later mount would follow.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            ffi::{OsStrExt, OsStringExt},
            fs::MetadataExt,
        },
    },
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How a volume's mount receives mounts made later under its source on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// None (CRI's PROPAGATION_PRIVATE).
    Private,
    /// The host's new mounts show in the guest (HOST_TO_CONTAINER; BIDIRECTIONAL too: a
    /// guest's mounts cannot reach the host across the VM).
    Slave,
}

/// One host file or directory to share with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: PathBuf,
    /// Its name under the container's directory in the share.
    pub name: String,
    /// With the mounts under the source (rbind).
    pub recursive: bool,
    pub read_only: ReadOnly,
    pub propagation: Propagation,
}

/// How much of a volume is read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    /// Nothing: writable wherever the host's mounts are.
    No,
    /// The volume's own mount; the mounts under it keep their own flags (CRI's `readonly`,
    /// OCI's `ro`, as runc does it).
    Top,
    /// The volume and every mount under it (CRI's `recursive_read_only`, OCI's `rro`).
    Recursive,
}

/// The read-write mount points strictly below `dir` in this process's mount namespace, as
/// paths relative to `dir`, parents before children: what a [`ReadOnly::Top`] volume leaves
/// writable. (A mount point shadowed by a later mount on the same path counts as the later.)
pub fn writable_submounts(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let table = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(submounts_in(&table, &dir))
}

fn submounts_in(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found = std::collections::BTreeMap::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS ...
        let mut f = line.split(' ');
        let (Some(point), Some(options)) = (f.nth(4), f.next()) else {
            continue;
        };
        let point = PathBuf::from(std::ffi::OsString::from_vec(unescape(point)));
        let Ok(rel) = point.strip_prefix(dir) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        found.insert(rel.to_path_buf(), options.split(',').any(|o| o == "rw"));
    }
    // BTreeMap order puts a parent before the paths under it.
    found
        .into_iter()
        .filter_map(|(p, rw)| rw.then_some(p))
        .collect()
}

/// A mountinfo field with its octal escapes (`\040` for a space, ...) undone.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |a, c| a.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A pod's shared directory, `host`, served by the virtiofsd of `pidfd`.
#[derive(Debug)]
pub struct SharedDir {
    host: PathBuf,
    pidfd: OwnedFd,
}

/// How long to wait for virtiofsd to pivot into the share (it does so before it answers the
/// guest's first request, so only a caller that comes before the guest waits).
const SANDBOX_WAIT: Duration = Duration::from_secs(5);

impl SharedDir {
    pub fn new(host: PathBuf, pidfd: OwnedFd) -> SharedDir {
        SharedDir { host, pidfd }
    }

    /// The directory on the host (its contents, without the volumes).
    pub fn host(&self) -> &Path {
        &self.host
    }

    /// Makes the share's root read-only, nosuid and nodev in virtiofsd's namespace.
    pub fn seal(&self) -> Result<()> {
        self.in_namespace(|root| {
            mount_setattr(
                root.as_raw_fd(),
                c"",
                libc::AT_EMPTY_PATH as u32,
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                0,
            )
            .context("making the share's root read-only")
        })
    }

    /// Mounts each of `volumes` at `dir/NAME` in the share (`dir`: a plain relative name,
    /// the container's id). On failure, what was mounted is unmounted again.
    pub fn add(&self, dir: &str, volumes: &[Volume]) -> Result<()> {
        let dir = plain(dir)?;
        for v in volumes {
            plain(&v.name)?;
        }
        let r = self.add_all(&dir, volumes);
        if r.is_err() {
            self.remove(dir.to_str().unwrap_or_default());
        }
        r
    }

    fn add_all(&self, dir: &Path, volumes: &[Volume]) -> Result<()> {
        let host_dir = self.host.join(dir);
        fs::create_dir_all(&host_dir)
            .with_context(|| format!("creating {}", host_dir.display()))?;
        if !fs::symlink_metadata(&host_dir).is_ok_and(|m| m.is_dir()) {
            bail!("{} is not a directory", host_dir.display());
        }
        let mut clones = Vec::with_capacity(volumes.len());
        for v in volumes {
            let what = || format!("sharing {}", v.source.display());
            let md = fs::metadata(&v.source).with_context(what)?;
            // The mount point, on the host (the share's root is read-only in virtiofsd's
            // namespace): a directory or an empty file, as the source is.
            let point = host_dir.join(&v.name);
            if md.is_dir() {
                fs::create_dir(&point)
            } else {
                fs::File::create_new(&point).map(drop)
            }
            .with_context(|| format!("creating {}", point.display()))?;
            clones.push(clone_volume(v).with_context(what)?);
        }
        self.in_namespace(|root| {
            for (v, tree) in volumes.iter().zip(&clones) {
                let rel = dir.join(&v.name);
                let target = open_beneath(root, &rel)
                    .with_context(|| format!("opening {} in the share", rel.display()))?;
                move_mount(tree.as_raw_fd(), target.as_raw_fd()).with_context(|| {
                    format!(
                        "mounting {} at {} in the share",
                        v.source.display(),
                        rel.display()
                    )
                })?;
            }
            Ok(())
        })
    }

    /// Unmounts the volumes of `dir` and removes its mount points. Best effort: a virtiofsd
    /// that is gone took its mounts with it.
    pub fn remove(&self, dir: &str) {
        let Ok(dir) = plain(dir) else { return };
        let host_dir = self.host.join(&dir);
        let names: Vec<_> = match fs::read_dir(&host_dir) {
            Ok(d) => d.flatten().map(|e| e.file_name()).collect(),
            Err(_) => return,
        };
        let _ = self.in_namespace(|_| {
            for n in &names {
                let Ok(p) = CString::new(Path::new("/").join(&dir).join(n).as_os_str().as_bytes())
                else {
                    continue;
                };
                // Mounts may be stacked; each detach takes the top one and what is under it.
                // SAFETY: umount2 with a valid C string.
                while unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) }
                    == 0
                {}
            }
            Ok(())
        });
        let _ = fs::remove_dir_all(&host_dir);
    }

    /// Runs `f` on a thread of its own in virtiofsd's mount namespace, with that namespace's
    /// root (the share) opened; the caller's threads stay where they are.
    fn in_namespace<T: Send>(&self, f: impl FnOnce(&OwnedFd) -> Result<T> + Send) -> Result<T> {
        let want =
            fs::metadata(&self.host).with_context(|| format!("reading {}", self.host.display()))?;
        let pidfd = self.pidfd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // setns into a mount namespace needs a file-system context of our own.
                // SAFETY: plain syscalls on this thread; the pidfd is ours.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(io::Error::last_os_error()).context("unshare(CLONE_FS)");
                }
                let t0 = Instant::now();
                let root = loop {
                    // SAFETY: setns with virtiofsd's pidfd, on this thread alone.
                    if unsafe { libc::setns(pidfd, libc::CLONE_NEWNS) } != 0 {
                        return Err(io::Error::last_os_error())
                            .context("entering virtiofsd's mount namespace (is it running?)");
                    }
                    let root = open_dir(c"/")?;
                    let st = fstat(&root)?;
                    if st.st_dev == want.dev() && st.st_ino == want.ino() {
                        break root;
                    }
                    // virtiofsd has not pivoted into the share yet.
                    if t0.elapsed() > SANDBOX_WAIT {
                        bail!(
                            "virtiofsd's root is not the share {} after {SANDBOX_WAIT:?}",
                            self.host.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                f(&root)
            })
            .join()
            .unwrap_or_else(|_| bail!("the share's thread panicked"))
        })
    }
}

/// `name` as a relative path of plain names.
fn plain(name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if name.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{name:?} is not a plain relative name");
    }
    Ok(p.to_path_buf())
}

const OPEN_TREE_CLONE: u32 = 1;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const RESOLVE_NO_XDEV: u64 = 0x01;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// `struct mount_attr` of linux/mount.h.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `struct open_how` of linux/openat2.h.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The volume's source as a detached mount (a clone, with its submounts when recursive),
/// nosuid and nodev throughout, read-only as asked, with its propagation.
fn clone_volume(v: &Volume) -> Result<OwnedFd> {
    let src = CString::new(v.source.as_os_str().as_bytes())?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as u32;
    if v.recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree with a valid C string; the fd it returns is ours.
    let fd =
        cvt(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags) })
            .context("cloning the mount (open_tree)")?;
    // SAFETY: just opened.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if v.read_only == ReadOnly::Recursive {
        set |= MOUNT_ATTR_RDONLY;
    }
    let propagation = match v.propagation {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::Slave => libc::MS_SLAVE,
    };
    let mut at = libc::AT_EMPTY_PATH as u32;
    if v.recursive {
        at |= AT_RECURSIVE;
    }
    mount_setattr(tree.as_raw_fd(), c"", at, set, propagation).context("setting its options")?;
    if v.read_only == ReadOnly::Top {
        mount_setattr(
            tree.as_raw_fd(),
            c"",
            libc::AT_EMPTY_PATH as u32,
            MOUNT_ATTR_RDONLY,
            0,
        )
        .context("making it read-only")?;
    }
    Ok(tree)
}

fn mount_setattr(
    fd: RawFd,
    path: &std::ffi::CStr,
    flags: u32,
    set: u64,
    propagation: u64,
) -> Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a valid fd, C string and struct of the size given.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .context("mount_setattr")?;
    Ok(())
}

/// Moves the detached mount `tree` onto `target` (an O_PATH fd).
fn move_mount(tree: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: move_mount with valid fds and empty C strings.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            target,
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Opens `rel` under `root` (O_PATH) following no symlink, never leaving `root` or its mount.
fn open_beneath(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let p = CString::new(rel.as_os_str().as_bytes())?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    };
    // SAFETY: openat2 with a valid fd, C string and struct of the size given.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn open_dir(path: &std::ffi::CStr) -> Result<OwnedFd> {
    // SAFETY: open with a valid C string.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening the namespace's root");
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live struct stat; the fd is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error()).context("fstat");
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The virtiofsd that scripts/setup.sh builds.
    const VIRTIOFSD: &str = "/usr/local/libexec/husk/virtiofsd";

    /// A real virtiofsd in its namespace sandbox serving `share`, and its pidfd.
    fn virtiofsd(dir: &Path, share: &Path) -> (std::process::Child, OwnedFd) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (virtiofsd's sandbox, mounts)"
        );
        assert!(
            Path::new(VIRTIOFSD).exists(),
            "{VIRTIOFSD} is missing: scripts/setup.sh builds it"
        );
        let child = std::process::Command::new(VIRTIOFSD)
            .arg("--socket-path")
            .arg(dir.join("fs.sock"))
            .arg("--shared-dir")
            .arg(share)
            .args(["--sandbox=namespace", "--seccomp=kill"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // SAFETY: pidfd_open of our own child, not reaped yet.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) };
        assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: just opened.
        (child, unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    #[test]
    fn submounts_from_mountinfo() {
        let table = "\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
30 22 0:30 / /v rw - tmpfs none rw
31 30 0:31 / /v/a rw,nosuid - tmpfs none rw
32 31 0:32 / /v/a/b ro - tmpfs none rw
33 30 0:33 / /v/with\\040space rw - tmpfs none rw
34 30 0:34 / /v/c ro - tmpfs none rw
35 34 0:35 / /v/c rw - tmpfs none rw
36 22 0:36 / /vv rw - tmpfs none rw
";
        assert_eq!(
            submounts_in(table, Path::new("/v")),
            ["a", "c", "with space"].map(PathBuf::from),
            "read-write ones below /v, a shadowed mount point as its top mount"
        );
        assert!(submounts_in(table, Path::new("/vv")).is_empty());
        assert_eq!(unescape(r"a\134b\011\9"), b"a\\b\t\\9");
    }

    /// The mount points in virtiofsd's namespace (as its root sees them).
    fn mounts_of(pid: u32) -> Vec<String> {
        fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .lines()
            .map(|l| l.split(' ').nth(4).unwrap().to_string())
            .collect()
    }

    /// Volumes are mounted in virtiofsd's namespace only (the host's mount table never
    /// has them), with their options; the share's root is read-only once sealed; a name
    /// that is not plain or leads through a symlink is refused; removing unmounts them.
    #[test]
    fn volumes_are_mounted_in_virtiofsds_namespace_only() {
        let d = tempfile::tempdir().unwrap();
        let (share, vol, ro, hosts) = (
            d.path().join("shared"),
            d.path().join("vol"),
            d.path().join("ro"),
            d.path().join("hosts"),
        );
        for p in [&share, &vol, &ro] {
            fs::create_dir(p).unwrap();
        }
        fs::write(vol.join("a"), "from the host\n").unwrap();
        fs::write(ro.join("b"), "read-only\n").unwrap();
        // A writable mount under the read-only volumes: read-only in a ReadOnly::Recursive
        // one, writable in a ReadOnly::Top one.
        let sub = ro.join("sub");
        fs::create_dir(&sub).unwrap();
        nix::mount::mount(
            Some("none"),
            &sub,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&sub);
        assert_eq!(writable_submounts(&ro).unwrap(), [PathBuf::from("sub")]);
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let (mut child, pidfd) = virtiofsd(d.path(), &share);
        let sd = SharedDir::new(share.clone(), pidfd);
        sd.seal().unwrap();
        let volume = |source: &Path, name: &str, read_only| Volume {
            source: source.to_path_buf(),
            name: name.into(),
            recursive: true,
            read_only,
            propagation: Propagation::Private,
        };
        sd.add(
            "c1",
            &[
                volume(&vol, "0", ReadOnly::No),
                volume(&ro, "1", ReadOnly::Recursive),
                volume(&hosts, "2", ReadOnly::No),
                volume(&ro, "3", ReadOnly::Top),
            ],
        )
        .unwrap();
        let inside = mounts_of(child.id());
        for p in ["/c1/0", "/c1/1", "/c1/2", "/c1/3", "/c1/1/sub", "/c1/3/sub"] {
            assert!(inside.iter().any(|m| m == p), "{p} in {inside:?}");
        }
        let host_table = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !host_table.contains(share.to_str().unwrap()),
            "the host's mount table has the share's volumes"
        );
        let seen = sd
            .in_namespace(|_| {
                let a = fs::read_to_string("/c1/0/a")?;
                fs::write("/c1/0/new", "from the guest's side\n")?;
                let hosts = fs::read_to_string("/c1/2")?;
                let ro = fs::write("/c1/1/x", "no").unwrap_err().raw_os_error();
                let root = fs::write("/x", "no").unwrap_err().raw_os_error();
                let rro_sub = fs::write("/c1/1/sub/x", "no").unwrap_err().raw_os_error();
                let top = fs::write("/c1/3/x", "no").unwrap_err().raw_os_error();
                fs::write("/c1/3/sub/x", "under a read-only top\n")?;
                Ok((a, hosts, ro, root, rro_sub, top))
            })
            .unwrap();
        assert_eq!(seen.0, "from the host\n");
        assert_eq!(seen.1, "127.0.0.1 localhost\n");
        assert_eq!(seen.2, Some(libc::EROFS), "a read-only volume");
        assert_eq!(seen.3, Some(libc::EROFS), "the sealed root");
        assert_eq!(
            seen.4,
            Some(libc::EROFS),
            "a submount of a recursive read-only volume"
        );
        assert_eq!(seen.5, Some(libc::EROFS), "the top of a read-only volume");
        assert_eq!(
            fs::read_to_string(sub.join("x")).unwrap(),
            "under a read-only top\n",
            "a writable submount of a read-only (not recursive) volume"
        );
        assert_eq!(
            fs::read_to_string(vol.join("new")).unwrap(),
            "from the guest's side\n"
        );

        for bad in ["", "..", "../c1", "/c1", "a/../b"] {
            let e = sd.add(bad, &[volume(&vol, "0", ReadOnly::No)]).unwrap_err();
            assert!(e.to_string().contains("not a plain relative name"), "{e}");
        }
        // A name in the share that is a symlink is never followed.
        let elsewhere = d.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, share.join("c2")).unwrap();
        let e = sd
            .add("c2", &[volume(&vol, "0", ReadOnly::No)])
            .unwrap_err();
        assert!(format!("{e:#}").contains("is not a directory"), "{e:#}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert!(!mounts_of(child.id()).iter().any(|m| m.starts_with("/c2")));

        sd.remove("c1");
        assert!(!mounts_of(child.id()).iter().any(|m| m.starts_with("/c1")));
        assert!(!share.join("c1").exists());
        assert_eq!(
            fs::read_to_string(vol.join("a")).unwrap(),
            "from the host\n"
        );

        // Once virtiofsd is gone, so is its namespace: a clear error.
        child.kill().unwrap();
        child.wait().unwrap();
        let e = sd
            .add("c3", &[volume(&vol, "0", ReadOnly::No)])
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("virtiofsd's mount namespace"),
            "{e:#}"
        );
    }
}
