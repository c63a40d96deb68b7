//! One OCI image layer unpacked as an overlayfs layer: a directory the guest stacks with the
//! image's other layers (lowest first), not a rootfs. The layer's deletions stay in it, in
//! overlayfs's on-disk form: `.wh.NAME` becomes a whiteout for NAME (a character device 0:0)
//! and `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`). Everything
//! else is unpacked as the tar says, with owner, mode, modification time and extended
//! attributes.
//!
//! A layer is user input, so nothing is written outside the directory: a path with `..` or a
//! root is refused, and so is a path (or a hard link's target) that goes through a symlink,
//! wherever it points: in the guest the link resolves against the container's root, not
//! against this directory, and a tar made from a filesystem never lists a path below a
//! symlink. overlayfs's own attributes (`trusted.overlay.*`) are never taken from a layer.
//!
//! Device nodes and `trusted.*` attributes need root; husk runs as root.

use std::{
    ffi::{CStr, CString, OsStr},
    fs,
    io::{self, Read},
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Component, Path, PathBuf},
};

use nix::{
    sys::{
        stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags},
        time::TimeSpec,
    },
    NixPath,
};
use tar::EntryType;

use super::ImageError;

/// The prefix of a whiteout's name.
const WHITEOUT: &[u8] = b".wh.";
/// The name of the marker that makes its directory opaque.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// AUFS's own entries (`.wh..wh.plnk/`, `.wh..wh.aufs`), carried by old layers: not content.
const AUFS_META: &[u8] = b".wh..wh.";
/// The PAX records that hold extended attributes.
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";
/// overlayfs's attributes: written here for opaque directories, never taken from a layer
/// (a layer's redirects or metacopy flags would steer the guest's overlay).
const OVERLAY_XATTR: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

