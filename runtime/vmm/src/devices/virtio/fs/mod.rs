//! virtio-fs through a vhost-user backend (virtiofsd): the guest sees a virtio-fs device
//! (device id 26: a tag in its configuration space, a high-priority queue and one request
//! queue); the FUSE requests on those queues are read and answered by the backend, which
//! maps the guest's memory (a memfd the VMM shares with it) and works on the rings itself.
//! The VMM parses no FUSE request: it passes the rings' addresses, a kick eventfd per queue
//! (written when the guest notifies) and a call eventfd (watched by the I/O thread, which
//! raises the device's interrupt with the used-ring bit, as the mmio transport wants).
//!
//! The backend's socket is connected when the VM is built (before the VMM's jail); the
//! vhost-user session is set up when the guest's driver is ready, and stopped on a reset.

use std::{
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::Path,
    sync::Arc,
};

use vhost::{
    vhost_user::{
        message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::ratelimit::LogLimiter;

const VIRTIO_ID_FS: u32 = 26;
/// The high-priority queue and one request queue.
const QUEUE_SIZES: &[u16] = &[1024, 1024];
/// The longest tag the configuration space holds.
pub const TAG_MAX: usize = 36;
/// VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX: ring features the backend handles.
const RING_FEATURES: u64 = (1 << 28) | (1 << 29);

/// Why the device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the virtio-fs tag {0:?} must be 1 to {TAG_MAX} bytes")]
    Tag(String),
    #[error("connecting to the vhost-user-fs backend {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("the vhost-user-fs backend {0}: {1}")]
    Backend(String, String),
    #[error("an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A virtio-fs device served by a vhost-user backend.
pub struct Fs {
    tag: String,
    socket: String,
    frontend: Frontend,
    /// What the backend offers (virtio feature bits).
    backend_features: u64,
    /// What the guest's driver accepted.
    acked: u64,
    kicks: Vec<EventFd>,
    /// Shared by both queues: the backend writes it when it used buffers.
    call: EventFd,
    irq: Option<Arc<IrqLine>>,
    /// The queues the backend runs (after a successful activation).
    running: usize,
    /// Whether the guest ever notified a queue: until it does (it mounts the share), the
    /// backend holds no state a snapshot would lose.
    used: bool,
    errors: LogLimiter,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("socket", &self.socket)
            .field("running", &self.running)
            .finish()
    }
}

impl Fs {
    /// Connects to the backend listening on `socket` and asks what it offers; the guest will
    /// mount the device as `tag`.
    pub fn connect(tag: &str, socket: &Path) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_MAX {
            return Err(FsError::Tag(tag.to_string()));
        }
        let name = socket.display().to_string();
        let stream = connect(socket).map_err(|e| FsError::Connect(name.clone(), e))?;
        let mut frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        let backend =
            |what: &str, e: vhost::Error| FsError::Backend(name.clone(), format!("{what}: {e}"));
        frontend.set_owner().map_err(|e| backend("SET_OWNER", e))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| backend("GET_FEATURES", e))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if backend_features & protocol_bit == 0 {
            return Err(FsError::Backend(
                name.clone(),
                "it offers no vhost-user protocol features".into(),
            ));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(|e| backend("GET_PROTOCOL_FEATURES", e))?;
        let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        frontend
            .set_protocol_features(offered & wanted)
            .map_err(|e| backend("SET_PROTOCOL_FEATURES", e))?;
        if offered.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request waits for the backend to say it was done.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let kicks = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        Ok(Fs {
            tag: tag.to_string(),
            socket: name,
            frontend,
            backend_features,
            acked: 0,
            kicks,
            call: EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            irq: None,
            running: 0,
            used: false,
            errors: LogLimiter::default(),
        })
    }

    /// Hands the guest's memory and the rings to the backend and starts them.
    fn start(&mut self, mem: &GuestMemoryMmap, queues: &[Queue]) -> Result<(), String> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let f = &mut self.frontend;
        f.set_features(self.acked | protocol_bit)
            .map_err(|e| format!("SET_FEATURES: {e}"))?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let fo = r
                .file_offset()
                .ok_or("guest memory is not shared (no memfd): the VMM was built without it")?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        f.set_mem_table(&regions)
            .map_err(|e| format!("SET_MEM_TABLE: {e}"))?;
        let host = |a: GuestAddress| -> Result<u64, String> {
            mem.get_host_address(a)
                .map(|p| p as u64)
                .map_err(|e| format!("a ring at {:#x}: {e}", a.0))
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            f.set_vring_num(i, q.size())
                .map_err(|e| format!("SET_VRING_NUM {i}: {e}"))?;
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(GuestAddress(q.desc_table()))?,
                used_ring_addr: host(GuestAddress(q.used_ring()))?,
                avail_ring_addr: host(GuestAddress(q.avail_ring()))?,
                log_addr: None,
            };
            f.set_vring_addr(i, &ring)
                .map_err(|e| format!("SET_VRING_ADDR {i}: {e}"))?;
            f.set_vring_base(i, 0)
                .map_err(|e| format!("SET_VRING_BASE {i}: {e}"))?;
            f.set_vring_call(i, &self.call)
                .map_err(|e| format!("SET_VRING_CALL {i}: {e}"))?;
            f.set_vring_kick(i, &self.kicks[i])
                .map_err(|e| format!("SET_VRING_KICK {i}: {e}"))?;
            f.set_vring_enable(i, true)
                .map_err(|e| format!("SET_VRING_ENABLE {i}: {e}"))?;
            self.running = i + 1;
        }
        Ok(())
    }

    fn warn(&mut self, what: &str) {
        if let Some(left_out) = self.errors.hit() {
            tracing::warn!(
                "virtio-fs {} ({}): {what} ({left_out} more since the last warning)",
                self.tag,
                self.socket
            );
        }
    }
}

