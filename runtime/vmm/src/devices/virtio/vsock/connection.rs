//! One connection between a guest port and a host socket: its state machine and the credit
//! both ways. It handles the guest's packets and its host socket's readiness itself, and
//! tells the muxer what is left to do (an [`Outcome`]): a control packet to send, the
//! connection to forget, a reason to log.

use std::{
    borrow::Cow,
    io::{ErrorKind, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    read_scattered, rx_payload_bufs, Header, Payload, MAX_PKT, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND,
};

/// What we tell the guest we can buffer per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The most host data we put in one packet (what the guest takes in one packet, too).
const MAX_RX_PAYLOAD: usize = MAX_PKT;

/// How long the guest has to answer a host peer's connection request (a booting guest's
/// driver takes its REQUEST once it is up; a hung or hostile one never answers). The host peer
/// then sees its socket closed, and the guest an RST.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a host peer has to take the bytes a guest sent before it closed the connection;
/// then they are dropped with the connection.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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

/// What a connection's turn in the muxer's RX queue gave, with RX buffers in hand.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Recv {
    /// This much of the host's data is in the buffers after the header, counted as sent:
    /// the muxer writes the RW header in front of it.
    Data(usize),
    /// Nothing for the buffers; the outcome says what is left to do (the guest hears of the
    /// host's end of file, or of a reset, in a control packet).
    Nothing(Outcome),
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
    /// Whether the host socket may have something to read (data, its end, an error): epoll
    /// said so, and no read since found it drained. Host data stays in the socket until the
    /// connection's turn comes with RX buffers in hand, and is read straight into them.
    pub(super) host_readable: bool,
    host_eof: bool,
    guest_done_sending: bool,
    /// The events the muxer's epoll waits for on `stream`, if it is registered.
    pub(super) registered: Option<EventSet>,
    /// Whether the muxer's RX queue holds this connection's key.
    pub(super) in_rxq: bool,
    /// When the state the connection waits in (Connecting, Draining) has lasted too long.
    deadline: Option<Instant>,
}

