//! One connection between a guest port and a host socket: its state machine and the credit
//! both ways. It handles the guest's packets and its host socket's readiness itself, and
//! tells the muxer what is left to do (an [`Outcome`]): a control packet to send, the
//! connection to forget, a reason to log.

use std::{
    borrow::Cow,
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, Payload, MAX_PKT, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_SEND,
};

/// What we tell the guest we can buffer per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// How much we read from a host socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// A connection's ports: (host port, guest port).
pub(super) type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest is gone from this connection (it shut both directions or reset it), but
    /// bytes it sent still wait for the host socket: they are flushed, then the connection
    /// is dropped. Nothing the guest wrote before closing is lost to a slow host reader.
    Draining,
}

/// What the muxer does for a connection after the connection handled something.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// Nothing.
    None,
    /// Queue this control packet for the guest on the connection, which stays.
    Send { op: u16, flags: u32, fwd_cnt: u32 },
    /// Forget the connection and send the guest RST.
    Reset,
    /// Forget the connection without a word to the guest: the guest forgot it already.
    Remove,
}

/// An [`Action`], and why a connection whose host side is still open goes away, if it does
/// and the reason is worth a (rate-limited) warning.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    pub(super) action: Action,
    pub(super) why: Option<Cow<'static, str>>,
}

impl Outcome {
    fn reset(why: impl Into<Cow<'static, str>>) -> Outcome {
        Outcome {
            action: Action::Reset,
            why: Some(why.into()),
        }
    }
}

impl From<Action> for Outcome {
    fn from(action: Action) -> Outcome {
        Outcome { action, why: None }
    }
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes of the guest's the host socket took (straight from the guest's buffers, or out
    /// of `tx_buf`).
    pub(super) fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest-to-host bytes waiting for the host socket: only what it did not take at once.
    pub(super) tx_buf: Vec<u8>,
    /// Host-to-guest bytes waiting for RX buffers.
    pub(super) rx_pending: Vec<u8>,
    host_eof: bool,
    guest_done_sending: bool,
    /// The events the muxer's epoll waits for on `stream`, if it is registered.
    pub(super) registered: Option<EventSet>,
    /// Whether the muxer's RX queue holds this connection's key.
    pub(super) in_rxq: bool,
}

