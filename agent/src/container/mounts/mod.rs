//! The container's file system: OCI mounts, pivot_root, read-only root, masked and
//! read-only paths; [`options`] parses mount options, [`devices`] makes /dev, [`paths`]
//! resolves paths inside the rootfs. Runs in the container's init process, in its new mount
//! namespace; all privileged calls go through [`Syscall`].

mod devices;
mod options;
mod paths;

use std::{fs, path::Path};

use nix::mount::MsFlags;
use oci_spec::runtime::{Mount, Spec};

use super::{
    channel::{ChildError, Step},
    syscall::Syscall,
};

pub use options::{parse_options, propagation, MountOptions};
use paths::ensure_mount_point;
pub use paths::{is_char_device, is_mount_point, secure_join, sysctl_path};

fn display(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// Mounts one OCI mount below `rootfs`.
pub fn mount_one(sys: &dyn Syscall, rootfs: &Path, m: &Mount) -> Result<(), ChildError> {
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let dest = secure_join(rootfs, m.destination())
        .step(|| format!("resolving {}", m.destination().display()))?;
    let typ = m.typ().as_deref().unwrap_or("");
    let what = format!("mounting {typ} at {}", m.destination().display());
    if typ == "bind" || opts.is_bind() {
        let src = m
            .source()
            .as_deref()
            .ok_or_else(|| ChildError::new(&what, "a bind mount needs a source"))?;
        let md = fs::metadata(src).step(|| format!("{what}: source {}", src.display()))?;
        ensure_mount_point(&dest, !md.is_dir())?;
        let bind = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        sys.mount(Some(src), &dest, None, bind, None)
            .step(|| what.clone())?;
        // Flags other than bind/rec need a remount of the bind mount.
        let extra = opts.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            sys.mount(
                None,
                &dest,
                None,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )
            .step(|| format!("{what}: remounting with {extra:?}"))?;
        }
    } else {
        ensure_mount_point(&dest, false)?;
        let (fstype, source, data) = match typ {
            // Always cgroup v2: the guest has no v1 hierarchy.
            "cgroup" | "cgroup2" => ("cgroup2", Some(Path::new("cgroup2")), None),
            "" => {
                return Err(ChildError::new(
                    &what,
                    "the mount has no type and is not a bind mount",
                ))
            }
            t => (t, m.source().as_deref(), opts.data()),
        };
        let source = source.or(Some(Path::new("none")));
        sys.mount(source, &dest, Some(fstype), opts.flags, data.as_deref())
            .step(|| {
                format!(
                    "{what} (source {:?}, options {:?})",
                    display(source),
                    data.unwrap_or_default()
                )
            })?;
    }
    if !opts.propagation.is_empty() {
        sys.mount(None, &dest, None, opts.propagation, None)
            .step(|| format!("{what}: setting propagation"))?;
    }
    Ok(())
}

/// Everything before pivot_root: propagation, the rootfs bind, the spec's mounts and /dev.
pub fn prepare_rootfs(sys: &dyn Syscall, spec: &Spec, rootfs: &Path) -> Result<(), ChildError> {
    // Nothing we mount may propagate back to the agent's namespace.
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )
    .step(|| "making / rslave".into())?;
    // pivot_root needs the new root to be a mount point.
    sys.mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .step(|| format!("bind-mounting the rootfs {}", rootfs.display()))?;

    for m in spec.mounts().iter().flatten() {
        mount_one(sys, rootfs, m)?;
    }

    devices::populate(sys, spec, rootfs)
}

/// Remounts the mount at `path` with `add` flags, keeping the flags it has.
fn remount(sys: &dyn Syscall, path: &Path, add: MsFlags) -> nix::Result<()> {
    let keep = sys.mount_flags(path).unwrap_or(MsFlags::empty());
    sys.mount(
        None,
        path,
        None,
        keep | add | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
        None,
    )
}

/// After pivot_root: root propagation, masked and read-only paths, the read-only root.
pub fn finish_rootfs(sys: &dyn Syscall, spec: &Spec) -> Result<(), ChildError> {
    let root = Path::new("/");
    let linux = spec.linux().as_ref();
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        if let Some(flags) = propagation(p) {
            sys.mount(None, root, None, flags, None)
                .step(|| format!("setting rootfs propagation {p}"))?;
        }
    }
    for p in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        readonly_path(sys, root, Path::new(p))?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mask_path(sys, root, Path::new(p))?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        remount(sys, root, MsFlags::MS_RDONLY).step(|| "remounting / read-only".into())?;
    }
    Ok(())
}

