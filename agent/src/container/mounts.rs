//! The container's file system: mount options, OCI mounts, /dev, pivot_root, read-only
//! root, masked and read-only paths. Runs in the container's init process, in its new mount
//! namespace; all privileged calls go through [`Syscall`].

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::fs::{symlink, FileTypeExt, MetadataExt},
    path::{Component, Path, PathBuf},
};

use nix::{
    mount::MsFlags,
    sys::stat::{Mode, SFlag},
};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::{
    channel::{ChildError, Step},
    syscall::Syscall,
};

/// Mount options split into what mount(2) takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set (MS_RDONLY, MS_NOSUID, MS_BIND, MS_REC, ...).
    pub flags: MsFlags,
    /// Propagation to apply after mounting (MS_SHARED, MS_SLAVE, ... with MS_REC for r*).
    pub propagation: MsFlags,
    /// File-system specific options (`mode=755`, `newinstance`, ...), joined with commas.
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    /// The data argument of mount(2), None when empty.
    pub fn data(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// Splits OCI / fstab mount options into flags, propagation and data.
pub fn parse_options<S: AsRef<str>>(opts: &[S]) -> MountOptions {
    let mut m = MountOptions::default();
    for o in opts {
        let o = o.as_ref();
        let (set, clear) = match o {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                m.propagation = propagation(o).unwrap_or(m.propagation);
                continue;
            }
            // runc extensions without meaning here.
            "tmpcopyup" | "idmap" | "ridmap" => {
                tracing::debug!("mount option {o:?} is not supported; ignored");
                continue;
            }
            other => {
                m.data.push(other.to_string());
                continue;
            }
        };
        m.flags.insert(set);
        m.flags.remove(clear);
    }
    m
}

/// The propagation flags of a propagation name (`rslave` -> MS_SLAVE|MS_REC).
pub fn propagation(name: &str) -> Option<MsFlags> {
    let (rec, base) = match name.strip_prefix('r') {
        Some(b) if b != "o" => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), name),
    };
    let f = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(f | rec)
}

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

fn mkdir_all(p: &Path) -> Result<(), ChildError> {
    fs::create_dir_all(p).step(|| format!("creating directory {}", p.display()))
}

/// Makes sure a mount point exists: a directory, or an empty file when `file`.
fn ensure_mount_point(p: &Path, file: bool) -> Result<(), ChildError> {
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

/// The default devices of a container's /dev: (name, major, minor).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Creates a device node below `rootfs`: mknod, or a bind mount of the host's node when
/// mknod is not allowed.
fn create_device(sys: &dyn Syscall, rootfs: &Path, d: &LinuxDevice) -> Result<(), ChildError> {
    let dest =
        secure_join(rootfs, d.path()).step(|| format!("resolving {}", d.path().display()))?;
    if let Some(parent) = dest.parent() {
        mkdir_all(parent)?;
    }
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(ChildError::new(
                format!("creating device {}", d.path().display()),
                "type \"a\" is not a device node type",
            ))
        }
    };
    let dev = nix::sys::stat::makedev(d.major() as u64, d.minor() as u64);
    let mode = Mode::from_bits_truncate(d.file_mode().unwrap_or(0o666) & 0o7777);
    let _ = fs::remove_file(&dest);
    match sys.mknod(&dest, kind, mode, dev) {
        Ok(()) => {
            if d.uid().is_some() || d.gid().is_some() {
                sys.chown(&dest, d.uid(), d.gid())
                    .step(|| format!("chown of device {}", d.path().display()))?;
            }
            Ok(())
        }
        Err(nix::errno::Errno::EPERM) => {
            // Bind the host's node of the same path instead.
            ensure_mount_point(&dest, true)?;
            sys.mount(Some(d.path()), &dest, None, MsFlags::MS_BIND, None)
                .step(|| format!("bind-mounting device {}", d.path().display()))
        }
        Err(e) => Err(ChildError::sys(
            format!("creating device {}", d.path().display()),
            e,
        )),
    }
}

fn default_device(name: &str, major: u64, minor: u64) -> LinuxDevice {
    let mut d = LinuxDevice::default();
    d.set_path(PathBuf::from("/dev").join(name));
    d.set_typ(LinuxDeviceType::C);
    d.set_major(major as i64);
    d.set_minor(minor as i64);
    d.set_file_mode(Some(0o666));
    d
}

/// Whether the spec mounts a fresh file system (not a bind) at /dev.
fn has_dev_tmpfs(spec: &Spec) -> bool {
    spec.mounts().iter().flatten().any(|m| {
        m.destination() == Path::new("/dev")
            && m.typ().as_deref() != Some("bind")
            && !parse_options(m.options().as_deref().unwrap_or_default()).is_bind()
    })
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

    let linux = spec.linux().as_ref();
    if has_dev_tmpfs(spec) {
        for (name, major, minor) in DEFAULT_DEVICES {
            create_device(sys, rootfs, &default_device(name, major, minor))?;
        }
        let dev = rootfs.join("dev");
        let links = [
            ("/proc/self/fd", "fd"),
            ("/proc/self/fd/0", "stdin"),
            ("/proc/self/fd/1", "stdout"),
            ("/proc/self/fd/2", "stderr"),
            ("pts/ptmx", "ptmx"),
        ];
        for (target, name) in links {
            let p = dev.join(name);
            if name == "ptmx" {
                let _ = fs::remove_file(&p);
            }
            match symlink(target, &p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ChildError::io(format!("creating /dev/{name}"), &e)),
            }
        }
        if fs::symlink_metadata(dev.join("shm")).is_err() {
            mkdir_all(&dev.join("shm"))?;
        }
    }
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        create_device(sys, rootfs, d)?;
    }
    Ok(())
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
    use super::super::syscall::test::{mount_call, Call, Recorder};
    use super::*;
    use serde_json::json;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&["nosuid", "noexec", "nodev", "mode=755", "size=65536k", "ro"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data().as_deref(), Some("mode=755,size=65536k"));
        assert!(o.propagation.is_empty());

        let o = parse_options(&["rbind", "rslave", "ro", "rw"]);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert!(o.is_bind());
        assert_eq!(o.data(), None);

        let o = parse_options(&["newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]);
        assert_eq!(
            o.data().as_deref(),
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5")
        );
    }

    #[test]
    fn propagation_names() {
        assert_eq!(propagation("private"), Some(MsFlags::MS_PRIVATE));
        assert_eq!(
            propagation("rshared"),
            Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
        );
        assert_eq!(
            propagation("runbindable"),
            Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC)
        );
        assert_eq!(propagation("ro"), None);
        assert_eq!(propagation("bogus"), None);
    }

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
    fn devices_fall_back_to_bind_mounts() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let sys = Recorder {
            mknod_fails: true,
            ..Default::default()
        };
        create_device(&sys, root, &default_device("null", 1, 3)).unwrap();
        assert_eq!(
            sys.mounts(),
            vec![mount_call(
                Some(Path::new("/dev/null")),
                &root.join("dev/null"),
                None,
                MsFlags::MS_BIND,
                None
            )]
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

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }
}