impl Conn {
    /// A connection the host opened (REQUEST sent), or the guest asked for.
    pub(super) fn new(stream: UnixStream, state: State) -> Conn {
        let deadline = (state == State::Connecting).then(|| Instant::now() + CONNECT_TIMEOUT);
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: Vec::new(),
            host_readable: false,
            host_eof: false,
            guest_done_sending: false,
            registered: None,
            in_rxq: false,
            deadline,
        }
    }

    /// When the connection's wait (for the guest's RESPONSE, for the host to take the last
    /// bytes) times out, if it waits for something that can.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// What to do once `now` is past the connection's deadline: nothing before it.
    pub(super) fn on_timer(&self, now: Instant) -> Option<Outcome> {
        if self.deadline? > now {
            return None;
        }
        Some(match self.state {
            State::Connecting => Outcome::reset(format!(
                "the guest did not answer the connection request within {} s",
                CONNECT_TIMEOUT.as_secs()
            )),
            State::Draining => Outcome {
                action: Action::Remove,
                why: Some(
                    format!(
                        "the host peer did not take the guest's last {} bytes within {} s: dropped",
                        self.tx_buf.len(),
                        DRAIN_TIMEOUT.as_secs()
                    )
                    .into(),
                ),
            },
            State::Established => return None,
        })
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

    /// The events epoll (level-triggered) should wait for: IN only while a read could go
    /// somewhere (established, the guest has room) and we do not know yet that the socket has
    /// something; once it has, the connection waits in the RX queue instead, and epoll waits
    /// again for IN when a read finds the socket drained, or when the guest's credit returns.
    pub(super) fn wanted_events(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == State::Established
            && !self.host_eof
            && !self.host_readable
            && self.peer_credit() > 0
        {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Whether the host socket may have something for the guest, and the guest has room for
    /// data now: such a connection waits in the muxer's RX queue for its turn.
    pub(super) fn rx_ready(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// Epoll said the host socket has something to read (or hung up, or failed): the next
    /// read, on the connection's turn in the RX queue, finds out what.
    pub(super) fn on_host_readable(&mut self) {
        self.host_readable = true;
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
            self.host_readable = false;
            self.deadline = Some(Instant::now() + DRAIN_TIMEOUT);
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
                self.deadline = None;
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

    /// On the connection's turn in the RX queue, with the guest's RX buffers `bufs` in hand
    /// (all guest memory, room for a header first): reads what the host wrote straight into
    /// the buffers after the header, within the guest's credit and at most one packet's worth.
    /// A read that fills all the room leaves the connection readable (more may wait: it
    /// queues again behind the others); a shorter one, or none, sends epoll back to waiting.
    /// At the host's end of file, the guest hears that no more comes, after all the data
    /// before it; a failed read resets the connection.
    pub(super) fn recv(&mut self, mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)]) -> Recv {
        if !self.rx_ready() {
            return Recv::Nothing(Action::None.into());
        }
        let max = (self.peer_credit() as usize).min(MAX_RX_PAYLOAD);
        let payload = rx_payload_bufs(bufs, max);
        let room: usize = payload.iter().map(|b| b.1).sum();
        if room == 0 {
            // Buffers with room for a header only: an empty data packet, as it always was
            // (it tells the guest our fwd_cnt too); the data waits for the next buffers.
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return Recv::Data(0);
        }
        match read_scattered(mem, &payload, &mut self.stream) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                Recv::Nothing(
                    Action::Send {
                        op: OP_SHUTDOWN,
                        flags: SHUTDOWN_SEND,
                        fwd_cnt: self.fwd_cnt,
                    }
                    .into(),
                )
            }
            Ok(n) => {
                self.host_readable = n == room;
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                // The packet's header tells the guest our fwd_cnt.
                self.last_fwd_cnt_sent = self.fwd_cnt;
                Recv::Data(n)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.host_readable = false;
                Recv::Nothing(Action::None.into())
            }
            Err(e) => Recv::Nothing(Outcome::reset(format!(
                "reading the host socket: {e}: reset"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

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

    /// The host's data goes straight into the guest's buffers after the header, within its
    /// credit and the buffers' room; the host's end of file becomes a SHUTDOWN once the data
    /// before it went out.
    #[test]
    fn host_data_within_credit_then_shutdown() {
        use vm_memory::Bytes;

        use crate::devices::virtio::vsock::packet::HDR_LEN;

        let (mut c, mut host) = established();
        c.peer_buf_alloc = 10;
        let data: Vec<u8> = (0..100).collect();
        host.write_all(&data).unwrap();
        drop(host);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let small = [(GuestAddress(0x1000), HDR_LEN + 4)];
        let big = [(GuestAddress(0x2000), HDR_LEN + 1000)];
        let payload = |at: usize, n: usize| {
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress((at + HDR_LEN) as u64))
                .unwrap();
            b
        };
        assert!(
            !c.rx_ready(),
            "nothing is known to wait before epoll says so"
        );
        assert!(c.wanted_events().contains(EventSet::IN));
        c.on_host_readable();
        assert!(c.rx_ready());
        assert!(!c.wanted_events().contains(EventSet::IN));
        assert_eq!(c.recv(&mem, &small), Recv::Data(4));
        assert_eq!(payload(0x1000, 4), data[..4]);
        assert!(c.rx_ready(), "it filled the buffer: more may wait");
        assert_eq!(c.recv(&mem, &big), Recv::Data(6));
        assert_eq!(payload(0x2000, 6), data[4..10]);
        assert!(!c.rx_ready());
        assert_eq!(c.peer_credit(), 0);
        assert!(
            !c.wanted_events().contains(EventSet::IN),
            "it waits for credit, not for epoll"
        );
        // The guest read it all.
        let mut u = hdr(OP_CREDIT_UPDATE, 1234, 5000, 0);
        (u.buf_alloc, u.fwd_cnt) = (1000, 10);
        assert_eq!(c.on_guest_packet(5000, &u, &[]), Action::None.into());
        assert!(c.rx_ready());
        assert_eq!(c.recv(&mem, &big), Recv::Data(90));
        assert_eq!(payload(0x2000, 90), data[10..]);
        // A short read: epoll watches again, and reports the end of file.
        assert!(!c.rx_ready());
        assert!(c.wanted_events().contains(EventSet::IN));
        c.on_host_readable();
        let shutdown = Action::Send {
            op: OP_SHUTDOWN,
            flags: SHUTDOWN_SEND,
            fwd_cnt: 0,
        };
        assert_eq!(c.recv(&mem, &big), Recv::Nothing(shutdown.into()));
        assert!(!c.rx_ready());
        assert!(c.wanted_events().is_empty());
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

    #[test]
    fn waits_time_out_and_an_answer_ends_the_wait() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Connecting);
        let d = c
            .deadline()
            .expect("a connection request waits for the guest");
        assert!(c.on_timer(d - Duration::from_millis(1)).is_none());
        let out = c.on_timer(d).expect("timed out");
        assert_eq!(out.action, Action::Reset);
        assert!(out
            .why
            .unwrap()
            .contains("did not answer the connection request"));
        // The guest answers in time: no deadline any more.
        c.on_guest_packet(1 << 30, &hdr(OP_RESPONSE, 1024, 1 << 30, 0), &[]);
        assert_eq!(c.state, State::Established);
        assert!(c.deadline().is_none());
        assert!(c.on_timer(d + Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn a_drain_the_host_never_takes_is_dropped_after_its_timeout() {
        let (mut c, host) = established();
        // The host does not read: fill its socket buffer, then the guest closes.
        let chunk = vec![7u8; MAX_PKT];
        let mut rw = hdr(OP_RW, 1234, 5000, MAX_PKT as u32);
        rw.buf_alloc = BUF_ALLOC;
        while c.tx_buf.is_empty() {
            let out = c.on_guest_packet(5000, &rw, &chunk[..]);
            assert_ne!(out.action, Action::Reset);
        }
        let mut sd = hdr(OP_SHUTDOWN, 1234, 5000, 0);
        sd.flags = 3;
        c.on_guest_packet(5000, &sd, &[]);
        assert_eq!(c.state, State::Draining);
        let d = c.deadline().expect("a drain waits for the host");
        assert!(c.on_timer(d - Duration::from_millis(1)).is_none());
        let out = c.on_timer(d).expect("timed out");
        assert_eq!(out.action, Action::Remove);
        assert!(out.why.unwrap().contains("did not take the guest's last"));
        drop(host);
    }
}
