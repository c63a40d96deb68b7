//! Where the container's root file system comes from: a directory as it is, or a block
//! device (a drive slot of the VM) that the agent mounts, through [`Syscall`] like every
//! other mount, and unmounts on destroy.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags},
};

use super::{mounts, syscall::Syscall, CreateError, DestroyError};

/// Where a container's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// A directory holding the rootfs.
    Path(PathBuf),
    /// A block device to mount (e.g. /dev/vdb, ext4/erofs), at <state_dir>/<id>/rootfs.
    Block {
        source: PathBuf,
        fstype: String,
        options: Vec<String>,
        readonly: bool,
    },
    /// Image layers stacked under a writable upper (see [`super::layers`]).
    Layered(super::Layered),
}

/// How long a block rootfs may take to get its media (a drive slot the VMM just filled).
const MEDIA_TIMEOUT: Duration = Duration::from_secs(10);

/// Mounts the block device `source` (a file system of type `fstype`, with mount `options`,
/// read-only when `readonly`) at `target`, which is created if missing. Waits (bounded) for
/// the device's media first.
pub fn mount_block(
    sys: &dyn Syscall,
    source: &Path,
    fstype: &str,
    options: &[String],
    readonly: bool,
    target: &Path,
) -> Result<(), CreateError> {
    wait_for_media(source, MEDIA_TIMEOUT);
    fs::create_dir_all(target).map_err(|e| CreateError::StateDir {
        path: target.to_path_buf(),
        source: e,
    })?;
    let mut opts = mounts::parse_options(options);
    if readonly {
        opts.flags.insert(MsFlags::MS_RDONLY);
    }
    sys.mount(
        Some(source),
        target,
        Some(fstype),
        opts.flags,
        opts.data().as_deref(),
    )
    .map_err(|e| CreateError::MountRootfs {
        source_dev: source.to_path_buf(),
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        source: e,
    })
}

/// Unmounts a block rootfs mounted by [`mount_block`]: lazily when it is busy; not mounted
/// (any more) is fine.
pub fn unmount(sys: &dyn Syscall, target: &Path) -> Result<(), DestroyError> {
    let err = |source| DestroyError::Unmount {
        path: target.to_path_buf(),
        source,
    };
    match sys.umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => sys.umount2(target, MntFlags::MNT_DETACH).map_err(err),
        Err(source) => Err(err(source)),
    }
}

/// Waits (bounded) while the block device `dev` has no media (size 0): a drive the
/// VMM filled a moment ago reaches the guest kernel as a config-change interrupt, and the
/// new capacity shows up shortly after. Mounting before that fails with a confusing "can't
/// read superblock"; after the timeout the mount's own error says what is wrong.
fn wait_for_media(dev: &Path, timeout: Duration) {
    let Some(name) = dev.file_name() else { return };
    let size = Path::new("/sys/class/block").join(name).join("size");
    let deadline = Instant::now() + timeout;
    loop {
        // No such block device: nothing to wait for (the mount says so).
        let Ok(text) = fs::read_to_string(&size) else {
            return;
        };
        let ready = text.trim().parse::<u64>().is_ok_and(|sectors| sectors > 0);
        if ready || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::super::syscall::test::{mount_call, Call, Recorder};
    use super::*;

    #[test]
    fn a_block_rootfs_is_mounted_through_the_syscall_seam() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("c1/rootfs");
        let dev = Path::new("/dev/husk-test-no-such-disk");
        let sys = Recorder::default();
        let opts = ["noatime".to_string(), "errors=remount-ro".to_string()];
        mount_block(&sys, dev, "ext4", &opts, true, &target).unwrap();
        assert!(target.is_dir());
        assert_eq!(
            sys.mounts(),
            vec![mount_call(
                Some(dev),
                &target,
                Some("ext4"),
                MsFlags::MS_NOATIME | MsFlags::MS_RDONLY,
                Some("errors=remount-ro")
            )]
        );
        unmount(&sys, &target).unwrap();
        assert_eq!(
            sys.calls.borrow().last(),
            Some(&Call::Umount(target.clone()))
        );
    }
}