/// A layer entry that could not be unpacked.
#[derive(Debug, thiserror::Error)]
#[error("layer entry {path}")]
struct EntryError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn entry_err(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |source| {
        io::Error::other(EntryError {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn nix_err(path: &Path) -> impl FnOnce(nix::Error) -> io::Error + '_ {
    move |e| entry_err(path)(e.into())
}

fn escape(path: &Path) -> io::Error {
    io::Error::other(ImageError::Escape(path.to_path_buf()))
}

/// Unpacks the layer tarball `reader` into the directory `dest` as an overlayfs layer (see
/// the module's doc). An error names the entry; what was unpacked before it stays.
///
/// A layer that whites out a name and also makes it (legal, rare) gets whichever of the two
/// comes later in the tar, as with any two entries for one name; two directories merge.
pub fn unpack_layer_as_overlay(reader: impl Read, dest: &Path) -> io::Result<()> {
    let mut ar = tar::Archive::new(reader);
    // `tar` writes regular files and symlinks; their owner, mode, times and attributes are
    // set here like every other kind's (`tar` sets attributes on regular files only, makes no
    // device nodes and cannot leave overlayfs's attributes out).
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_preserve_mtime(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(false);
    // Set once the whole layer is in: a marker may come before its directory's entry, and
    // entries made in a directory change its modification time.
    let mut opaque = Vec::new();
    let mut dir_times = Vec::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let path = entry.path()?.into_owned();
        let rel = normalise(&path)?;
        // The layer's root: the merged root's attributes are the upper directory's.
        let Some(name) = rel.file_name() else {
            continue;
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        if name.as_bytes() == OPAQUE_MARKER {
            opaque.push((dir_in(dest, parent_rel, &path, true)?, path));
            continue;
        }
        if rel.iter().any(|c| c.as_bytes().starts_with(AUFS_META)) {
            continue;
        }
        let parent = dir_in(dest, parent_rel, &path, true)?;
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(escape(&path));
            }
            whiteout(&parent.join(OsStr::from_bytes(hidden))).map_err(entry_err(&path))?;
            continue;
        }
        let target = parent.join(name);
        if let Some(mtime) = unpack_entry(&mut entry, kind, dest, &target, &path)? {
            dir_times.push((target, path, mtime));
        }
    }
    for (dir, path) in &opaque {
        // A later entry may have put something else there (it wins).
        if is_dir(dir) {
            lsetxattr(dir, OPAQUE_XATTR, b"y").map_err(entry_err(path))?;
        }
    }
    for (dir, path, mtime) in &dir_times {
        if is_dir(dir) {
            set_times(dir, *mtime).map_err(entry_err(path))?;
        }
    }
    Ok(())
}

/// Unpacks one entry that is neither a whiteout nor a marker at `target`; for a directory,
/// returns the modification time to set once the layer is in.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<R>,
    kind: EntryType,
    dest: &Path,
    target: &Path,
    path: &Path,
) -> io::Result<Option<TimeSpec>> {
    let meta = Meta::of(entry).map_err(entry_err(path))?;
    let existing = fs::symlink_metadata(target).ok();
    // A later entry for a name replaces the earlier one; a directory over a directory merges.
    if existing
        .as_ref()
        .is_some_and(|md| !(md.is_dir() && kind.is_dir()))
    {
        remove_any(target).map_err(entry_err(path))?;
    }
    match kind {
        EntryType::Directory => {
            if !existing.is_some_and(|md| md.is_dir()) {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(target)
                    .map_err(entry_err(path))?;
            }
            meta.apply(target, false).map_err(entry_err(path))?;
            return Ok(Some(meta.mtime));
        }
        EntryType::Link => {
            let link = entry
                .link_name()
                .map_err(entry_err(path))?
                .ok_or_else(|| entry_err(path)(io::Error::other("a hard link without a target")))?
                .into_owned();
            let src_rel = normalise(&link).map_err(|_| escape(path))?;
            let Some(src_name) = src_rel.file_name() else {
                return Err(entry_err(path)(io::Error::other("a hard link to the root")));
            };
            let src_parent = src_rel.parent().unwrap_or(Path::new(""));
            let src = dir_in(dest, src_parent, path, false)?.join(src_name);
            // The link's owner and mode are its target's: nothing more to set.
            fs::hard_link(&src, target).map_err(entry_err(path))?;
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let (sflag, dev) = match kind {
                EntryType::Char => (SFlag::S_IFCHR, device(entry.header())),
                EntryType::Block => (SFlag::S_IFBLK, device(entry.header())),
                // A fifo's device fields may be blank.
                _ => (SFlag::S_IFIFO, Ok(0)),
            };
            let dev = dev.map_err(entry_err(path))?;
            mknod(target, sflag, Mode::empty(), dev).map_err(nix_err(path))?;
            meta.apply(target, true).map_err(entry_err(path))?;
        }
        // Regular files (`tar` keeps their holes), symlinks, and kinds tar readers take as
        // regular files.
        _ => {
            entry.unpack(target).map_err(entry_err(path))?;
            meta.apply(target, true).map_err(entry_err(path))?;
        }
    }
    Ok(None)
}

/// A device node's number.
fn device(h: &tar::Header) -> io::Result<libc::dev_t> {
    let major = h.device_major()?.unwrap_or(0);
    let minor = h.device_minor()?.unwrap_or(0);
    Ok(makedev(major.into(), minor.into()))
}

/// `path` as plain names (`.` left out); refuses `..` and a root.
fn normalise(path: &Path) -> io::Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(escape(path));
            }
        }
    }
    Ok(rel)
}

/// `dest/rel`, a directory of this layer. With `make`, each missing directory on the way is
/// made (0755, as tar does) and a whiteout on the way is replaced by one (the layer deleted
/// the name, then made it again). A symlink on the way is refused for `entry`.
fn dir_in(dest: &Path, rel: &Path, entry: &Path, make: bool) -> io::Result<PathBuf> {
    let mut cur = dest.to_path_buf();
    for c in rel.iter() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => continue,
            Ok(md) if md.file_type().is_symlink() => return Err(escape(entry)),
            Ok(md) if make && is_whiteout(&md) => {
                fs::remove_file(&cur).map_err(entry_err(entry))?;
            }
            Ok(_) => {
                return Err(entry_err(entry)(io::Error::from_raw_os_error(
                    libc::ENOTDIR,
                )))
            }
            Err(e) if make && e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(entry_err(entry)(e)),
        }
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&cur)
            .map_err(entry_err(entry))?;
    }
    Ok(cur)
}

fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|md| md.is_dir())
}

/// Makes `at` overlayfs's whiteout, replacing whatever this layer put there.
fn whiteout(at: &Path) -> io::Result<()> {
    remove_any(at)?;
    mknod(at, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))?;
    Ok(())
}

