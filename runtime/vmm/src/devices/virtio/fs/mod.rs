//! virtio-fs through a vhost-user backend (virtiofsd): the guest sees a virtio-fs device
//! (device id 26: a tag in its configuration space, a high-priority queue and one request
//! queue); the FUSE requests on those queues are answered by the backend. The backend never
//! maps guest memory: the VMM copies each request into a bounce area of its own, on rings of
//! its own there, and each answer back (see [`bounce`]). The VMM parses no FUSE request: it
//! gives the backend the area, its rings' addresses, a kick eventfd per queue (written when
//! requests were put on the ring) and a call eventfd (watched by the I/O thread, which gives
//! the answers back to the guest and raises the device's interrupt).
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
    VhostBackend,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::ratelimit::LogLimiter;

mod bounce;

const VIRTIO_ID_FS: u32 = 26;
/// The high-priority queue and one request queue.
const QUEUE_SIZES: &[u16] = &[1024, 1024];
/// The longest tag the configuration space holds.
pub const TAG_MAX: usize = 36;

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
    #[error("the virtio-fs bounce area")]
    Bounce(#[source] std::io::Error),
}

/// A virtio-fs device served by a vhost-user backend.
pub struct Fs {
    tag: String,
    socket: String,
    frontend: Frontend,
    kicks: Vec<EventFd>,
    /// Shared by both queues: the backend writes it when it used buffers.
    call: EventFd,
    irq: Option<Arc<IrqLine>>,
    /// Guest memory and the guest's queues, once the driver is ready.
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    /// Where requests and answers pass between the guest and the backend.
    bounce: bounce::Bounce,
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
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::Backend(
                name.clone(),
                "it does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
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
            kicks,
            call: EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            irq: None,
            mem: None,
            queues: Vec::new(),
            bounce: bounce::Bounce::new(QUEUE_SIZES.len()).map_err(FsError::Bounce)?,
            running: 0,
            used: false,
            errors: LogLimiter::default(),
        })
    }

    /// Hands the bounce area and its rings (one per queue the guest readied) to the backend
    /// and starts them.
    fn start(&mut self, queues: &[Queue]) -> Result<(), String> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let f = &mut self.frontend;
        // The shadow rings are plain split rings: no ring feature.
        f.set_features(VIRTIO_F_VERSION_1 | protocol_bit)
            .map_err(|e| format!("SET_FEATURES: {e}"))?;
        f.set_mem_table(&[self.bounce.region()?])
            .map_err(|e| format!("SET_MEM_TABLE: {e}"))?;
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            f.set_vring_num(i, self.bounce.ring_size())
                .map_err(|e| format!("SET_VRING_NUM {i}: {e}"))?;
            f.set_vring_addr(i, &self.bounce.ring_config(i)?)
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

    /// Puts what the guest made available on queue `q` on its shadow ring; kicks the backend
    /// if anything went, interrupts the guest if a chain was given back at once.
    fn forward(&mut self, q: usize) {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(q)) else {
            return;
        };
        if q >= self.running || !queue.ready() {
            return;
        }
        let moved = self.bounce.forward(q, mem, queue);
        if moved.to_backend > 0 {
            let _ = self.kicks[q].write(1);
        }
        if moved.refused > 0 {
            self.signal();
            self.warn(&format!(
                "{} chain(s) of queue {q} given back unanswered: buffers outside guest memory, readable after writable ones, or larger than the bounce area",
                moved.refused
            ));
        }
    }

    fn signal(&self) {
        if let Some(irq) = &self.irq {
            irq.signal_used();
        }
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

    /// No ring feature: the guest's rings are the VMM's to read (see [`bounce`]).
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        if let Err(e) = self.start(&queues) {
            // The guest's requests then wait forever: its mount hangs, the VM does not.
            self.warn(&format!("starting the backend's rings: {e}"));
        }
        self.mem = Some(mem);
        self.queues = queues;
    }

    fn queue_notify(&mut self, index: u16) {
        self.used = true;
        self.forward(usize::from(index));
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.call.as_raw_fd())
    }

    /// The backend used chains: their answers go back to the guest, and the room they
    /// took lets the chains that waited for it go.
    fn process_backend(&mut self) {
        if self.call.read().is_err() {
            return;
        }
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        let mut done = 0;
        for (q, queue) in self.queues.iter_mut().enumerate().take(self.running) {
            done += self.bounce.complete(q, mem, queue);
        }
        if done > 0 {
            self.signal();
        }
        for q in 0..self.running {
            self.forward(q);
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
        self.mem = None;
        self.queues.clear();
        self.bounce.reset();
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::DriverQueue;

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
    /// guest is offered VERSION_1 alone (its rings are the VMM's to read), the configuration
    /// space holds the tag and one request queue; the backend exits once the VMM is gone.
    #[test]
    fn a_virtiofsd_backend_is_set_up_and_the_tag_is_in_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = virtiofsd(dir.path());
        let fs = Fs::connect("husk-shared", &dir.path().join("fs.sock")).unwrap();
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.features(), VIRTIO_F_VERSION_1);
        let mut cfg = [0u8; TAG_MAX + 4];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..12], b"husk-shared\0");
        assert_eq!(cfg[TAG_MAX..], 1u32.to_le_bytes());
        drop(fs);
        let status = backend.wait().unwrap();
        assert!(status.success(), "virtiofsd: {status}");
    }

    const FUSE_LOOKUP: u32 = 1;
    const FUSE_OPEN: u32 = 14;
    const FUSE_READ: u32 = 15;
    const FUSE_INIT: u32 = 26;
    const GUEST_MEM: usize = 16 << 20;

    /// A guest with a driver's rings for both queues, the device activated on them.
    struct Guest {
        mem: GuestMemoryMmap,
        req: DriverQueue,
        next: u64,
        unique: u64,
        /// Each chain's request id and writable buffers, by head.
        answers: std::collections::HashMap<u16, (u64, Vec<(u64, u32)>)>,
    }

    impl Guest {
        fn start(fs: &mut Fs) -> Guest {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM)]).unwrap();
            let hiprio = DriverQueue::new(0x10000, 256);
            let req = DriverQueue::new(0x20000, 256);
            let queues = vec![hiprio.device_queue(&mem), req.device_queue(&mem)];
            let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
            fs.activate(mem.clone(), queues, irq);
            Guest {
                mem,
                req,
                next: 1 << 20,
                unique: 0,
                answers: Default::default(),
            }
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let a = self.next;
            self.next += len.next_multiple_of(4096);
            assert!(self.next <= GUEST_MEM as u64);
            a
        }

        /// Puts a FUSE request on the request queue (header and `body` in one buffer),
        /// with writable buffers of `answer` bytes each; returns the chain's head.
        fn request(
            &mut self,
            fs: &mut Fs,
            opcode: u32,
            nodeid: u64,
            body: &[u8],
            answer: &[u32],
        ) -> u16 {
            self.unique += 1;
            let mut b = Vec::new();
            b.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
            b.extend_from_slice(&opcode.to_le_bytes());
            b.extend_from_slice(&self.unique.to_le_bytes());
            b.extend_from_slice(&nodeid.to_le_bytes());
            b.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
            b.extend_from_slice(body);
            let at = self.alloc(b.len() as u64);
            self.mem.write_slice(&b, GuestAddress(at)).unwrap();
            let mut bufs = vec![(at, b.len() as u32, false)];
            for &len in answer {
                bufs.push((self.alloc(u64::from(len)), len, true));
            }
            let head = self.req.add_chain(&self.mem, &bufs);
            let writable = bufs[1..].iter().map(|&(a, l, _)| (a, l)).collect();
            self.answers.insert(head, (self.unique, writable));
            fs.queue_notify(1);
            head
        }

        /// Runs the device's backend side until the chain at `head` is used; its answer.
        fn answer(&mut self, fs: &mut Fs, head: u16) -> Vec<u8> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                fs.process_backend();
                if let Some(&(_, len)) = self.req.take_used(&self.mem).iter().find(|u| u.0 == head)
                {
                    let mut a = Vec::new();
                    let (unique, writable) = &self.answers[&head];
                    for &(addr, cap) in writable {
                        let mut b = vec![0u8; cap.min(len - a.len() as u32) as usize];
                        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                        a.extend_from_slice(&b);
                    }
                    assert!(a.len() >= 16, "no FUSE header: {a:?}");
                    let n = u32::from_le_bytes(a[..4].try_into().unwrap());
                    assert_eq!(n as usize, a.len(), "the answer's length");
                    let error = i32::from_le_bytes(a[4..8].try_into().unwrap());
                    assert_eq!(error, 0, "FUSE error");
                    assert_eq!(u64::from_le_bytes(a[8..16].try_into().unwrap()), *unique);
                    return a;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            panic!("no answer to chain {head}");
        }
    }

    /// fuse_init_in of FUSE 7.41 (the guest kernel's): major, minor, max_readahead, flags,
    /// flags2, 11 unused words.
    fn init_in() -> Vec<u8> {
        let mut b = [7u32, 41].map(u32::to_le_bytes).concat();
        b.resize(64, 0);
        b
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// FUSE requests of a guest go to a real virtiofsd through the bounce area, and their
    /// answers come back into the guest's buffers (spread over several): INIT, LOOKUP of a
    /// file, OPEN and a READ of its 10000 bytes into buffers of 16, 6000 and 6000 bytes.
    /// virtiofsd maps only the bounce area.
    #[test]
    fn requests_and_answers_pass_through_the_bounce_area() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = virtiofsd(dir.path());
        let content: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("shared/hello"), &content).unwrap();
        let mut fs = Fs::connect("t", &dir.path().join("fs.sock")).unwrap();
        let mut g = Guest::start(&mut fs);
        let init = init_in();
        let h = g.request(&mut fs, FUSE_INIT, 0, &init, &[4096]);
        let a = g.answer(&mut fs, h);
        assert_eq!(
            u32::from_le_bytes(a[16..20].try_into().unwrap()),
            7,
            "FUSE major"
        );
        let h = g.request(&mut fs, FUSE_LOOKUP, 1, b"hello\0", &[4096]);
        let a = g.answer(&mut fs, h);
        let nodeid = u64_at(&a, 16);
        assert_eq!(
            u64_at(&a, 16 + 40 + 8),
            content.len() as u64,
            "the file's size"
        );
        let h = g.request(&mut fs, FUSE_OPEN, nodeid, &[0u8; 8], &[4096]);
        let fh = u64_at(&g.answer(&mut fs, h), 16);
        let mut read = Vec::new();
        read.extend_from_slice(&fh.to_le_bytes());
        read.extend_from_slice(&0u64.to_le_bytes());
        read.extend_from_slice(&16384u32.to_le_bytes());
        read.extend_from_slice(&[0u8; 20]);
        let h = g.request(&mut fs, FUSE_READ, nodeid, &read, &[16, 6000, 6000]);
        assert_eq!(g.answer(&mut fs, h)[16..], content[..]);
        assert_eq!(fs.bounce.in_flight(), 0);
        drop(fs);
        assert!(backend.wait().unwrap().success());
    }

    /// Chains that do not fit in the bounce area beside those with virtiofsd wait in the
    /// guest's ring until answers make room; a chain larger than the whole area, or with a
    /// buffer outside guest memory, is given back at once, unanswered.
    #[test]
    fn chains_wait_for_room_and_impossible_ones_are_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = virtiofsd(dir.path());
        let mut fs = Fs::connect("t", &dir.path().join("fs.sock")).unwrap();
        let mut g = Guest::start(&mut fs);
        let init = init_in();
        let h = g.request(&mut fs, FUSE_INIT, 0, &init, &[4096]);
        g.answer(&mut fs, h);
        // Two LOOKUPs with 3 MiB of room each: the second waits for the first.
        let a = g.request(&mut fs, FUSE_LOOKUP, 1, b".\0", &[3 << 20]);
        let b = g.request(&mut fs, FUSE_LOOKUP, 1, b".\0", &[3 << 20]);
        assert_eq!(fs.bounce.in_flight(), 1);
        g.answer(&mut fs, a);
        g.answer(&mut fs, b);
        assert_eq!(fs.bounce.in_flight(), 0);
        // Larger than the area: back at once, with nothing written.
        let at = g.alloc(5 << 20);
        let big = g
            .req
            .add_chain(&g.mem, &[(at, 40, false), (at + 4096, 5 << 20, true)]);
        let outside = g
            .req
            .add_chain(&g.mem, &[(GUEST_MEM as u64 - 8, 40, false)]);
        fs.queue_notify(1);
        assert_eq!(g.req.take_used(&g.mem), [(big, 0), (outside, 0)]);
        assert_eq!(fs.bounce.in_flight(), 0);
        drop(fs);
        assert!(backend.wait().unwrap().success());
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
