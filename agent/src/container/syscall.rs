//! The privileged system calls of rootfs setup behind a trait, so the mount logic can be
//! unit-tested without root: [`Linux`] calls the kernel, tests record the calls.
//!
//! Plain file-system work (mkdir, creating mount-point files, symlinks) is done with `std::fs`
//! directly; it works unprivileged on a temporary directory.

use std::path::Path;

use nix::{
    mount::{MntFlags, MsFlags},
    sys::stat::{Mode, SFlag},
};

/// The privileged calls mount setup makes.
pub trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    /// Makes `new_root` the root of the mount namespace and drops the old root
    /// (the `pivot_root(".", ".")` sequence); the cwd is `/` afterwards.
    fn pivot_root(&self, new_root: &Path) -> nix::Result<()>;
    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> nix::Result<()>;
    fn chown(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> nix::Result<()>;
    /// The mount flags (MS_RDONLY, MS_NOSUID, ...) of the mount holding `path`.
    fn mount_flags(&self, path: &Path) -> nix::Result<MsFlags>;
    /// Makes bytes `start`..`start + length` of the disk `disk` its partition `pno`
    /// (BLKPG_ADD_PARTITION: no partition table is read or written).
    fn add_partition(&self, disk: &Path, pno: u32, start: u64, length: u64) -> nix::Result<()>;
    /// Deletes partition `pno` of `disk` (BLKPG_DEL_PARTITION).
    fn del_partition(&self, disk: &Path, pno: u32) -> nix::Result<()>;
}

/// `struct blkpg_partition` of linux/blkpg.h.
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// `struct blkpg_ioctl_arg` of linux/blkpg.h.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// `BLKPG`, `_IO(0x12, 105)`.
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_ADD_PARTITION: libc::c_int = 1;
const BLKPG_DEL_PARTITION: libc::c_int = 2;

fn blkpg(disk: &Path, op: libc::c_int, pno: u32, start: u64, length: u64) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(disk)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(|_| nix::errno::Errno::EOVERFLOW)?,
        length: i64::try_from(length).map_err(|_| nix::errno::Errno::EOVERFLOW)?,
        pno: i32::try_from(pno).map_err(|_| nix::errno::Errno::EINVAL)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: BLKPG reads one blkpg_ioctl_arg, whose data points at one blkpg_partition of
    // datalen bytes; both live across the call, and the fd is ours.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKPG, &mut arg) };
    nix::errno::Errno::result(r).map(drop)
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

impl Syscall for Linux {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path) -> nix::Result<()> {
        nix::unistd::chdir(new_root)?;
        // No chroot fallback: a chroot can be climbed out of. As PID 1 the agent has moved
        // off the initramfs (pid1::leave_initramfs), so pivot_root works in the guest too.
        nix::unistd::pivot_root(".", ".")?;
        // The old root is now stacked under the new one at "."; keep its unmount from
        // propagating anywhere, then drop it.
        nix::mount::mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")
    }

    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> nix::Result<()> {
        nix::sys::stat::mknod(path, kind, perm, dev)
    }

    fn chown(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> nix::Result<()> {
        nix::unistd::chown(
            path,
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
        )
    }

    fn mount_flags(&self, path: &Path) -> nix::Result<MsFlags> {
        use nix::sys::statvfs::FsFlags;
        let f = nix::sys::statvfs::statvfs(path)?.flags();
        let map = [
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ];
        Ok(map
            .iter()
            .filter(|(s, _)| f.contains(*s))
            .fold(MsFlags::empty(), |acc, (_, m)| acc | *m))
    }

    fn add_partition(&self, disk: &Path, pno: u32, start: u64, length: u64) -> nix::Result<()> {
        blkpg(disk, BLKPG_ADD_PARTITION, pno, start, length)
    }

    fn del_partition(&self, disk: &Path, pno: u32) -> nix::Result<()> {
        blkpg(disk, BLKPG_DEL_PARTITION, pno, 0, 0)
    }
}

#[cfg(test)]
pub mod test {
    //! A recording double of [`Syscall`].
    use super::*;
    use std::{cell::RefCell, path::PathBuf};

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Mount {
            source: Option<PathBuf>,
            target: PathBuf,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        Umount(PathBuf),
        PivotRoot(PathBuf),
        Mknod(PathBuf, u64),
        Chown(PathBuf),
        AddPartition {
            pno: u32,
            start: u64,
            length: u64,
        },
        DelPartition {
            pno: u32,
        },
    }

    /// The [`Call`] a mount records.
    pub fn mount_call(
        src: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Call {
        Call::Mount {
            source: src.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        }
    }

    /// Records every call and succeeds; `mknod_fails` makes mknod fail with EPERM.
    #[derive(Debug, Default)]
    pub struct Recorder {
        pub calls: RefCell<Vec<Call>>,
        pub mknod_fails: bool,
    }

    impl Recorder {
        pub fn mounts(&self) -> Vec<Call> {
            self.calls
                .borrow()
                .iter()
                .filter(|c| matches!(c, Call::Mount { .. }))
                .cloned()
                .collect()
        }
    }

    impl Syscall for Recorder {
        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> nix::Result<()> {
            self.calls.borrow_mut().push(Call::Mount {
                source: source.map(Path::to_path_buf),
                target: target.to_path_buf(),
                fstype: fstype.map(str::to_string),
                flags,
                data: data.map(str::to_string),
            });
            Ok(())
        }
        fn umount2(&self, target: &Path, _: MntFlags) -> nix::Result<()> {
            self.calls
                .borrow_mut()
                .push(Call::Umount(target.to_path_buf()));
            Ok(())
        }
        fn pivot_root(&self, new_root: &Path) -> nix::Result<()> {
            self.calls
                .borrow_mut()
                .push(Call::PivotRoot(new_root.to_path_buf()));
            Ok(())
        }
        fn mknod(&self, path: &Path, _: SFlag, _: Mode, dev: u64) -> nix::Result<()> {
            if self.mknod_fails {
                return Err(nix::errno::Errno::EPERM);
            }
            self.calls
                .borrow_mut()
                .push(Call::Mknod(path.to_path_buf(), dev));
            std::fs::write(path, b"").map_err(|_| nix::errno::Errno::EIO)
        }
        fn chown(&self, path: &Path, _: Option<u32>, _: Option<u32>) -> nix::Result<()> {
            self.calls
                .borrow_mut()
                .push(Call::Chown(path.to_path_buf()));
            Ok(())
        }
        fn mount_flags(&self, _: &Path) -> nix::Result<MsFlags> {
            Ok(MsFlags::MS_NOSUID)
        }
        fn add_partition(&self, _: &Path, pno: u32, start: u64, length: u64) -> nix::Result<()> {
            self.calls
                .borrow_mut()
                .push(Call::AddPartition { pno, start, length });
            Ok(())
        }
        fn del_partition(&self, _: &Path, pno: u32) -> nix::Result<()> {
            self.calls.borrow_mut().push(Call::DelPartition { pno });
            Ok(())
        }
    }
}