/// Removes `p` (a whole tree for a directory) without following a symlink; nothing there is
/// fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An entry's owner, mode, modification time and extended attributes.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    /// From the header, with its PAX records (`tar` already applied `uid` and `gid`).
    fn of<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Meta> {
        let h = entry.header();
        let id = |v: u64| u32::try_from(v).map_err(|_| io::Error::other("owner out of range"));
        let (uid, gid) = (id(h.uid()?)?, id(h.gid()?)?);
        let mode = h.mode()? & 0o7777;
        let secs = i64::try_from(h.mtime()?).map_err(|_| io::Error::other("mtime out of range"))?;
        let mut meta = Meta {
            uid,
            gid,
            mode,
            mtime: TimeSpec::new(secs, 0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                if ext.key_bytes() == b"mtime" {
                    if let Some(t) = ext.value().ok().and_then(pax_time) {
                        meta.mtime = t;
                    }
                } else if let Some(name) = ext.key_bytes().strip_prefix(PAX_XATTR) {
                    if !name.starts_with(OVERLAY_XATTR) {
                        meta.xattrs
                            .push((CString::new(name)?, ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(meta)
    }

    /// Sets it on `path`: owner, then mode (a chown clears set-id bits), then attributes (a
    /// chown clears `security.capability`), then, with `times`, the modification time. A
    /// symlink has no mode of its own.
    fn apply(&self, path: &Path, times: bool) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        if !fs::symlink_metadata(path)?.file_type().is_symlink() {
            fs::set_permissions(path, fs::Permissions::from_mode(self.mode))?;
        }
        for (name, value) in &self.xattrs {
            lsetxattr(path, name, value)?;
        }
        if times {
            set_times(path, self.mtime)?;
        }
        Ok(())
    }
}

/// A PAX time, `SECONDS[.FRACTION]` (either may be negative: `-1.5` is 1.5 s before the epoch).
fn pax_time(v: &str) -> Option<TimeSpec> {
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let mut secs: i64 = s.parse().ok()?;
    let digits = &frac[..frac.len().min(9)];
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nsec: i64 = format!("{digits:0<9}").parse().ok()?;
    if s.starts_with('-') && nsec > 0 {
        secs -= 1;
        nsec = 1_000_000_000 - nsec;
    }
    Some(TimeSpec::new(secs, nsec))
}

/// Sets the access and modification times of `path` (a symlink itself, not its target).
fn set_times(path: &Path, t: TimeSpec) -> io::Result<()> {
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

/// `lsetxattr(2)`: sets the attribute on `path` itself, never on a symlink's target.
pub fn lsetxattr(path: &Path, name: &CStr, value: &[u8]) -> io::Result<()> {
    let r = path.with_nix_path(|p| {
        // SAFETY: `p` and `name` are NUL-terminated strings that live through the call, and
        // `value`'s pointer and length describe one live slice; the call keeps none of them.
        unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    })?;
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    //! Real layers unpacked into temporary directories; whiteouts, opaque directories and
    //! owners need root, and these tests fail (never skip) without it.

    use std::os::unix::fs::FileTypeExt;

    use super::*;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: device nodes, owners, trusted.* xattrs"
        );
    }

    const MTIME: u64 = 1_600_000_000;

    fn header(kind: EntryType, mode: u32, size: usize) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h
    }

    /// A layer tarball, entry by entry.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn entry(mut self, mut h: tar::Header, path: &str, data: &[u8]) -> Self {
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }

        fn file(self, path: &str, data: &[u8]) -> Self {
            self.entry(header(EntryType::Regular, 0o644, data.len()), path, data)
        }

        fn dir(self, path: &str, mode: u32) -> Self {
            self.entry(header(EntryType::Directory, mode, 0), path, b"")
        }

        fn link(mut self, kind: EntryType, path: &str, target: &str) -> Self {
            let mut h = header(kind, 0o777, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        /// An entry whose name is written as is (`tar` refuses to write `..` or a root).
        fn raw(mut self, name: &[u8]) -> Self {
            let mut h = header(EntryType::Regular, 0o644, 0);
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }

        /// PAX records for the next entry.
        fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
            self.0
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
            self
        }

        fn unpack(self, dest: &Path) -> io::Result<()> {
            unpack_layer_as_overlay(&self.0.into_inner().unwrap()[..], dest)
        }
    }

    /// `lgetxattr(2)`; None when `path` has no attribute `name`.
    fn xattr(path: &Path, name: &CStr) -> Option<Vec<u8>> {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: `p` and `name` are NUL-terminated and live through the call; `buf` is a
        // live buffer of the length given.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "{e}");
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    fn assert_whiteout(p: &Path) {
        let md = fs::symlink_metadata(p).unwrap();
        assert!(
            md.file_type().is_char_device(),
            "{} is not a whiteout",
            p.display()
        );
        assert_eq!(md.rdev(), 0);
        assert_eq!(md.mode() & 0o7777, 0);
    }

    #[test]
    fn whiteouts_and_opaque_markers_take_overlayfs_form() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        Tar::new()
            .file("etc/keep", b"k")
            .file("etc/.wh.gone", b"")
            .file("var/.wh..wh..opq", b"")
            .file("var/new", b"n")
            .unpack(d.path())
            .unwrap();
        assert_eq!(fs::read(d.path().join("etc/keep")).unwrap(), b"k");
        assert_whiteout(&d.path().join("etc/gone"));
        assert!(!d.path().join("etc/.wh.gone").exists());
        assert_eq!(
            xattr(&d.path().join("var"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(!d.path().join("var/.wh..wh..opq").exists());
        assert_eq!(fs::read(d.path().join("var/new")).unwrap(), b"n");
        assert_eq!(xattr(&d.path().join("etc"), OPAQUE_XATTR), None);
    }

    #[test]
    fn an_opaque_marker_may_come_before_or_after_its_directory() {
        require_root();
        let marker_first = Tar::new()
            .file("d/.wh..wh..opq", b"")
            .dir("d", 0o750)
            .file("d/x", b"x");
        let marker_last = Tar::new()
            .dir("d", 0o750)
            .file("d/x", b"x")
            .file("d/.wh..wh..opq", b"");
        for layer in [marker_first, marker_last] {
            let d = tempfile::tempdir().unwrap();
            layer.unpack(d.path()).unwrap();
            let dir = d.path().join("d");
            assert_eq!(xattr(&dir, OPAQUE_XATTR).as_deref(), Some(&b"y"[..]));
            assert_eq!(fs::read(dir.join("x")).unwrap(), b"x");
            let md = fs::symlink_metadata(&dir).unwrap();
            assert_eq!(md.mode() & 0o7777, 0o750);
            // Set after its entries were made in it.
            assert_eq!(md.mtime(), MTIME as i64);
        }
    }

    #[test]
    fn entries_keep_owner_mode_times_links_devices_and_attributes() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let mut suid = header(EntryType::Regular, 0o4755, 3);
        suid.set_uid(1000);
        suid.set_gid(100);
        let mut tty = header(EntryType::Char, 0o620, 0);
        tty.set_device_major(4).unwrap();
        tty.set_device_minor(1).unwrap();
        let mut link = header(EntryType::Symlink, 0o777, 0);
        link.set_uid(7);
        let mut l = Tar::new();
        l.0.append_link(&mut link, "bin/sh", "busybox").unwrap();
        l.pax(&[("SCHILY.xattr.user.dir", b"1")])
            .dir("bin", 0o755)
            .pax(&[
                ("SCHILY.xattr.user.tag", b"v"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
                ("mtime", b"1500000000.25"),
            ])
            .entry(suid, "bin/busybox", b"elf")
            .link(EntryType::Link, "bin/ls", "bin/busybox")
            .entry(tty, "dev/tty1", b"")
            .entry(header(EntryType::Fifo, 0o600, 0), "run/fifo", b"")
            .unpack(d.path())
            .unwrap();
        let p = |s: &str| d.path().join(s);
        let bb = fs::symlink_metadata(p("bin/busybox")).unwrap();
        assert_eq!(
            (bb.uid(), bb.gid(), bb.mode() & 0o7777),
            (1000, 100, 0o4755)
        );
        assert_eq!((bb.mtime(), bb.mtime_nsec()), (1_500_000_000, 250_000_000));
        assert_eq!(
            xattr(&p("bin/busybox"), c"user.tag").as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(xattr(&p("bin/busybox"), c"trusted.overlay.redirect"), None);
        assert_eq!(xattr(&p("bin"), c"user.dir").as_deref(), Some(&b"1"[..]));
        assert_eq!(fs::symlink_metadata(p("bin/ls")).unwrap().ino(), bb.ino());
        let sh = fs::symlink_metadata(p("bin/sh")).unwrap();
        assert!(sh.file_type().is_symlink());
        assert_eq!((sh.uid(), sh.mtime()), (7, MTIME as i64));
        assert_eq!(fs::read_link(p("bin/sh")).unwrap(), Path::new("busybox"));
        let tty = fs::symlink_metadata(p("dev/tty1")).unwrap();
        assert!(tty.file_type().is_char_device());
        assert_eq!((tty.rdev(), tty.mode() & 0o7777), (makedev(4, 1), 0o620));
        let fifo = fs::symlink_metadata(p("run/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o600);
    }

    #[test]
    fn a_later_entry_for_a_name_wins_and_aufs_metadata_is_left_out() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        Tar::new()
            .file(".wh.made", b"")
            .file("made", b"again")
            .file("gone", b"first")
            .file(".wh.gone", b"")
            .file(".wh.dir", b"")
            .file("dir/inner", b"i")
            .file(".wh..wh.plnk/1.2", b"")
            .file(".wh..wh.aufs", b"")
            .unpack(d.path())
            .unwrap();
        assert_eq!(fs::read(d.path().join("made")).unwrap(), b"again");
        assert_whiteout(&d.path().join("gone"));
        assert_eq!(fs::read(d.path().join("dir/inner")).unwrap(), b"i");
        let mut names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "gone", "made"]);
    }

    #[test]
    fn entries_that_escape_are_refused_by_name() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"p").unwrap();
        let out = outside.to_str().unwrap();
        let cases: Vec<(Tar, &str)> = vec![
            (Tar::new().raw(b"../x"), "../x"),
            (Tar::new().raw(b"a/../../x"), "a/../../x"),
            (Tar::new().raw(b"/x"), "/x"),
            (
                Tar::new()
                    .link(EntryType::Symlink, "l", out)
                    .file("l/x", b"x"),
                "l/x",
            ),
            // Even a link that stays inside: the guest resolves it against its own root.
            (
                Tar::new()
                    .link(EntryType::Symlink, "here", ".")
                    .file("here/x", b"x"),
                "here/x",
            ),
            (
                Tar::new()
                    .link(EntryType::Symlink, "l", out)
                    .file("l/.wh.precious", b""),
                "l/.wh.precious",
            ),
            (
                Tar::new()
                    .link(EntryType::Symlink, "l", out)
                    .file("l/.wh..wh..opq", b""),
                "l/.wh..wh..opq",
            ),
            (
                Tar::new().link(EntryType::Symlink, "l", out).link(
                    EntryType::Link,
                    "h",
                    "l/precious",
                ),
                "h",
            ),
            (
                Tar::new().link(EntryType::Link, "h", "../outside/precious"),
                "h",
            ),
            (Tar::new().link(EntryType::Link, "h", out), "h"),
            (Tar::new().file("d/.wh.", b""), "d/.wh."),
            (Tar::new().file(".wh..", b""), ".wh.."),
            (Tar::new().raw(b".wh..."), ".wh..."),
        ];
        for (i, (layer, name)) in cases.into_iter().enumerate() {
            let dest = d.path().join(format!("layer{i}"));
            fs::create_dir(&dest).unwrap();
            let e = layer.unpack(&dest).unwrap_err();
            match e.get_ref().and_then(|e| e.downcast_ref::<ImageError>()) {
                Some(ImageError::Escape(p)) => assert_eq!(p, Path::new(name)),
                _ => panic!("{name}: {e}"),
            }
            assert!(!d.path().join("x").exists(), "{name}");
            let mut left: Vec<_> = fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            left.sort();
            assert_eq!(left, ["precious"], "{name}");
            assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p", "{name}");
            let md = fs::metadata(outside.join("precious")).unwrap();
            assert_eq!(md.nlink(), 1, "{name}");
        }
    }

    #[test]
    fn pax_times_parse_with_fractions_and_signs() {
        assert_eq!(pax_time("12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(pax_time("12.5"), Some(TimeSpec::new(12, 500_000_000)));
        assert_eq!(pax_time("-1.25"), Some(TimeSpec::new(-2, 750_000_000)));
        assert_eq!(pax_time("1.0000000019"), Some(TimeSpec::new(1, 1)));
        assert_eq!(pax_time("x"), None);
        assert_eq!(pax_time("1.x"), None);
    }
}
