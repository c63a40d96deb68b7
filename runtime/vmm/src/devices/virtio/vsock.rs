//! virtio-vsock emulated in user space, with the hybrid-vsock (Firecracker) convention on the
//! host side:
//! - the host connects to the Unix socket `uds`, writes `CONNECT <port>\n`, and once the guest
//!   accepts gets `OK <hostport>\n`; then bytes flow to the guest listener on `port`;
//! - a guest connection to CID 2 port P is forwarded to the Unix socket `<uds>_P`. The
//!   connect never blocks (the device runs on a vCPU or the I/O thread, under the device
//!   lock): a listener whose backlog is full refuses the guest with RST at once, as a port
//!   nobody listens on does, and the guest may retry.
//!
//! Flow control is virtio's credit scheme: we never send the guest more than it said it has
//! room for (buf_alloc - (rx_cnt - fwd_cnt)), and we advertise [`BUF_ALLOC`] of our own,
//! keeping at most that much of the guest's data per connection while the host reader is slow.
//! Everything from the guest is bounded: packet sizes, connection buffers, the control queue,
//! and the warnings it can trigger (rate-limited, see [`LogLimiter`]).

use std::{
    collections::{HashMap, VecDeque},
    ffi::OsString,
    io::{ErrorKind, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::{
            ffi::OsStrExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::ratelimit::LogLimiter;

const VIRTIO_ID_VSOCK: u32 = 19;
const HOST_CID: u64 = 2;
/// The size of a virtio-vsock packet header.
pub const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
/// What we tell the guest we can buffer per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The largest payload we accept in one packet from the guest.
const MAX_PKT: usize = 64 * 1024;
/// How much we read from a host socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// Control packets waiting for RX buffers at most (beyond: new connections are refused).
const MAX_CTRL: usize = 4096;
const MAX_CONNS: usize = 1024;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
const LISTENER: u64 = u64::MAX;
/// Host ports of host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub typ: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses a header from the start of `b`.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2"));
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            typ: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.typ.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Errors setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("listening on the vsock socket {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("creating the vsock event loop")]
    Epoll(#[source] std::io::Error),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest is gone from this connection (it shut both directions or reset it), but
    /// bytes it sent still wait for the host socket: they are flushed, then the connection
    /// is dropped. Nothing the guest wrote before closing is lost to a slow host reader.
    Draining,
}

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes of the guest's taken out of `tx_buf` into the host socket.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest-to-host bytes waiting for the host socket.
    tx_buf: Vec<u8>,
    /// Host-to-guest bytes waiting for RX buffers.
    rx_pending: Vec<u8>,
    host_eof: bool,
    guest_done_sending: bool,
    registered: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: Vec::new(),
            rx_pending: Vec::new(),
            host_eof: false,
            guest_done_sending: false,
            registered: None,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn wanted_events(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == State::Established
            && !self.host_eof
            && self.rx_pending.is_empty()
            && self.peer_credit() > 0
        {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Writes what the host socket takes now; false if the host side is gone.
    fn flush(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.tx_buf.is_empty() && self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// The guest is gone from this connection: flushes what it sent, and if the host socket
    /// cannot take all of it now, turns to Draining (true) instead of being dropped.
    fn drain(&mut self) -> bool {
        self.guest_done_sending = true;
        if self.flush() && !self.tx_buf.is_empty() {
            self.state = State::Draining;
            self.rx_pending.clear();
            return true;
        }
        false
    }
}

/// A connection accepted on `uds`, waiting for its `CONNECT <port>` line.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, Pending>,
    ctrl: VecDeque<Header>,
    next_host_port: u32,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    irq: Option<Arc<IrqLine>>,
    /// Warnings the guest (or a host peer) can trigger again and again.
    ctrl_full_log: LogLimiter,
    accept_log: LogLimiter,
    /// Connections reset while their host side was still open (the guest's RST, or ours).
    reset_log: LogLimiter,
}

impl Vsock {
    /// Listens on `uds` for the host side.
    pub fn new(cid: u64, uds: &Path) -> Result<Vsock, VsockError> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)
            .map_err(|e| VsockError::Listen(uds.display().to_string(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Listen(uds.display().to_string(), e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Vsock {
            cid,
            uds: uds.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            mem: None,
            queues: Vec::new(),
            irq: None,
            ctrl_full_log: LogLimiter::default(),
            accept_log: LogLimiter::default(),
            reset_log: LogLimiter::default(),
        })
    }

    fn reply(&self, to: &Header, op: u16, flags: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            typ: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() < MAX_CTRL {
            self.ctrl.push_back(h);
        } else if let Some(left_out) = self.ctrl_full_log.hit() {
            tracing::warn!(
                "vsock: control queue full, dropping a packet ({left_out} more dropped since the last warning)"
            );
        }
    }
}

/// Connects a non-blocking stream socket to the Unix socket at `path` without ever waiting:
/// on Linux a Unix-socket connect either completes at once or fails, and with a full
/// listener backlog a non-blocking one fails with EAGAIN (instead of sleeping until the
/// listener accepts). The caller treats every error as a refusal.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL, and no NUL inside (it would name another socket).
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns; the stream closes it on drop,
    // also on the error path below.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call, and `len` does not
    // exceed its size (checked above).
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A packet from the host side of connection `key` to the guest `cid`.
fn packet(cid: u64, key: Key, op: u16, flags: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: key.0,
        dst_port: key.1,
        len: 0,
        typ: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt,
    }
}

impl Vsock {
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if c.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    /// Says (rate-limited) why a connection whose host side is still open goes away: the
    /// host peer sees its socket closed, and this line is the only trace of why.
    fn log_reset(&mut self, key: Key, why: &str) {
        if let Some(left_out) = self.reset_log.hit() {
            tracing::warn!(
                "vsock: connection host port {} / guest port {}: {why} ({left_out} more since the last warning)",
                key.0,
                key.1
            );
        }
    }

    fn reset(&mut self, key: Key) {
        self.remove(key);
        let h = packet(self.cid, key, OP_RST, 0, 0);
        self.push_ctrl(h);
    }

    /// Handles one packet from the guest.
    pub fn handle_guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.typ != TYPE_STREAM {
            if h.op != OP_RST {
                let r = self.reply(&h, OP_RST, 0, 0);
                self.push_ctrl(r);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
                let r = self.reply(&h, OP_RST, 0, 0);
                self.push_ctrl(r);
                return;
            }
            let mut path = OsString::from(self.uds.as_os_str());
            path.push(format!("_{}", h.dst_port));
            match connect_nonblocking(Path::new(&path)) {
                Ok(stream) => {
                    let mut c = Conn::new(stream, State::Established);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    self.by_fd.insert(c.stream.as_raw_fd(), key);
                    self.conns.insert(key, c);
                    let r = self.reply(&h, OP_RESPONSE, 0, 0);
                    self.push_ctrl(r);
                }
                Err(_) => {
                    let r = self.reply(&h, OP_RST, 0, 0);
                    self.push_ctrl(r);
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                let r = self.reply(&h, OP_RST, 0, 0);
                self.push_ctrl(r);
            }
            return;
        };
        if c.state == State::Draining {
            // Already reset on the guest's side; only the host side is still being fed.
            return;
        }
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                // Ours, not the guest's: it goes straight to the fresh (empty) socket and
                // does not count against the guest's credit.
                let ok = format!("OK {}\n", key.0);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.log_reset(key, "the host peer left before the guest accepted");
                    self.reset(key);
                }
            }
            OP_RW if c.state == State::Established => {
                if c.tx_buf.len() + payload.len() > BUF_ALLOC as usize + MAX_PKT {
                    // The guest ignored our credit.
                    self.log_reset(key, "the guest sent beyond its credit: reset");
                    self.reset(key);
                    return;
                }
                c.tx_buf.extend_from_slice(payload);
                if !c.flush() {
                    self.reset(key);
                    return;
                }
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let u = packet(self.cid, key, OP_CREDIT_UPDATE, 0, c.fwd_cnt);
                    self.push_ctrl(u);
                }
            }
            OP_CREDIT_REQUEST => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let u = packet(self.cid, key, OP_CREDIT_UPDATE, 0, c.fwd_cnt);
                self.push_ctrl(u);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                    let _ = c.flush();
                }
                if h.flags & 3 == 3 {
                    // Both directions closed by the guest: it waits for our RST to finish.
                    if c.drain() {
                        let r = packet(self.cid, key, OP_RST, 0, 0);
                        self.push_ctrl(r);
                    } else {
                        self.reset(key);
                    }
                }
            }
            OP_RST => {
                let abrupt = c.state == State::Established && !c.host_eof && !c.guest_done_sending;
                if !c.drain() {
                    self.remove(key);
                }
                if abrupt {
                    self.log_reset(key, "reset by the guest while open on both sides");
                }
            }
            op => {
                self.log_reset(key, &format!("unexpected op {op} from the guest: reset"));
                self.reset(key);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() || self.pending.len() >= MAX_CONNS {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            fd,
                            Pending {
                                stream: s,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    if let Some(left_out) = self.accept_log.hit() {
                        tracing::warn!(
                            "vsock accept: {e} ({left_out} more failures since the last warning)"
                        );
                    }
                    break;
                }
            }
        }
    }

    /// Reads a pending connection's CONNECT line; starts the guest connection when complete.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut b = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => {
                    let line = String::from_utf8_lossy(&p.line).into_owned();
                    break line
                        .strip_prefix("CONNECT ")
                        .and_then(|n| n.trim().parse::<u32>().ok());
                }
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() > 64 {
                        break None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let p = self.pending.remove(&fd).expect("present");
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = port else { return };
        if self.conns.len() >= MAX_CONNS {
            return;
        }
        // A local port no connection to this guest port uses (a guest may have connected to
        // a host port in this range itself).
        let key = loop {
            let host_port = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(host_port, port)) {
                break (host_port, port);
            }
        };
        let c = Conn::new(p.stream, State::Connecting);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, c);
        let req = packet(self.cid, key, OP_REQUEST, 0, 0);
        self.push_ctrl(req);
    }

    /// Reads what the host wrote on an established connection, within the guest's credit.
    fn read_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = (c.peer_credit() as usize).min(READ_CHUNK);
        if want == 0 || !c.rx_pending.is_empty() || c.host_eof {
            return;
        }
        let mut buf = vec![0u8; want];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.host_eof = true;
                let h = packet(self.cid, key, OP_SHUTDOWN, SHUTDOWN_SEND, c.fwd_cnt);
                self.push_ctrl(h);
            }
            Ok(n) => {
                buf.truncate(n);
                c.rx_pending = buf;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                self.log_reset(key, &format!("reading the host socket: {e}: reset"));
                self.reset(key);
            }
        }
    }

    fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.accept_all();
                continue;
            }
            let fd = token as RawFd;
            if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
                continue;
            }
            let Some(&key) = self.by_fd.get(&fd) else {
                continue;
            };
            let set = ev.event_set();
            if let Some(c) = self
                .conns
                .get_mut(&key)
                .filter(|c| c.state == State::Draining)
            {
                let done = !c.flush()
                    || c.tx_buf.is_empty()
                    || set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if done {
                    self.remove(key);
                }
                continue;
            }
            if set.contains(EventSet::OUT) {
                if let Some(c) = self.conns.get_mut(&key) {
                    if !c.flush() {
                        self.reset(key);
                        continue;
                    }
                    if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
                        c.last_fwd_cnt_sent = c.fwd_cnt;
                        let u = packet(self.cid, key, OP_CREDIT_UPDATE, 0, c.fwd_cnt);
                        self.push_ctrl(u);
                    }
                }
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.read_host(key);
            }
        }
    }

    /// Takes the guest's packets off the TX queue.
    fn process_tx(&mut self) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let mut used = false;
        loop {
            let Some(q) = self.queues.get_mut(1) else {
                return false;
            };
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut pkt = Vec::new();
            let mut valid = true;
            for d in chain.take(QUEUE_SIZES[1] as usize) {
                if d.is_write_only() {
                    break;
                }
                // A buffer that is not all guest memory (outside it, or of an absurd length)
                // makes the whole packet invalid, whatever part of it we would read.
                if !GuestMemoryBackend::check_range(&mem, d.addr(), d.len() as usize) {
                    valid = false;
                    break;
                }
                let room = HDR_LEN + MAX_PKT - pkt.len();
                let n = (d.len() as usize).min(room);
                let start = pkt.len();
                pkt.resize(start + n, 0);
                if mem.read_slice(&mut pkt[start..], d.addr()).is_err() {
                    pkt.truncate(start);
                    break;
                }
                if room == n {
                    break;
                }
            }
            let _ = q.add_used(&mem, head, 0);
            used = true;
            if !valid {
                continue;
            }
            if let Some(h) = Header::parse(&pkt) {
                let end = (HDR_LEN + h.len as usize).min(pkt.len());
                self.handle_guest_packet(h, &pkt[HDR_LEN..end]);
            }
        }
        used
    }

    /// Fills the guest's RX buffers with control packets and host data.
    fn process_rx(&mut self) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let mut used = false;
        loop {
            // What to send next: control first, then data of any connection.
            let data_key = if self.ctrl.is_empty() {
                self.conns
                    .iter()
                    .find(|(_, c)| {
                        c.state != State::Draining
                            && !c.rx_pending.is_empty()
                            && c.peer_credit() > 0
                    })
                    .map(|(k, _)| *k)
            } else {
                None
            };
            if self.ctrl.is_empty() && data_key.is_none() {
                break;
            }
            let Some(q) = self.queues.get_mut(0) else {
                return used;
            };
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let bufs: Vec<(GuestAddress, usize)> = chain
                .take(QUEUE_SIZES[0] as usize)
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let cap: usize = bufs.iter().map(|b| b.1).sum();
            // Buffers that are not all guest memory, or too small for a header, go back
            // unused, and the packet waits for the next buffers.
            let usable = cap >= HDR_LEN
                && bufs
                    .iter()
                    .all(|&(a, l)| GuestMemoryBackend::check_range(&mem, a, l));
            if !usable {
                let q = self.queues.get_mut(0).expect("checked above");
                let _ = q.add_used(&mem, head, 0);
                used = true;
                continue;
            }
            let (hdr, data) = if let Some(h) = self.ctrl.pop_front() {
                (h, Vec::new())
            } else {
                let key = data_key.expect("checked above");
                let fwd = self.conns[&key].fwd_cnt;
                let mut h = packet(self.cid, key, OP_RW, 0, fwd);
                let c = self.conns.get_mut(&key).expect("present");
                // Within the guest's credit now, also if it shrank its buffer since we read.
                let n = c
                    .rx_pending
                    .len()
                    .min(cap - HDR_LEN)
                    .min(c.peer_credit() as usize);
                let data: Vec<u8> = c.rx_pending.drain(..n).collect();
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                c.last_fwd_cnt_sent = fwd;
                h.len = n as u32;
                (h, data)
            };
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(&data);
            let written = write_scattered(&mem, &bufs, &bytes);
            let q = self.queues.get_mut(0).expect("checked above");
            let _ = q.add_used(&mem, head, written as u32);
            used = true;
        }
        used
    }

    /// Registers each connection's socket for exactly the events it can act on.
    fn update_interests(&mut self) {
        for c in self.conns.values_mut() {
            let want = c.wanted_events();
            let fd = c.stream.as_raw_fd();
            let op = match (c.registered, want.is_empty()) {
                (None, true) => continue,
                (Some(_), true) => ControlOperation::Delete,
                (None, false) => ControlOperation::Add,
                (Some(cur), false) if cur == want => continue,
                (Some(_), false) => ControlOperation::Modify,
            };
            if self
                .epoll
                .ctl(op, fd, EpollEvent::new(want, fd as u64))
                .is_ok()
            {
                c.registered = (!want.is_empty()).then_some(want);
            }
        }
    }

    /// One pass over everything: guest packets, host sockets, guest RX buffers.
    pub fn process(&mut self) {
        let mut used = self.process_tx();
        self.handle_host_events();
        used |= self.process_rx();
        self.update_interests();
        if used {
            let mem = self.mem.clone();
            let notify = match (mem, self.queues.get_mut(0)) {
                (Some(m), Some(q)) => q.needs_notification(&m).unwrap_or(true),
                _ => true,
            };
            if notify {
                if let Some(irq) = &self.irq {
                    irq.signal_used();
                }
            }
        }
    }
}

