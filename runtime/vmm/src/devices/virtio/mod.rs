//! virtio devices over the virtio-mmio transport (version 2).

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The interrupt line of a device: an irqfd plus the InterruptStatus bits.
#[derive(Debug)]
pub struct IrqLine {
    pub evt: EventFd,
    status: AtomicU32,
}

impl IrqLine {
    pub fn new(evt: EventFd) -> Arc<Self> {
        Arc::new(IrqLine {
            evt,
            status: AtomicU32::new(0),
        })
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used(&self) {
        self.status.fetch_or(1, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Tells the driver the configuration changed.
    pub fn signal_config(&self) {
        self.status.fetch_or(2, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// The payload bytes a device moved each way since it was made (block: read and written;
/// net: frames received and sent; vsock: packets to and from the guest).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounters {
    pub to_guest: u64,
    pub from_guest: u64,
}

/// A virtio device behind the mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, 19 vsock).
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The features the driver accepted (a subset of [`features`](Self::features)), told
    /// just before [`activate`](Self::activate).
    fn ack_features(&mut self, _acked: u64) {}
    /// The driver set DRIVER_OK: the device may use the queues.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// A file descriptor to poll for backend events, if the device has any.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Handles backend events (when `backend_fd` is readable).
    fn process_backend(&mut self) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Why the device cannot be in a snapshot of its VM, if it cannot (asked before the VM
    /// is paused: a refused snapshot leaves the VM as it was).
    fn snapshot_refusal(&self) -> Option<String> {
        None
    }
    /// Readies the device for a snapshot of its paused VM.
    fn before_snapshot(&mut self) {}
    /// What the device keeps beyond its transport's registers, for a snapshot (taken after
    /// [`before_snapshot`](Self::before_snapshot)); none by default.
    fn saved_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Puts back on a restored device what [`saved_state`](Self::saved_state) gave, before
    /// the device is activated.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Gives a block device a new backing file, or none (Firecracker's drive update).
    fn update_backing(&mut self, _file: Option<FileArg>) -> Result<(), String> {
        Err("not a block device".into())
    }
    /// Puts an image layer on a layered drive; returns its byte range.
    fn add_layer(&mut self, _file: FileArg) -> Result<std::ops::Range<u64>, String> {
        Err("not a block device".into())
    }
    /// Takes the layer that starts at byte `start` off a layered drive.
    fn remove_layer(&mut self, _start: u64) -> Result<(), String> {
        Err("not a block device".into())
    }
    /// What the device moved; none for a device whose data does not pass through the VMM
    /// (virtio-fs: virtiofsd serves the queues).
    fn io_counters(&self) -> Option<IoCounters> {
        None
    }
}

/// A file given to a device: a path the VMM opens (from its root: inside its jail, if it
/// is jailed), or a file its caller opened and passed (over the control socket, with
/// `SCM_RIGHTS`).
#[derive(Debug)]
pub enum FileArg {
    Path(std::path::PathBuf),
    Passed(std::fs::File),
}

impl FileArg {
    /// How errors name it.
    pub fn name(&self) -> String {
        match self {
            FileArg::Path(p) => p.display().to_string(),
            FileArg::Passed(_) => "(the file passed with the request)".into(),
        }
    }

    /// The file, opened for reading and, if `write`, writing: a passed file must have been
    /// opened exactly so (a read-only use refuses a writable file: the VMM holds no more
    /// than it needs), without O_APPEND or O_PATH; either must be a regular file.
    pub fn open(self, write: bool) -> std::io::Result<std::fs::File> {
        let file = match self {
            FileArg::Path(p) => std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)?,
            FileArg::Passed(f) => {
                use std::os::fd::AsRawFd;
                // SAFETY: F_GETFL on an fd we own.
                let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
                if flags < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let need = if write { libc::O_RDWR } else { libc::O_RDONLY };
                let why = if flags & libc::O_PATH != 0 {
                    Some("the file was opened with O_PATH (no reads or writes)")
                } else if flags & libc::O_APPEND != 0 {
                    Some("the file was opened with O_APPEND (writes would go to its end)")
                } else if flags & libc::O_ACCMODE != need && write {
                    Some("the drive is writable, and the file was not opened for reading and writing")
                } else if flags & libc::O_ACCMODE != need {
                    Some("the drive or layer is read-only, and the file was not opened read-only")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(std::io::Error::other(why));
                }
                f
            }
        };
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod file_arg_tests {
    use super::FileArg;

    /// A passed file must be open the way the drive uses it: read-only does for a
    /// read-only drive or a layer, not for a writable drive.
    #[test]
    fn a_passed_file_must_be_open_for_what_the_drive_does() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let ro = || FileArg::Passed(std::fs::File::open(f.path()).unwrap());
        let rw = || {
            FileArg::Passed(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(f.path())
                    .unwrap(),
            )
        };
        assert!(ro().open(false).is_ok());
        assert!(rw().open(true).is_ok());
        let e = ro().open(true).unwrap_err().to_string();
        assert!(e.contains("not opened for reading and writing"), "{e}");
        let e = rw().open(false).unwrap_err().to_string();
        assert!(e.contains("not opened read-only"), "{e}");
        let wo = FileArg::Passed(
            std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap(),
        );
        assert!(wo.open(false).is_err());
        let append = FileArg::Passed(
            std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(f.path())
                .unwrap(),
        );
        let e = append.open(true).unwrap_err().to_string();
        assert!(e.contains("O_APPEND"), "{e}");
        use std::os::unix::fs::OpenOptionsExt;
        let path_only = FileArg::Passed(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(f.path())
                .unwrap(),
        );
        let e = path_only.open(false).unwrap_err().to_string();
        assert!(e.contains("O_PATH"), "{e}");
        let dir = FileArg::Passed(std::fs::File::open("/").unwrap());
        assert_eq!(
            dir.open(false).unwrap_err().to_string(),
            "not a regular file"
        );
        let e = FileArg::Path("/".into()).open(false).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
        assert_eq!(ro().name(), "(the file passed with the request)");
        assert_eq!(FileArg::Path("/x.img".into()).name(), "/x.img");
    }
}
