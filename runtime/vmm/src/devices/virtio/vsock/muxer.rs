//! The muxer between the guest and the host sockets: the connection table, one epoll set for
//! every host socket (and the listener), and what goes to the guest next: control packets
//! first, then data, one packet per connection in turn.

use std::{
    collections::{HashMap, VecDeque},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::{Duration, Instant},
};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    timerfd::TimerFd,
};

use super::{
    connection::{Action, Conn, Key, Outcome, Recv, State},
    packet::{
        write_scattered, Header, Payload, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
        TYPE_STREAM,
    },
    unix::HostListener,
    VsockError,
};
use crate::{
    devices::ratelimit::LogLimiter,
    poll::{epoll_with, set_nonblocking},
};

/// Control packets waiting for RX buffers at most (beyond: new connections are refused).
const MAX_CTRL: usize = 4096;
pub(super) const MAX_CONNS: usize = 1024;
/// The epoll token of the listener (other tokens are file descriptors).
const LISTENER: u64 = u64::MAX;
/// The epoll token of the connections' timer.
const TIMER: u64 = u64::MAX - 1;
/// Host ports of host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;

#[derive(Debug)]
pub(super) struct Muxer {
    cid: u64,
    host: HostListener,
    epoll: Epoll,
    pub(super) conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pub(super) ctrl: VecDeque<Header>,
    /// The connections with data the guest has room for, each once (see `Conn::in_rxq`), in
    /// the order they got it: each sends one packet, then waits behind the others.
    rxq: VecDeque<Key>,
    next_host_port: u32,
    /// Fires at the earliest connection deadline (`timer_at`), if any.
    timer: TimerFd,
    timer_at: Option<Instant>,
    /// Warnings the guest (or a host peer) can trigger again and again.
    pub(super) ctrl_full_log: LogLimiter,
    /// Connections reset while their host side was still open (the guest's RST, or ours).
    reset_log: LogLimiter,
}

impl Muxer {
    /// See [`HostListener::ports_at`].
    pub(super) fn host_ports_at(&mut self, path: std::path::PathBuf) {
        self.host.ports_at(path);
    }