/// Writes `bytes` across the guest buffers; returns how much fit.
fn write_scattered(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)], bytes: &[u8]) -> usize {
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == bytes.len() {
            break;
        }
        let n = len.min(bytes.len() - done);
        if mem.write_slice(&bytes[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>) {
        self.mem = Some(mem);
        self.queues = queues;
        self.irq = Some(irq);
        self.process();
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        self.process();
    }

    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
        self.mem = None;
        self.queues.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{Buf, DriverQueue, F_INDIRECT};
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EventFd;

    const GUEST_MEM: u64 = 8 << 20;
    /// Where [`Guest`] puts its packet buffers.
    const BUFS: u64 = 1 << 20;

    /// A guest driving the device through real virtqueues in fake guest memory.
    struct Guest {
        mem: GuestMemoryMmap,
        rx: DriverQueue,
        tx: DriverQueue,
        next_buf: u64,
    }

    impl Guest {
        /// Activates `v` as the guest's driver does.
        fn start(v: &mut Vsock) -> Guest {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM as usize)])
                .unwrap();
            let [rx, tx, ev] = [0x10000, 0x20000, 0x30000].map(|b| DriverQueue::new(b, 256));
            let queues = [&rx, &tx, &ev].map(|q| q.device_queue(&mem)).into();
            let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            v.activate(mem.clone(), queues, irq);
            Guest {
                mem,
                rx,
                tx,
                next_buf: BUFS,
            }
        }

        fn alloc(&mut self, len: usize) -> u64 {
            let a = self.next_buf;
            self.next_buf += (len as u64).next_multiple_of(64);
            assert!(
                self.next_buf <= GUEST_MEM,
                "the test ran out of guest memory"
            );
            a
        }

        /// Sends `pieces` as one TX chain, one descriptor each; every TX chain comes back.
        fn send(&mut self, v: &mut Vsock, pieces: &[&[u8]]) {
            let bufs: Vec<Buf> = pieces
                .iter()
                .map(|p| {
                    let a = self.alloc(p.len());
                    self.mem.write_slice(p, GuestAddress(a)).unwrap();
                    (a, p.len() as u32, false)
                })
                .collect();
            self.send_bufs(v, &bufs);
        }

        /// Sends a chain of raw buffers (for bad ones).
        fn send_bufs(&mut self, v: &mut Vsock, bufs: &[Buf]) {
            let head = self.tx.add_chain(&self.mem, bufs);
            v.queue_notify(1);
            assert_eq!(
                self.tx.take_used(&self.mem),
                [(head, 0)],
                "the TX chain was not given back"
            );
        }

        /// A packet with its header and payload in one descriptor.
        fn packet(&mut self, v: &mut Vsock, h: Header, payload: &[u8]) {
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(payload);
            self.send(v, &[&b]);
        }

        /// Offers one RX chain of write-only buffers of these sizes.
        fn offer_rx(&mut self, lens: &[u32]) {
            let bufs: Vec<Buf> = lens
                .iter()
                .map(|&l| (self.alloc(l as usize), l, true))
                .collect();
            self.rx.add_chain(&self.mem, &bufs);
        }

        /// The packets the device put into RX chains since the last call, and the bytes
        /// each chain got.
        fn received(&mut self) -> Vec<(Header, Vec<u8>, u32)> {
            self.rx
                .take_used(&self.mem)
                .into_iter()
                .filter(|&(_, len)| len > 0)
                .map(|(head, len)| {
                    let b = self.rx.read_chain(&self.mem, head, len);
                    let h = Header::parse(&b).expect("a whole header");
                    assert_eq!(
                        b.len(),
                        HDR_LEN + h.len as usize,
                        "header and payload agree"
                    );
                    (h, b[HDR_LEN..].to_vec(), len)
                })
                .collect()
        }

        /// Runs the device's backend until `done` holds for what arrived, or `within`
        /// passed; with `refill`, offers a fresh RX chain of that many bytes for each used one.
        fn poll_until(
            &mut self,
            v: &mut Vsock,
            refill: Option<u32>,
            within: Duration,
            mut done: impl FnMut(&[(Header, Vec<u8>, u32)]) -> bool,
        ) -> Vec<(Header, Vec<u8>, u32)> {
            let deadline = Instant::now() + within;
            let mut got = Vec::new();
            while !done(&got) && Instant::now() < deadline {
                v.process_backend();
                let new = self.received();
                if let Some(len) = refill {
                    for _ in &new {
                        self.offer_rx(&[len]);
                    }
                }
                got.extend(new);
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        }
    }

    /// A device on a fresh socket, with a host listener on port `port`.
    fn device_with_listener(port: u32) -> (tempfile::TempDir, Vsock, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let v = Vsock::new(3, &uds).unwrap();
        let l = UnixListener::bind(format!("{}_{port}", uds.display())).unwrap();
        (dir, v, l)
    }

    /// The guest connects to host port `port` from `guest_port` with `buf_alloc`; returns
    /// the host's end.
    fn connect(
        g: &mut Guest,
        v: &mut Vsock,
        l: &UnixListener,
        guest_port: u32,
        port: u32,
        buf_alloc: u32,
    ) -> UnixStream {
        g.offer_rx(&[4096]);
        let mut req = hdr(OP_REQUEST, guest_port, port, 0);
        req.buf_alloc = buf_alloc;
        g.packet(v, req, &[]);
        let got = g.received();
        assert_eq!(got.len(), 1);
        let r = got[0].0;
        assert_eq!(
            (r.op, r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (OP_RESPONSE, HOST_CID, 3, port, guest_port)
        );
        l.accept().unwrap().0
    }

    fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            typ: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// The guest writes more than the host socket buffer takes and closes at once: every
    /// byte still reaches a slow host reader (it once lost the unflushed tail).
    #[test]
    fn bytes_sent_before_a_guest_close_reach_a_slow_host() {
        for close in [3u32, 0] {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let mut v = Vsock::new(3, &uds).unwrap();
            let l = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
            v.handle_guest_packet(hdr(OP_REQUEST, 1234, 6000, 0), &[]);
            let (mut s, _) = l.accept().unwrap();
            let mut sent = Vec::new();
            for i in 0..(BUF_ALLOC as usize / MAX_PKT) {
                let chunk = vec![i as u8; MAX_PKT];
                v.handle_guest_packet(hdr(OP_RW, 1234, 6000, MAX_PKT as u32), &chunk);
                sent.extend_from_slice(&chunk);
            }
            assert!(
                !v.conns[&(6000, 1234)].tx_buf.is_empty(),
                "the socket buffer took everything: the test proves nothing"
            );
            if close == 3 {
                let mut sd = hdr(OP_SHUTDOWN, 1234, 6000, 0);
                sd.flags = 3;
                v.handle_guest_packet(sd, &[]);
                assert!(
                    v.ctrl.iter().any(|h| h.op == OP_RST),
                    "the guest waits for RST"
                );
            } else {
                v.handle_guest_packet(hdr(OP_RST, 1234, 6000, 0), &[]);
            }
            // The host reads slowly; the device keeps flushing on EPOLLOUT.
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return got,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !v.conns.is_empty() && std::time::Instant::now() < deadline {
                v.update_interests();
                v.handle_host_events();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(v.conns.is_empty(), "the draining connection never finished");
            let got = reader.join().unwrap();
            assert_eq!(got.len(), sent.len(), "close flags {close}");
            assert!(got == sent);
        }
    }

    #[test]
    fn header_round_trips_and_short_input_is_rejected() {
        let h = hdr(OP_RW, 1, 2, 3);
        assert_eq!(Header::parse(&h.to_bytes()), Some(h));
        assert_eq!(Header::parse(&[0u8; 43]), None);
    }

    #[test]
    fn guest_connections_are_forwarded_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Vsock::new(3, &uds).unwrap();
        // Nobody listens on port 5000: RST.
        v.handle_guest_packet(hdr(OP_REQUEST, 1234, 5000, 0), &[]);
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RST);
        // A listener on uds_5001: RESPONSE, then data reaches it.
        let l = UnixListener::bind(format!("{}_5001", uds.display())).unwrap();
        v.handle_guest_packet(hdr(OP_REQUEST, 1234, 5001, 0), &[]);
        let r = v.ctrl.pop_front().unwrap();
        assert_eq!((r.op, r.src_port, r.dst_port), (OP_RESPONSE, 5001, 1234));
        let (mut s, _) = l.accept().unwrap();
        v.handle_guest_packet(hdr(OP_RW, 1234, 5001, 5), b"hello");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // A packet from a wrong CID, and data on an unknown connection: RST.
        let mut bad = hdr(OP_RW, 1, 5001, 0);
        bad.src_cid = 99;
        v.handle_guest_packet(bad, &[]);
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RST);
        v.handle_guest_packet(hdr(OP_RW, 777, 5001, 1), b"x");
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RST);
        // A guest that ignores our credit is reset.
        let big = vec![0u8; MAX_PKT];
        drop(s); // the host stops reading
        for _ in 0..((BUF_ALLOC as usize / MAX_PKT) + 3) {
            v.handle_guest_packet(hdr(OP_RW, 1234, 5001, MAX_PKT as u32), &big);
        }
        assert!(v.conns.is_empty());
        assert!(v.ctrl.iter().any(|h| h.op == OP_RST));
        // Full shutdown from the guest gets an RST and forgets the connection.
        v.ctrl.clear();
        v.handle_guest_packet(hdr(OP_REQUEST, 1300, 5001, 0), &[]);
        let _ = l.accept().unwrap();
        v.ctrl.clear();
        let mut sd = hdr(OP_SHUTDOWN, 1300, 5001, 0);
        sd.flags = 3;
        v.handle_guest_packet(sd, &[]);
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RST);
        assert!(v.conns.is_empty());
    }

    #[test]
    fn host_connect_line_makes_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Vsock::new(3, &uds).unwrap();
        let mut c = UnixStream::connect(&uds).unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        for _ in 0..10 {
            v.handle_host_events();
        }
        let req = v.ctrl.pop_front().expect("a REQUEST");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, 3));
        // The guest accepts: the host reads OK <port>.
        let mut resp = hdr(OP_RESPONSE, 1024, req.src_port, 0);
        resp.dst_port = req.src_port;
        v.handle_guest_packet(resp, &[]);
        let mut line = [0u8; 64];
        let n = c.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        // Garbage instead of CONNECT closes the connection without a request.
        let mut g = UnixStream::connect(&uds).unwrap();
        g.write_all(b"HELLO\n").unwrap();
        for _ in 0..10 {
            v.handle_host_events();
        }
        assert!(v.ctrl.is_empty());
        let mut b = [0u8; 1];
        assert_eq!(g.read(&mut b).unwrap(), 0);
        drop(v);
        assert!(!uds.exists(), "the socket file is removed");
    }

    /// A guest connection to a host port in the range husk hands out for host connections
    /// does not make a later host connection reuse (and overwrite) its key.
    #[test]
    fn host_ports_skip_one_a_guest_connection_uses() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Vsock::new(3, &uds).unwrap();
        let _l = UnixListener::bind(format!("{}_{FIRST_HOST_PORT}", uds.display())).unwrap();
        v.handle_guest_packet(hdr(OP_REQUEST, 1024, FIRST_HOST_PORT, 0), &[]);
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RESPONSE);
        let mut c = UnixStream::connect(&uds).unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        for _ in 0..10 {
            v.handle_host_events();
        }
        let req = v.ctrl.pop_front().expect("a REQUEST");
        assert_eq!(req.op, OP_REQUEST);
        assert_ne!(
            req.src_port, FIRST_HOST_PORT,
            "the guest's connection's key"
        );
        assert_eq!(v.conns.len(), 2);
    }

    /// Random packets never panic or grow buffers without bound.
    #[test]
    fn random_packets_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let mut seed = 0x1234_5678_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut b = [0u8; HDR_LEN + 8];
            for x in b.iter_mut() {
                *x = next() as u8;
            }
            // Keep some packets well-formed enough to reach deeper paths.
            if next() % 2 == 0 {
                b[0..8].copy_from_slice(&3u64.to_le_bytes());
                b[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
                b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
                b[30..32].copy_from_slice(&((next() % 9) as u16).to_le_bytes());
            }
            if let Some(h) = Header::parse(&b) {
                v.handle_guest_packet(h, &b[HDR_LEN..]);
            }
        }
        assert!(v.ctrl.len() <= MAX_CTRL);
        assert!(v.conns.len() <= MAX_CONNS);
    }

    /// Packets read from the TX ring: header and payload in one descriptor, or split over
    /// several anywhere (even inside the header): a chain is one buffer.
    #[test]
    fn tx_packets_in_one_descriptor_or_split_over_a_chain() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        g.packet(&mut v, hdr(OP_RW, 1234, 5000, 5), b"hello");
        let h = hdr(OP_RW, 1234, 5000, 6).to_bytes();
        g.send(
            &mut v,
            &[&h[..10], &h[10..30], &h[30..], b"wo", b"r", b"ld!"],
        );
        let mut mixed = hdr(OP_RW, 1234, 5000, 4).to_bytes().to_vec();
        mixed.extend_from_slice(b"<>");
        g.send(&mut v, &[&mixed, b"()"]);
        // Bytes past the header's length are not payload.
        g.packet(&mut v, hdr(OP_RW, 1234, 5000, 2), b"..IGNORED");
        let want = b"helloworld!<>()..";
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, want);
        s.set_nonblocking(true).unwrap();
        let mut more = [0u8; 16];
        assert_eq!(
            s.read(&mut more).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "nothing beyond the headers' lengths"
        );
        // A chain shorter than a header is dropped.
        g.send(&mut v, &[&h[..20]]);
        assert!(v.ctrl.is_empty());
    }

    /// A host packet goes into the guest's RX chain across several small buffers (the
    /// header itself split), and a packet bigger than a chain continues in the next ones.
    #[test]
    fn rx_packets_spread_over_small_guest_buffers() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        let data: Vec<u8> = (0..100u8).collect();
        s.write_all(&data).unwrap();
        g.offer_rx(&[16, 16, 20, 8, 100]);
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| !p.is_empty());
        assert_eq!(got.len(), 1);
        let (h, payload, used_len) = &got[0];
        assert_eq!(
            (h.op, h.len, h.src_port, h.dst_port),
            (OP_RW, 100, 5000, 1234)
        );
        assert_eq!(payload, &data);
        assert_eq!(*used_len as usize, HDR_LEN + 100);

        // 300 bytes into chains of 3 x 30 bytes: 46 bytes of payload each.
        let big: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        s.write_all(&big).unwrap();
        let mut all = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while all.len() < big.len() && Instant::now() < deadline {
            g.offer_rx(&[30, 30, 30]);
            v.process_backend();
            for (h, p, _) in g.received() {
                assert_eq!(h.op, OP_RW);
                assert!(p.len() <= 90 - HDR_LEN);
                all.extend_from_slice(&p);
            }
        }
        assert_eq!(all, big);
    }

    /// A guest that advertises a small buffer never gets more than its credit, however much
    /// the host writes; its credit updates let the rest through, still within credit. A
    /// guest that shrinks its buffer after the host's data was read is respected too.
    #[test]
    fn a_small_guest_buffer_is_never_overrun() {
        const ALLOC: u32 = 100;
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, ALLOC);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        s.write_all(&data).unwrap();
        for _ in 0..8 {
            g.offer_rx(&[4096]);
        }
        let mut received = Vec::new();
        let mut fwd = 0u32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.len() < data.len() && Instant::now() < deadline {
            let want = (fwd as usize + ALLOC as usize).min(data.len()) - received.len();
            let got = g.poll_until(&mut v, Some(4096), Duration::from_secs(5), |p| {
                p.iter().map(|x| x.1.len()).sum::<usize>() >= want
            });
            // Give the device a chance to overstep before checking.
            let extra = g.poll_until(&mut v, Some(4096), Duration::from_millis(20), |_| false);
            for (h, p, _) in got.into_iter().chain(extra) {
                if h.op == OP_RW {
                    received.extend_from_slice(&p);
                }
                assert!(
                    received.len() as u32 - fwd <= ALLOC,
                    "{} bytes in flight with a credit of {ALLOC}",
                    received.len() as u32 - fwd
                );
            }
            // The guest's application read everything: it tells the host.
            fwd = received.len() as u32;
            let mut u = hdr(OP_CREDIT_UPDATE, 1234, 5000, 0);
            (u.buf_alloc, u.fwd_cnt) = (ALLOC, fwd);
            g.packet(&mut v, u, &[]);
        }
        assert_eq!(received, data);

        // The host's data is read while the credit is large; then the guest shrinks it.
        let mut s2 = connect(&mut g, &mut v, &l, 1300, 5000, 4096);
        let key = (5000, 1300);
        s2.write_all(&[7u8; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while v.conns[&key].rx_pending.is_empty() && Instant::now() < deadline {
            // No RX buffers on offer: what the device read stays pending.
            v.handle_host_events();
            v.update_interests();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(v.conns[&key].rx_pending.len(), 1000);
        let mut shrink = hdr(OP_CREDIT_UPDATE, 1300, 5000, 0);
        shrink.buf_alloc = 10;
        g.packet(&mut v, shrink, &[]);
        for _ in 0..4 {
            g.offer_rx(&[4096]);
        }
        let got: usize = g
            .poll_until(&mut v, None, Duration::from_millis(50), |_| false)
            .iter()
            .filter(|x| x.0.op == OP_RW)
            .map(|x| x.1.len())
            .sum();
        assert_eq!(got, 10, "only the shrunk credit was sent");
    }

    /// Descriptors outside guest memory, wrapping around the address space, of absurd
    /// lengths, indirect ones (not offered) and heads past the ring: refused without a panic,
    /// the chains given back, and the device still works afterwards.
    #[test]
    fn bad_descriptors_are_refused_without_panic() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        // A valid packet, behind descriptors that are not all guest memory.
        let mut pkt = hdr(OP_RW, 1234, 5000, 3).to_bytes().to_vec();
        pkt.extend_from_slice(b"bad");
        let a = g.alloc(pkt.len());
        g.mem.write_slice(&pkt, GuestAddress(a)).unwrap();
        for bufs in [
            vec![(GUEST_MEM + 0x1000, 64, false)],
            vec![(u64::MAX - 8, 64, false)],
            vec![(a, u32::MAX, false)],
            vec![(a, pkt.len() as u32, false), (GUEST_MEM - 16, 4096, false)],
            vec![(GUEST_MEM - 16, 4096, false), (a, pkt.len() as u32, false)],
        ] {
            g.send_bufs(&mut v, &bufs);
        }
        // An indirect descriptor pointing outside memory.
        let head = 200;
        g.tx.write_desc(&g.mem, head, (GUEST_MEM * 4, 16 * 4, F_INDIRECT, 0));
        g.tx.publish(&g.mem, head);
        v.queue_notify(1);
        // A head index past the ring's end.
        g.tx.publish(&g.mem, 999);
        v.queue_notify(1);
        let _ = g.tx.take_used(&g.mem);
        // A chain that loops on itself (over zeroes: a packet from CID 0, answered by RST):
        // read at most once per ring entry.
        let zeroes = g.alloc(64);
        g.tx.write_desc(&g.mem, 100, (zeroes, 8, 1, 100));
        g.tx.publish(&g.mem, 100);
        v.queue_notify(1);
        let _ = g.tx.take_used(&g.mem);
        assert_eq!(v.ctrl.pop_front().map(|h| h.op), Some(OP_RST));
        assert!(v.ctrl.is_empty());
        // None of these packets got through.
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            s.read(&mut b).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock)
        );
        s.set_nonblocking(false).unwrap();
        // RX buffers outside memory, too short for a header, or of absurd length: given
        // back empty, and the packet waits for good buffers.
        let _ = g.received();
        v.handle_guest_packet(hdr(OP_CREDIT_REQUEST, 1234, 5000, 0), &[]);
        assert_eq!(v.ctrl.len(), 1);
        for bufs in [
            vec![(GUEST_MEM + 0x1000, 4096, true)],
            vec![(u64::MAX - 8, 4096, true)],
            vec![(BUFS, 20, true), (BUFS + 64, 20, true)],
            vec![(BUFS, u32::MAX, true)],
            vec![(BUFS, 4096, true), (GUEST_MEM - 16, 4096, true)],
        ] {
            g.rx.add_chain(&g.mem, &bufs);
        }
        v.queue_notify(0);
        let used = g.rx.take_used(&g.mem);
        assert_eq!(used.len(), 5);
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(v.ctrl.len(), 1, "the packet still waits");
        g.offer_rx(&[4096]);
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| !p.is_empty());
        assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
        // A good packet still gets through.
        g.packet(&mut v, hdr(OP_RW, 1234, 5000, 4), b"good");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"good");
    }

    /// Beyond MAX_CONNS connections, a guest request is answered with RST (and nothing is
    /// connected on the host); once one closes, a new one is accepted again.
    #[test]
    fn connections_beyond_the_limit_are_reset() {
        // One socket per connection on the device's side (the host's ends are closed).
        let need = MAX_CONNS as u64 + 256;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            if lim.rlim_cur < need && lim.rlim_max >= need {
                lim.rlim_cur = need;
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
            }
        }
        assert!(
            lim.rlim_cur >= need,
            "this test needs {need} open files, the limit is {}",
            lim.rlim_cur
        );
        let (_dir, mut v, l) = device_with_listener(6000);
        l.set_nonblocking(true).unwrap();
        for i in 0..MAX_CONNS as u32 {
            v.handle_guest_packet(hdr(OP_REQUEST, 10_000 + i, 6000, 0), &[]);
            assert_eq!(
                v.ctrl.pop_front().map(|h| h.op),
                Some(OP_RESPONSE),
                "conn {i}"
            );
            drop(l.accept().unwrap());
        }
        assert_eq!(v.conns.len(), MAX_CONNS);
        for i in 0..3 {
            v.handle_guest_packet(hdr(OP_REQUEST, 20_000 + i, 6000, 0), &[]);
            let r = v.ctrl.pop_front().unwrap();
            assert_eq!((r.op, r.dst_port), (OP_RST, 20_000 + i));
            assert_eq!(
                l.accept().map(|_| ()).map_err(|e| e.kind()),
                Err(ErrorKind::WouldBlock),
                "no host connection beyond the limit"
            );
        }
        assert_eq!(v.conns.len(), MAX_CONNS);
        v.handle_guest_packet(hdr(OP_RST, 10_000, 6000, 0), &[]);
        v.handle_guest_packet(hdr(OP_REQUEST, 20_000, 6000, 0), &[]);
        assert_eq!(v.ctrl.pop_front().map(|h| h.op), Some(OP_RESPONSE));
    }

    /// A host listener whose backlog is full refuses the guest at once (RST) instead of
    /// blocking the device (and the vCPU) until the listener accepts.
    #[test]
    fn a_full_host_backlog_refuses_instead_of_blocking() {
        let (_dir, mut v, l) = device_with_listener(7000);
        // A backlog of 0: one connection waits in it, the next finds it full.
        // SAFETY: listen(2) on a socket we own.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ops = Vec::new();
            for port in [1, 2, 3] {
                v.handle_guest_packet(hdr(OP_REQUEST, port, 7000, 0), &[]);
                ops.push(v.ctrl.pop_front().map(|h| h.op));
            }
            let _ = tx.send((ops, v));
        });
        let (ops, _v) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the device blocked on a full backlog");
        assert_eq!(ops[0], Some(OP_RESPONSE));
        assert_eq!(ops[1..], [Some(OP_RST), Some(OP_RST)]);
        drop(l);
    }

    #[test]
    fn nonblocking_connect_refuses_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connect_nonblocking(&dir.path().join("nobody")).is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).map(|_| ()).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let p = dir.path().join("ok");
        let l = UnixListener::bind(&p).unwrap();
        let mut s = connect_nonblocking(&p).unwrap();
        let (mut a, _) = l.accept().unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        a.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // The stream is non-blocking.
        assert_eq!(
            s.read(&mut b).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock)
        );
    }

    /// A guest filling the control queue in a loop gets a warning per second, not per packet.
    #[test]
    fn a_full_control_queue_warns_rarely() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let mut bad = hdr(OP_RW, 1, 2, 0);
        bad.src_cid = 99;
        for _ in 0..MAX_CTRL + 10_000 {
            v.handle_guest_packet(bad, &[]);
        }
        assert_eq!(v.ctrl.len(), MAX_CTRL);
        // The first drop was logged; the next 9999 are only counted.
        assert_eq!(v.ctrl_full_log.hit(), None);
    }
}
