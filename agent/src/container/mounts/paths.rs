//! Paths below a rootfs: resolving them without leaving it, making mount points, and
//! small checks on paths.

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Component, Path, PathBuf},
};

use crate::container::channel::{ChildError, Step};

/// Resolves `unsafe_path` inside `root` as if `root` were `/`: `..` and symlinks (absolute
/// ones included) never lead outside `root`. Missing components are kept as they are.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = unsafe_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

pub(super) fn mkdir_all(p: &Path) -> Result<(), ChildError> {
    fs::create_dir_all(p).step(|| format!("creating directory {}", p.display()))
}

/// Makes sure a mount point exists: a directory, or an empty file when `file`.
pub(super) fn ensure_mount_point(p: &Path, file: bool) -> Result<(), ChildError> {
    if fs::symlink_metadata(p).is_ok() {
        return Ok(());
    }
    if file {
        if let Some(parent) = p.parent() {
            mkdir_all(parent)?;
        }
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map(drop)
            .step(|| format!("creating mount point {}", p.display()))
    } else {
        mkdir_all(p)
    }
}

/// Whether `p` is a character device (for checks in tests and setup).
pub fn is_char_device(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.file_type().is_char_device())
}

/// Whether `p` is the root of a mount (its device differs from its parent's).
pub fn is_mount_point(p: &Path) -> bool {
    let (Ok(a), Ok(b)) = (fs::metadata(p), fs::metadata(p.join(".."))) else {
        return false;
    };
    a.dev() != b.dev() || a.ino() == b.ino()
}

/// `/proc/sys` path of a sysctl key (`net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`).
pub fn sysctl_path(key: &str) -> PathBuf {
    let rel: PathBuf = key.split('.').map(OsStr::new).collect();
    Path::new("/proc/sys").join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn secure_join_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("/etc", root.join("a/abs")).unwrap();
        symlink("../../../../..", root.join("a/up")).unwrap();
        symlink("b", root.join("a/rel")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/a/b")).unwrap(),
            root.join("a/b")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/abs/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/up/etc")).unwrap(),
            root.join("etc")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/rel/c")).unwrap(),
            root.join("a/b/c")
        );
        assert_eq!(
            secure_join(root, Path::new("/loop"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }
}