/// Makes `path` (below `root`) read-only with a bind mount onto itself; missing is fine.
pub fn readonly_path(sys: &dyn Syscall, root: &Path, path: &Path) -> Result<(), ChildError> {
    let p = secure_join(root, path).step(|| format!("resolving {}", path.display()))?;
    if fs::symlink_metadata(&p).is_err() {
        return Ok(());
    }
    let what = || format!("making {} read-only", path.display());
    sys.mount(Some(&p), &p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
        .step(what)?;
    remount(sys, &p, MsFlags::MS_RDONLY | MsFlags::MS_REC).step(what)
}

/// Hides `path` (below `root`): /dev/null over a file, an empty read-only tmpfs over a
/// directory; missing is fine.
pub fn mask_path(sys: &dyn Syscall, root: &Path, path: &Path) -> Result<(), ChildError> {
    let p = secure_join(root, path).step(|| format!("resolving {}", path.display()))?;
    let Ok(md) = fs::metadata(&p) else {
        return Ok(());
    };
    let what = || format!("masking {}", path.display());
    if md.is_dir() {
        sys.mount(
            Some(Path::new("tmpfs")),
            &p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        )
        .step(what)
    } else {
        sys.mount(
            Some(&root.join("dev/null")),
            &p,
            None,
            MsFlags::MS_BIND,
            None,
        )
        .step(what)
    }
}

#[cfg(test)]
mod tests {
    use super::super::syscall::test::{mount_call, Call, Recorder};
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::symlink;

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn prepare_mounts_the_spec_and_makes_dev() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let host = d.path().join("hostfile");
        fs::write(&host, "x").unwrap();
        let s = spec(json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["ro", "nosuid"]},
                {"destination": "/etc/hosts", "type": "bind", "source": host,
                 "options": ["rbind", "ro", "rprivate"]}
            ],
            "linux": {"namespaces": [{"type": "mount"}]}
        }));
        let sys = Recorder::default();
        prepare_rootfs(&sys, &s, &root).unwrap();
        let m = sys.mounts();
        assert_eq!(
            m[0],
            mount_call(
                None,
                Path::new("/"),
                None,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None
            )
        );
        assert_eq!(
            m[1],
            mount_call(
                Some(&root),
                &root,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None
            )
        );
        assert_eq!(
            m[2],
            mount_call(
                Some(Path::new("proc")),
                &root.join("proc"),
                Some("proc"),
                MsFlags::empty(),
                None
            )
        );
        assert_eq!(
            m[3],
            mount_call(
                Some(Path::new("tmpfs")),
                &root.join("dev"),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                Some("mode=755,size=65536k")
            )
        );
        assert_eq!(
            m[4],
            mount_call(
                Some(Path::new("devpts")),
                &root.join("dev/pts"),
                Some("devpts"),
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=0620")
            )
        );
        assert_eq!(
            m[5],
            mount_call(
                Some(Path::new("cgroup2")),
                &root.join("sys/fs/cgroup"),
                Some("cgroup2"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
                None
            )
        );
        // Bind, then a remount for ro, then propagation.
        assert_eq!(
            m[6],
            mount_call(
                Some(&host),
                &root.join("etc/hosts"),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None
            )
        );
        assert_eq!(
            m[7],
            mount_call(
                None,
                &root.join("etc/hosts"),
                None,
                MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None
            )
        );
        assert_eq!(
            m[8],
            mount_call(
                None,
                &root.join("etc/hosts"),
                None,
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                None
            )
        );
        assert_eq!(m.len(), 9);
        // Mount points were made: a file for the file bind, directories otherwise.
        assert!(root.join("etc/hosts").is_file());
        assert!(root.join("dev/pts").is_dir());
        assert!(root.join("sys/fs/cgroup").is_dir());
        // Devices and symlinks of a tmpfs /dev.
        let nodes: Vec<_> = sys
            .calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Mknod(p, _) => Some(p.strip_prefix(&root).unwrap().to_path_buf()),
                _ => None,
            })
            .collect();
        assert_eq!(
            nodes,
            ["null", "zero", "full", "random", "urandom", "tty"]
                .iter()
                .map(|n| Path::new("dev").join(n))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            fs::read_link(root.join("dev/ptmx")).unwrap(),
            Path::new("pts/ptmx")
        );
        assert_eq!(
            fs::read_link(root.join("dev/fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
        assert_eq!(
            fs::read_link(root.join("dev/stderr")).unwrap(),
            Path::new("/proc/self/fd/2")
        );
    }

    #[test]
    fn a_mount_escaping_by_symlink_lands_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        symlink("/", root.join("evil")).unwrap();
        let m: Mount = serde_json::from_value(json!(
            {"destination": "/evil/tmp/x", "type": "tmpfs", "source": "tmpfs"}
        ))
        .unwrap();
        let sys = Recorder::default();
        mount_one(&sys, root, &m).unwrap();
        match &sys.mounts()[0] {
            Call::Mount { target, .. } => assert_eq!(target, &root.join("tmp/x")),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn masked_and_readonly_paths() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("proc/acpi")).unwrap();
        fs::write(root.join("proc/kcore"), "").unwrap();
        fs::create_dir_all(root.join("proc/sys")).unwrap();
        let sys = Recorder::default();
        mask_path(&sys, root, Path::new("/proc/kcore")).unwrap();
        mask_path(&sys, root, Path::new("/proc/acpi")).unwrap();
        mask_path(&sys, root, Path::new("/proc/missing")).unwrap();
        readonly_path(&sys, root, Path::new("/proc/sys")).unwrap();
        let m = sys.mounts();
        assert_eq!(
            m[0],
            mount_call(
                Some(&root.join("dev/null")),
                &root.join("proc/kcore"),
                None,
                MsFlags::MS_BIND,
                None
            )
        );
        assert_eq!(
            m[1],
            mount_call(
                Some(Path::new("tmpfs")),
                &root.join("proc/acpi"),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None
            )
        );
        assert_eq!(
            m[2],
            mount_call(
                Some(&root.join("proc/sys")),
                &root.join("proc/sys"),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None
            )
        );
        // The remount keeps the flags the mount had (the double says nosuid).
        assert_eq!(
            m[3],
            mount_call(
                None,
                &root.join("proc/sys"),
                None,
                MsFlags::MS_NOSUID
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_REC
                    | MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT,
                None
            )
        );
        assert_eq!(m.len(), 4);
    }
}