/// Connects to `socket`, waiting up to 5 s for a backend that has bound it but is not
/// listening yet (the caller waits for the socket to exist).
fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let mut tries = 50;
    loop {
        match UnixStream::connect(socket) {
            Err(e) if tries > 0 && e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tries -= 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (self.backend_features & RING_FEATURES)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_MAX + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    /// A device whose queues the guest never used (it probed the device, but never mounted
    /// the share) is snapshotted as its transport's state alone: the restored VM's backend is
    /// then started on those rings from index 0, as at a cold boot. Once the guest sent a
    /// request, virtiofsd holds the ring positions and the FUSE session, which no snapshot
    /// holds.
    fn snapshot_refusal(&self) -> Option<String> {
        self.used.then(|| {
            format!(
                "virtio-fs device {:?}: the guest has used it (mounted the share), and virtiofsd keeps its queues' and session's state, which a snapshot cannot hold",
                self.tag
            )
        })
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>) {
        self.irq = Some(irq);
        if let Err(e) = self.start(&mem, &queues) {
            // The guest's requests then wait forever: its mount hangs, the VM does not.
            self.warn(&format!("starting the backend's rings: {e}"));
        }
    }

    fn queue_notify(&mut self, index: u16) {
        self.used = true;
        if let Some(k) = self.kicks.get(index as usize) {
            let _ = k.write(1);
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.call.as_raw_fd())
    }

    fn process_backend(&mut self) {
        if self.call.read().is_ok() {
            if let Some(irq) = &self.irq {
                irq.signal_used();
            }
        }
    }

    fn reset(&mut self) {
        for i in 0..self.running {
            let stopped = self
                .frontend
                .set_vring_enable(i, false)
                .and_then(|_| self.frontend.get_vring_base(i).map(|_| ()));
            if let Err(e) = stopped {
                self.warn(&format!("stopping ring {i}: {e}"));
            }
        }
        self.running = 0;
        self.irq = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The virtiofsd that scripts/setup.sh builds.
    const VIRTIOFSD: &str = "/usr/local/libexec/husk/virtiofsd";

    /// A virtiofsd serving a new directory, listening on a socket beside it.
    fn virtiofsd(dir: &Path) -> std::process::Child {
        assert!(
            Path::new(VIRTIOFSD).exists(),
            "{VIRTIOFSD} is missing: scripts/setup.sh builds it"
        );
        std::fs::create_dir(dir.join("shared")).unwrap();
        let child = std::process::Command::new(VIRTIOFSD)
            .arg("--socket-path")
            .arg(dir.join("fs.sock"))
            .arg("--shared-dir")
            .arg(dir.join("shared"))
            .args(["--sandbox", "none", "--seccomp", "none"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if dir.join("fs.sock").exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child
    }

    /// A real backend: the handshake (owner, features, protocol features) succeeds, the
    /// guest is offered VERSION_1 and the ring features the backend has, the configuration
    /// space holds the tag and one request queue; the backend exits once the VMM is gone.
    #[test]
    fn a_virtiofsd_backend_is_set_up_and_the_tag_is_in_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = virtiofsd(dir.path());
        let fs = Fs::connect("husk-shared", &dir.path().join("fs.sock")).unwrap();
        assert_eq!(fs.device_type(), 26);
        assert_ne!(fs.features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(fs.features() & !(VIRTIO_F_VERSION_1 | RING_FEATURES), 0);
        let mut cfg = [0u8; TAG_MAX + 4];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..12], b"husk-shared\0");
        assert_eq!(cfg[TAG_MAX..], 1u32.to_le_bytes());
        drop(fs);
        let status = backend.wait().unwrap();
        assert!(status.success(), "virtiofsd: {status}");
    }

    #[test]
    fn bad_tags_and_missing_backends_say_so() {
        let e = Fs::connect("", Path::new("/nonexistent.sock")).unwrap_err();
        assert!(e.to_string().contains("1 to 36 bytes"), "{e}");
        let e = Fs::connect(&"t".repeat(37), Path::new("/x")).unwrap_err();
        assert!(matches!(e, FsError::Tag(_)), "{e}");
        let e = Fs::connect("t", Path::new("/nonexistent/fs.sock")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("connecting to the vhost-user-fs backend /nonexistent/fs.sock"),
            "{e}"
        );
    }
}
