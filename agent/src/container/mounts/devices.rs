//! The container's device nodes: the default /dev of a fresh /dev mount (null, zero, ...,
//! the /proc/self/fd links, shm) and the spec's `linux.devices`.

use std::{
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use nix::{
    mount::MsFlags,
    sys::stat::{Mode, SFlag},
};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Spec};

use super::{
    options::parse_options,
    paths::{ensure_mount_point, mkdir_all, secure_join},
};
use crate::container::{
    channel::{ChildError, Step},
    syscall::Syscall,
};

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
        // Already there, e.g. /dev/ptmx, which resolves to the devpts mount's own node
        // (which cannot be removed): keep it, as runc does.
        Err(nix::errno::Errno::EEXIST) => Ok(()),
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

/// Makes the devices below `rootfs`: the defaults when the spec mounts a fresh /dev, then
/// the spec's own.
pub(super) fn populate(sys: &dyn Syscall, spec: &Spec, rootfs: &Path) -> Result<(), ChildError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::syscall::test::{mount_call, Recorder};

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
}