    /// Listens on `uds` for the host side of guest `cid`.
    pub(super) fn new(cid: u64, uds: &Path) -> Result<Muxer, VsockError> {
        let host = HostListener::bind(uds)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Epoll)?;
        let epoll = epoll_with([
            (host.as_raw_fd(), EventSet::IN, LISTENER),
            (timer.as_raw_fd(), EventSet::IN, TIMER),
        ])
        .map_err(VsockError::Epoll)?;
        Ok(Muxer {
            cid,
            host,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ctrl: VecDeque::new(),
            rxq: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            timer,
            timer_at: None,
            ctrl_full_log: LogLimiter::default(),
            reset_log: LogLimiter::default(),
        })
    }

    pub(super) fn cid(&self) -> u64 {
        self.cid
    }

    /// The epoll set: readable when a host socket has something for us.
    pub(super) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
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

    /// Queues a control packet to the guest on connection `key`, known or not.
    fn send(&mut self, key: Key, op: u16, flags: u32, fwd_cnt: u32) {
        let h = Header::from_host(self.cid, key, op, flags, fwd_cnt);
        self.push_ctrl(h);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if c.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            if c.in_rxq {
                self.rxq.retain(|k| *k != key);
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
        self.send(key, OP_RST, 0, 0);
    }

    /// Does what connection `key` said is left to do.
    fn apply(&mut self, key: Key, out: Outcome) {
        if let Some(why) = out.why {
            self.log_reset(key, &why);
        }
        match out.action {
            Action::None => {}
            Action::Send { op, flags, fwd_cnt } => self.send(key, op, flags, fwd_cnt),
            Action::Reset => self.reset(key),
            Action::Remove => self.remove(key),
        }
    }

    /// Puts connection `key` at the back of the RX queue if its host socket may have data the
    /// guest has room for and it is not queued already. Called wherever that may have become
    /// true: the host socket turned readable, the guest's credit grew, a packet of data sent.
    fn queue_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rxq && c.rx_ready() {
                c.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Handles one packet from the guest.
    pub(super) fn handle_guest_packet<'a>(&mut self, h: Header, payload: impl Into<Payload<'a>>) {
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.typ != TYPE_STREAM {
            if h.op != OP_RST {
                self.send(key, OP_RST, 0, 0);
            }
            return;
        }
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
                self.send(key, OP_RST, 0, 0);
                return;
            }
            match self.host.connect_port(h.dst_port) {
                Ok(stream) => {
                    let c = Conn::accepted(stream, &h);
                    self.by_fd.insert(c.stream.as_raw_fd(), key);
                    self.conns.insert(key, c);
                    self.send(key, OP_RESPONSE, 0, 0);
                }
                Err(_) => self.send(key, OP_RST, 0, 0),
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.send(key, OP_RST, 0, 0);
            }
            return;
        };
        let out = c.on_guest_packet(key.0, &h, payload);
        self.apply(key, out);
        // The packet may have given the guest room for data waiting.
        self.queue_rx(key);
    }

    /// Makes the connection a host peer asked for with its CONNECT line: the guest gets a
    /// REQUEST from a host port of ours.
    fn connect_host(&mut self, stream: UnixStream, port: u32) {
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
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns.insert(key, Conn::new(stream, State::Connecting));
        self.send(key, OP_REQUEST, 0, 0);
    }

    /// Handles what is ready on the host side: new peers on the listener, CONNECT lines,
    /// and the connections' sockets.
    pub(super) fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.host.accept_all(&self.epoll);
                continue;
            }
            if token == TIMER {
                // Non-blocking: nothing to read if the timer was re-armed meanwhile.
                let _ = self.timer.wait();
                self.timer_at = None;
                self.expire(Instant::now());
                continue;
            }
            let fd = token as RawFd;
            if self.host.is_pending(fd) {
                if let Some((stream, port)) = self.host.read_connect_line(&self.epoll, fd) {
                    self.connect_host(stream, port);
                }
                continue;
            }
            let Some(&key) = self.by_fd.get(&fd) else {
                continue;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let set = ev.event_set();
            if c.state == State::Draining {
                if c.drained(set) {
                    self.remove(key);
                }
                continue;
            }
            if set.contains(EventSet::OUT) {
                let action = c.forward();
                let reset = action == Action::Reset;
                self.apply(key, action.into());
                if reset {
                    continue;
                }
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                // Read on its turn, straight into the guest's buffers.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.on_host_readable();
                    self.queue_rx(key);
                }
            }
        }
    }

    /// Ends the waits of the connections whose deadline is past at `now`.
    pub(super) fn expire(&mut self, now: Instant) {
        let due: Vec<(Key, Outcome)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| c.on_timer(now).map(|o| (*k, o)))
            .collect();
        for (key, out) in due {
            self.apply(key, out);
        }
    }

    /// Registers each connection's socket for exactly the events it can act on, and arms
    /// the timer for the earliest deadline.
    pub(super) fn update_interests(&mut self) {
        let next = self.conns.values().filter_map(Conn::deadline).min();
        if next != self.timer_at {
            let armed = match next {
                // A zero duration would disarm the timer: a past deadline fires in 1 ms.
                Some(at) => self.timer.reset(
                    at.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                    None,
                ),
                None => self.timer.clear(),
            };
            if armed.is_ok() {
                self.timer_at = next;
            }
        }
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

    /// Whether a packet waits for the guest: a control packet, or data of a connection the
    /// guest has room for. Queued connections found with nothing to send any more (the guest
    /// shrank its buffer, or left) leave the queue; they come back when they have.
    pub(super) fn has_rx(&mut self) -> bool {
        if !self.ctrl.is_empty() {
            return true;
        }
        while let Some(&key) = self.rxq.front() {
            match self.conns.get_mut(&key) {
                Some(c) if c.rx_ready() => return true,
                Some(c) => c.in_rxq = false,
                None => {}
            }
            self.rxq.pop_front();
        }
        false
    }

    /// Writes the next packet for the guest into its RX buffers `bufs` (all guest memory,
    /// with room for a header: see `packet::rx_buffers`): a control packet if one waits,
    /// else data of the connection whose turn it is, read from its host socket straight into
    /// the buffers, within the guest's credit. A connection whose socket had nothing after
    /// all gives its turn to the next; its end of file or a failed read becomes a control
    /// packet, which takes these buffers. Returns the bytes written (0 when nothing waits:
    /// the buffers stay the guest's, unused).
    pub(super) fn write_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, usize)],
    ) -> usize {
        loop {
            if let Some(h) = self.ctrl.pop_front() {
                return write_scattered(mem, bufs, &[&h.to_bytes()]);
            }
            if !self.has_rx() {
                return 0;
            }
            let Some(key) = self.rxq.pop_front() else {
                return 0;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rxq = false;
            match c.recv(mem, bufs) {
                Recv::Data(n) => {
                    let mut h = Header::from_host(self.cid, key, OP_RW, 0, c.fwd_cnt);
                    h.len = n as u32;
                    let written = write_scattered(mem, bufs, &[&h.to_bytes()]);
                    // Its next packet waits behind the other connections' data.
                    self.queue_rx(key);
                    return written + n;
                }
                // Not queued again: it is drained, at its end, or gone.
                Recv::Nothing(out) => self.apply(key, out),
            }
        }
    }

    /// Forgets every connection and every packet for the guest (the driver reset the
    /// device). Host peers still writing their CONNECT line stay.
    pub(super) fn reset_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
        self.rxq.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read},
        os::unix::net::UnixListener,
        time::Duration,
    };

    use super::*;
    use crate::devices::virtio::vsock::{
        connection::BUF_ALLOC,
        packet::{HDR_LEN, MAX_PKT, OP_CREDIT_UPDATE, OP_SHUTDOWN},
        test_utils::{hdr, host_peer, muxer_with_listener},
    };

    /// The guest writes more than the host socket buffer takes and closes at once: every
    /// byte still reaches a slow host reader (it once lost the unflushed tail).
    #[test]
    fn bytes_sent_before_a_guest_close_reach_a_slow_host() {
        for close in [3u32, 0] {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let mut v = Muxer::new(3, &uds).unwrap();
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
    fn guest_connections_are_forwarded_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Muxer::new(3, &uds).unwrap();
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

    /// A guest connection to a host port in the range husk hands out for host connections
    /// does not make a later host connection reuse (and overwrite) its key.
    #[test]
    fn host_ports_skip_one_a_guest_connection_uses() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Muxer::new(3, &uds).unwrap();
        let _l = UnixListener::bind(format!("{}_{FIRST_HOST_PORT}", uds.display())).unwrap();
        v.handle_guest_packet(hdr(OP_REQUEST, 1024, FIRST_HOST_PORT, 0), &[]);
        assert_eq!(v.ctrl.pop_front().unwrap().op, OP_RESPONSE);
        let _c = host_peer(&mut v, &uds, 1024);
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
        let mut v = Muxer::new(3, &dir.path().join("v.sock")).unwrap();
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
        let (_dir, mut v, l) = muxer_with_listener(6000);
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
        let (_dir, mut v, l) = muxer_with_listener(7000);
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

    /// A guest filling the control queue in a loop gets a warning per second, not per packet.
    #[test]
    fn a_full_control_queue_warns_rarely() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Muxer::new(3, &dir.path().join("v.sock")).unwrap();
        let mut bad = hdr(OP_RW, 1, 2, 0);
        bad.src_cid = 99;
        for _ in 0..MAX_CTRL + 10_000 {
            v.handle_guest_packet(bad, &[]);
        }
        assert_eq!(v.ctrl.len(), MAX_CTRL);
        // The first drop was logged; the next 9999 are only counted.
        assert_eq!(v.ctrl_full_log.hit(), None);
    }

    /// A connection with data for the guest is in the RX queue once however often it gets
    /// more room, leaves it when it goes, and one with nothing to send is skipped.
    #[test]
    fn the_rx_queue_holds_each_connection_with_data_once() {
        let (_dir, mut v, l) = muxer_with_listener(5000);
        for port in [1, 2, 3] {
            v.handle_guest_packet(hdr(OP_REQUEST, port, 5000, 0), &[]);
            drop(l.accept().unwrap());
        }
        v.ctrl.clear();
        assert!(!v.has_rx());
        for port in [1, 2, 1, 3] {
            let key = (5000, port);
            v.conns.get_mut(&key).unwrap().on_host_readable();
            v.queue_rx(key);
            v.handle_guest_packet(hdr(OP_CREDIT_UPDATE, port, 5000, 0), &[]);
        }
        assert_eq!(v.rxq, [(5000, 1), (5000, 2), (5000, 3)]);
        v.handle_guest_packet(hdr(OP_RST, 2, 5000, 0), &[]);
        assert_eq!(v.rxq, [(5000, 1), (5000, 3)]);
        v.conns.get_mut(&(5000, 1)).unwrap().host_readable = false;
        assert!(v.has_rx());
        assert_eq!(v.rxq, [(5000, 3)]);
        assert!(!v.conns[&(5000, 1)].in_rxq);
    }

    /// A guest that never answers a host peer's connection request: the request times out,
    /// the guest gets an RST, the host peer sees its socket closed, and the timer is armed
    /// only while a connection waits.
    #[test]
    fn an_unanswered_connection_request_times_out() {
        use crate::devices::virtio::vsock::connection::CONNECT_TIMEOUT;
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Muxer::new(3, &uds).unwrap();
        let mut c = host_peer(&mut v, &uds, 1024);
        let req = v.ctrl.pop_front().expect("a REQUEST");
        assert_eq!(req.op, OP_REQUEST);
        v.update_interests();
        assert!(
            v.timer.is_armed().unwrap(),
            "the request's deadline is armed"
        );
        // Not yet.
        v.expire(Instant::now());
        assert_eq!(v.conns.len(), 1);
        // Past the deadline.
        v.expire(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1));
        assert!(v.conns.is_empty());
        let rst = v.ctrl.pop_front().expect("an RST");
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 1024));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            c.read(&mut buf).unwrap(),
            0,
            "the host peer sees its socket closed"
        );
        v.update_interests();
        assert!(!v.timer.is_armed().unwrap(), "nothing waits any more");
    }

    /// The timer's expiry reaches the muxer through its epoll set, as the I/O thread sees it.
    #[test]
    fn the_timer_fires_through_the_epoll_set() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Muxer::new(3, &uds).unwrap();
        let _c = host_peer(&mut v, &uds, 1024);
        assert_eq!(v.conns.len(), 1);
        // Pretend the deadline is now: arm the timer for it.
        v.timer.reset(Duration::from_millis(5), None).unwrap();
        v.timer_at = Some(Instant::now());
        let mut ev = [EpollEvent::default(); 4];
        let n = v.epoll.wait(2000, &mut ev).unwrap();
        assert!(ev[..n].iter().any(|e| e.data() == TIMER));
        // The connection's own deadline is not past: it stays, and the timer is re-armed.
        v.handle_host_events();
        assert_eq!(v.conns.len(), 1);
        v.update_interests();
        assert!(v.timer.is_armed().unwrap());
    }
}