impl Conn {
    /// A connection the host opened (REQUEST sent), or the guest asked for.
    pub(super) fn new(stream: UnixStream, state: State) -> Conn {
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
            in_rxq: false,
        }
    }

    /// The connection the guest's REQUEST `h` asked for, connected to the host socket `stream`.
    pub(super) fn accepted(stream: UnixStream, h: &Header) -> Conn {
        let mut c = Conn::new(stream, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c
    }

    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub(super) fn wanted_events(&self) -> EventSet {
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

    /// Whether host data waits that the guest has room for now: such a connection waits in
    /// the muxer's RX queue for its turn.
    pub(super) fn rx_ready(&self) -> bool {
        self.state != State::Draining && !self.rx_pending.is_empty() && self.peer_credit() > 0
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

    /// Passes on what the host socket takes now of the guest's bytes (when the guest sent
    /// some, and when the socket turns writable), and tells the guest its new credit once a
    /// quarter of our buffer has been freed since it last heard. Reset if the host side is
    /// gone.
    pub(super) fn forward(&mut self) -> Action {
        if !self.flush() {
            return Action::Reset;
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            return self.credit_update();
        }
        Action::None
    }

    fn credit_update(&mut self) -> Action {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Action::Send {
            op: OP_CREDIT_UPDATE,
            flags: 0,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Passes the guest's `payload` on, in order behind what waits in `tx_buf`: while
    /// nothing waits, straight from the guest's buffers into the host socket, as far as the
    /// socket takes it now; what it does not take (or all of it, behind waiting bytes) into
    /// `tx_buf`. Either way each byte is copied once before the socket has it. False if the
    /// host side is gone.
    fn take_payload(&mut self, payload: &Payload) -> bool {
        let mut sent = 0;
        if self.tx_buf.is_empty() && !payload.is_empty() {
            match payload.write_to(&mut self.stream) {
                Ok(0) => return false,
                Ok(n) => {
                    sent = n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        payload.append_to(sent, &mut self.tx_buf);
        true
    }

    /// Handles the guest's packet `h` (with `payload`) on this connection, whose host port is
    /// `host_port`. REQUESTs are the muxer's: they make connections.
    pub(super) fn on_guest_packet<'a>(
        &mut self,
        host_port: u32,
        h: &Header,
        payload: impl Into<Payload<'a>>,
    ) -> Outcome {
        let payload = payload.into();
        if self.state == State::Draining {
            // Already reset on the guest's side; only the host side is still being fed.
            return Action::None.into();
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                // Ours, not the guest's: it goes straight to the fresh (empty) socket and
                // does not count against the guest's credit.
                let ok = format!("OK {host_port}\n");
                if self.stream.write_all(ok.as_bytes()).is_err() {
                    return Outcome::reset("the host peer left before the guest accepted");
                }
                Action::None.into()
            }
            OP_RW if self.state == State::Established => {
                if self.tx_buf.len() + payload.len() > BUF_ALLOC as usize + MAX_PKT {
                    // The guest ignored our credit.
                    return Outcome::reset("the guest sent beyond its credit: reset");
                }
                if !self.take_payload(&payload) {
                    return Action::Reset.into();
                }
                self.forward().into()
            }
            OP_CREDIT_REQUEST => self.credit_update().into(),
            OP_CREDIT_UPDATE => Action::None.into(),
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    self.guest_done_sending = true;
                    let _ = self.flush();
                }
                if h.flags & 3 == 3 {
                    // Both directions closed by the guest: it waits for our RST to finish.
                    if self.drain() {
                        return Action::Send {
                            op: OP_RST,
                            flags: 0,
                            fwd_cnt: 0,
                        }
                        .into();
                    }
                    return Action::Reset.into();
                }
                Action::None.into()
            }
            OP_RST => {
                let abrupt =
                    self.state == State::Established && !self.host_eof && !self.guest_done_sending;
                let action = if self.drain() {
                    Action::None
                } else {
                    Action::Remove
                };
                Outcome {
                    action,
                    why: abrupt.then_some("reset by the guest while open on both sides".into()),
                }
            }
            op => Outcome::reset(format!("unexpected op {op} from the guest: reset")),
        }
    }

    /// A host event on a Draining connection (`set` from epoll): flushes more, and says
    /// whether the connection is done (all flushed, or the host side gone) and can go.
    pub(super) fn drained(&mut self, set: EventSet) -> bool {
        !self.flush()
            || self.tx_buf.is_empty()
            || set.intersects(EventSet::HANG_UP | EventSet::ERROR)
    }

    /// Reads what the host wrote on an established connection, within the guest's credit,
    /// once the guest has taken what was read before. At the host's end of file, the guest
    /// hears that no more comes.
    pub(super) fn read_host(&mut self) -> Outcome {
        let want = (self.peer_credit() as usize).min(READ_CHUNK);
        if want == 0 || !self.rx_pending.is_empty() || self.host_eof {
            return Action::None.into();
        }
        let mut buf = vec![0u8; want];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.host_eof = true;
                Action::Send {
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_SEND,
                    fwd_cnt: self.fwd_cnt,
                }
                .into()
            }
            Ok(n) => {
                buf.truncate(n);
                self.rx_pending = buf;
                Action::None.into()
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                Action::None.into()
            }
            Err(e) => Outcome::reset(format!("reading the host socket: {e}: reset")),
        }
    }

    /// The host data for one RW packet with room for `room` bytes of payload: within the
    /// guest's credit now, also if it shrank its buffer since we read.
    pub(super) fn rx_chunk(&self, room: usize) -> &[u8] {
        let n = self
            .rx_pending
            .len()
            .min(room)
            .min(self.peer_credit() as usize);
        &self.rx_pending[..n]
    }

    /// The first `n` bytes of [`Conn::rx_chunk`] went to the guest, in a packet that told it
    /// our `fwd_cnt`.
    pub(super) fn rx_sent(&mut self, n: usize) {
        self.rx_pending.drain(..n);
        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::{packet::OP_REQUEST, test_utils::hdr};

    /// An established connection as the guest's REQUEST makes it, and the host's end.
    fn established() -> (Conn, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Conn::accepted(ours, &hdr(OP_REQUEST, 1234, 5000, 0)), host)
    }

    /// The guest hears its new credit once a quarter of our buffer went to the host socket
    /// since it last heard, and whenever it asks.
    #[test]
    fn credit_updates_come_every_quarter_buffer_and_on_request() {
        let (mut c, _host) = established();
        let quarter = (BUF_ALLOC / 4) as usize;
        let rw = hdr(OP_RW, 1234, 5000, 0);
        let out = c.on_guest_packet(5000, &rw, &vec![1u8; quarter - 1]);
        assert_eq!(out, Action::None.into());
        let out = c.on_guest_packet(5000, &rw, b"x");
        let update = Action::Send {
            op: OP_CREDIT_UPDATE,
            flags: 0,
            fwd_cnt: quarter as u32,
        };
        assert_eq!(out, update.into());
        let out = c.on_guest_packet(5000, &rw, b"y");
        assert_eq!(out, Action::None.into());
        let out = c.on_guest_packet(5000, &hdr(OP_CREDIT_REQUEST, 1234, 5000, 0), &[]);
        let update = Action::Send {
            op: OP_CREDIT_UPDATE,
            flags: 0,
            fwd_cnt: quarter as u32 + 1,
        };
        assert_eq!(out, update.into());
    }

    /// How the guest leaves, or breaks the protocol, and what the muxer is told to do.
    #[test]
    fn guest_closes_and_protocol_errors() {
        // RST on a connection open on both sides: forgotten, and worth a warning.
        let (mut c, _host) = established();
        let out = c.on_guest_packet(5000, &hdr(OP_RST, 1234, 5000, 0), &[]);
        assert_eq!(out.action, Action::Remove);
        assert!(out.why.is_some());
        // Both directions shut with nothing left to flush: reset at once.
        let (mut c, _host) = established();
        let mut sd = hdr(OP_SHUTDOWN, 1234, 5000, 0);
        sd.flags = 3;
        assert_eq!(c.on_guest_packet(5000, &sd, &[]), Action::Reset.into());
        // A RESPONSE on an established connection.
        let (mut c, _host) = established();
        let out = c.on_guest_packet(5000, &hdr(OP_RESPONSE, 1234, 5000, 0), &[]);
        assert_eq!(out, Outcome::reset("unexpected op 2 from the guest: reset"));
    }

    /// The host's data waits for the guest within its credit; the host's end of file becomes
    /// a SHUTDOWN once the data before it went out.
    #[test]
    fn host_data_within_credit_then_shutdown() {
        let (mut c, mut host) = established();
        c.peer_buf_alloc = 10;
        host.write_all(&[7u8; 100]).unwrap();
        drop(host);
        assert_eq!(c.read_host(), Action::None.into());
        assert_eq!(c.rx_pending.len(), 10);
        assert!(c.rx_ready());
        assert_eq!(c.rx_chunk(4).len(), 4);
        c.rx_sent(4);
        assert_eq!(c.rx_chunk(100).len(), 6);
        c.rx_sent(6);
        assert!(!c.rx_ready());
        assert_eq!(c.peer_credit(), 0);
        // The guest read it all.
        let mut u = hdr(OP_CREDIT_UPDATE, 1234, 5000, 0);
        (u.buf_alloc, u.fwd_cnt) = (1000, 10);
        assert_eq!(c.on_guest_packet(5000, &u, &[]), Action::None.into());
        assert_eq!(c.read_host(), Action::None.into());
        assert_eq!(c.rx_pending.len(), 90);
        c.rx_sent(90);
        let shutdown = Action::Send {
            op: OP_SHUTDOWN,
            flags: SHUTDOWN_SEND,
            fwd_cnt: 0,
        };
        assert_eq!(c.read_host(), shutdown.into());
    }

    /// The host socket takes the start of a packet straight from the guest's buffers; the
    /// rest waits in `tx_buf`, a later packet waits behind it, and the host reads every byte
    /// in order. `fwd_cnt` counts only what the socket took.
    #[test]
    fn a_partial_write_buffers_the_rest_in_order() {
        use std::os::fd::AsRawFd;

        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

        let (mut c, mut host) = established();
        // A small send buffer, so that the socket takes only part of the packet.
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                c.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let data: Vec<u8> = (0..MAX_PKT as u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
        // The payload over three buffers of the chain, of odd sizes.
        let bufs = vec![
            (GuestAddress(0x1000), 100),
            (GuestAddress(0x1000 + 100), 30_000),
            (GuestAddress(0x1000 + 30_100), data.len() - 30_100),
        ];
        let rw = hdr(OP_RW, 1234, 5000, data.len() as u32);
        let out = c.on_guest_packet(5000, &rw, Payload::Guest { mem: &mem, bufs });
        assert_eq!(out, Action::None.into());
        let took = c.fwd_cnt as usize;
        assert!(
            took > 0 && took < data.len(),
            "the socket took {took} of {} bytes: the test proves nothing",
            data.len()
        );
        assert!(c.tx_buf == data[took..], "the rest waits, in order");
        assert!(c.wanted_events().contains(EventSet::OUT));
        // A later packet goes behind the waiting bytes, not into the socket first.
        let out = c.on_guest_packet(5000, &hdr(OP_RW, 1234, 5000, 4), b"tail");
        assert_eq!(out, Action::None.into());
        assert_eq!(c.fwd_cnt as usize, took);
        let mut sent = data.clone();
        sent.extend_from_slice(b"tail");
        assert!(c.tx_buf == sent[took..]);
        // The host reads; each time the socket turns writable the connection flushes more.
        host.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..10_000 {
            if got.len() == sent.len() {
                break;
            }
            match host.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            let _ = c.forward();
        }
        assert!(got == sent, "the host read every byte in order");
        assert!(c.tx_buf.is_empty());
        assert_eq!(c.fwd_cnt as usize, sent.len());
    }
}
