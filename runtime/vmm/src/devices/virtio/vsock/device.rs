//! The virtio device: its configuration and queues, taking the guest's packets off the TX
//! ring, filling the guest's RX buffers with what the muxer has for it, and interrupts.

use std::{os::fd::RawFd, path::Path, sync::Arc};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    muxer::Muxer,
    packet::{read_tx_chain, rx_buffers, Header},
    VsockError,
};
use crate::devices::virtio::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_ID_VSOCK: u32 = 19;
/// RX, TX, event.
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
/// The event queue's index.
const EVENT_QUEUE: u16 = 2;
/// The one event of the event queue (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET): every connection
/// is gone.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    irq: Option<Arc<IrqLine>>,
    counters: crate::devices::virtio::IoCounters,
    /// The guest was sent the transport reset event and has not handled it yet: nothing
    /// goes to it meanwhile. A host connection's request that reached the guest first
    /// would be accepted, then closed by the reset (without a word to the host), and the
    /// host would wait on it for nothing: a VM restored from a template, whose host
    /// connects at once, did so. The guest's driver notifies the event queue once it has
    /// handled the event and given the buffer back.
    reset_unseen: bool,
}

/// What a snapshot keeps of the device (its connections are gone by then).
#[derive(Debug, Default, Serialize, Deserialize)]
struct VsockState {
    reset_unseen: bool,
}

impl Vsock {
    /// Listens on `uds` for the host side.
    pub fn new(cid: u64, uds: &Path) -> Result<Vsock, VsockError> {
        Ok(Vsock {
            muxer: Muxer::new(cid, uds)?,
            mem: None,
            queues: Vec::new(),
            irq: None,
            counters: Default::default(),
            reset_unseen: false,
        })
    }

    /// The path of its socket inside the VMM's jail: guest connections to host port P go to
    /// `<path>_P` there.
    pub fn host_ports_at(&mut self, path: std::path::PathBuf) {
        self.muxer.host_ports_at(path);
    }

    /// Handles one packet from the guest.
    pub fn handle_guest_packet(&mut self, h: Header, payload: &[u8]) {
        self.muxer.handle_guest_packet(h, payload);
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
            // The payload is read from the chain's buffers while the packet is handled:
            // the chain goes back to the guest only after that.
            if let Some((h, payload)) = read_tx_chain(&mem, chain.take(QUEUE_SIZES[1] as usize)) {
                self.counters.from_guest += payload.len() as u64;
                self.muxer.handle_guest_packet(h, payload);
            }
            if let Some(q) = self.queues.get_mut(1) {
                let _ = q.add_used(&mem, head, 0);
            }
            used = true;
        }
        used
    }

    /// Fills the guest's RX buffers with control packets and host data.
    fn process_rx(&mut self) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(q) = self.queues.get_mut(0) else {
                return used;
            };
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            // Buffers that are not all guest memory, or too small for a header, go back
            // unused, and the packet waits for the next buffers.
            let written = match rx_buffers(&mem, chain.take(QUEUE_SIZES[0] as usize)) {
                Some(bufs) => match self.muxer.write_rx(&mem, &bufs) {
                    0 => {
                        // Nothing for them after all (a host socket that seemed to have data
                        // was drained): the guest keeps these buffers for the next packet.
                        q.go_to_previous_position();
                        break;
                    }
                    n => n,
                },
                None => 0,
            };
            let _ = q.add_used(&mem, head, written as u32);
            self.counters.to_guest += written as u64;
            used = true;
        }
        used
    }

    /// Tells the guest that every connection it had is gone, after dropping the host's side
    /// of them: the transport reset event, in a buffer the guest offered on the event queue.
    /// Its driver then closes its sockets (listening ones stay) and reads its CID again. A VM
    /// restored from a template needs it: its connections belonged to another VMM's
    /// process. Returns whether the guest got the event (false if it offered no buffer, or
    /// not a writable one of 4 bytes or more, which goes back to it empty).
    pub fn transport_reset(&mut self) -> bool {
        self.muxer.reset_all();
        let (Some(mem), Some(q)) = (
            self.mem.clone(),
            self.queues.get_mut(usize::from(EVENT_QUEUE)),
        ) else {
            return false;
        };
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            return false;
        };
        let head = chain.head_index();
        let told = chain
            .writable()
            .next()
            .filter(|d| d.len() >= 4)
            .is_some_and(|d| {
                mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok()
            });
        let _ = q.add_used(&mem, head, if told { 4 } else { 0 });
        if let Some(irq) = &self.irq {
            irq.signal_used();
        }
        self.reset_unseen = told;
        told
    }

    /// One pass over everything: guest packets, host sockets, guest RX buffers.
    pub fn process(&mut self) {
        let mut used = self.process_tx();
        self.muxer.handle_host_events();
        if !self.reset_unseen {
            used |= self.process_rx();
        }
        self.muxer.update_interests();
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

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn io_counters(&self) -> Option<crate::devices::virtio::IoCounters> {
        Some(self.counters)
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.muxer.cid().to_le_bytes();
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

    fn queue_notify(&mut self, index: u16) {
        if index == EVENT_QUEUE {
            self.reset_unseen = false;
        }
        self.process();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self) {
        self.process();
    }

    /// The guest's connections belong to this VMM's process: a VM restored from the
    /// snapshot starts with none, and the guest is told so (the event reaches it on restore).
    fn before_snapshot(&mut self) {
        self.transport_reset();
    }

    fn saved_state(&self) -> serde_json::Value {
        serde_json::to_value(VsockState {
            reset_unseen: self.reset_unseen,
        })
        .expect("the vsock state serializes")
    }

    /// A template saved before these states were kept has none: nothing held.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s = match state {
            serde_json::Value::Null => VsockState::default(),
            v => VsockState::deserialize(v).map_err(|e| format!("vsock: {e}"))?,
        };
        self.reset_unseen = s.reset_unseen;
        Ok(())
    }

    fn reset(&mut self) {
        self.reset_unseen = false;
        self.muxer.reset_all();
        self.mem = None;
        self.queues.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read, Write},
        os::unix::net::{UnixListener, UnixStream},
        time::{Duration, Instant},
    };

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::{epoll::EventSet, eventfd::EventFd};

    use super::*;
    use crate::devices::virtio::{
        testing::{Buf, DriverQueue, F_INDIRECT},
        vsock::{
            packet::{
                HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
                OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND,
            },
            test_utils::hdr,
        },
    };

    const GUEST_MEM: u64 = 8 << 20;
    /// Where [`Guest`] puts its packet buffers.
    const BUFS: u64 = 1 << 20;

    /// A guest driving the device through real virtqueues in fake guest memory.
    struct Guest {
        mem: GuestMemoryMmap,
        rx: DriverQueue,
        tx: DriverQueue,
        ev: DriverQueue,
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
                ev,
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

    /// The transport reset event (for a VM restored from a template): the guest's event
    /// buffer gets it, and the host's ends of the old connections are closed.
    #[test]
    fn a_transport_reset_tells_the_guest_and_closes_the_host_ends() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        let buf = g.alloc(8);
        g.mem.write_obj(0xffff_ffffu32, GuestAddress(buf)).unwrap();
        let head = g.ev.add_chain(&g.mem, &[(buf, 8, true)]);
        assert!(v.transport_reset());
        assert_eq!(g.ev.take_used(&g.mem), [(head, 4)]);
        assert_eq!(
            g.mem.read_obj::<u32>(GuestAddress(buf)).unwrap(),
            EVENT_TRANSPORT_RESET
        );
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "the host's end is closed");
        // No event buffer left, and a read-only one: the guest cannot be told.
        assert!(!v.transport_reset());
        let head = g.ev.add_chain(&g.mem, &[(buf, 8, false)]);
        assert!(!v.transport_reset());
        assert_eq!(g.ev.take_used(&g.mem), [(head, 0)]);
    }

    /// A host connection made after a transport reset reaches the guest only once the guest
    /// has handled the event (it gives the buffer back and notifies the event queue): had
    /// its request come first, the guest's reset would close the connection it had just
    /// accepted. The same on a device restored from the state saved after the reset (a
    /// template's clone, whose host connects at once), and nothing is held on one whose
    /// guest could not be told.
    #[test]
    fn host_connections_wait_until_the_guest_has_handled_a_transport_reset() {
        let (dir, mut v, _l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let buf = g.alloc(8);
        g.ev.add_chain(&g.mem, &[(buf, 8, true)]);
        assert!(v.transport_reset());
        let saved = v.saved_state();
        // A device that could not tell its guest holds nothing.
        let mut untold = Vsock::new(3, &dir.path().join("untold.sock")).unwrap();
        let mut ug = Guest::start(&mut untold);
        assert!(!untold.transport_reset());
        let mut restored = Vsock::new(3, &dir.path().join("clone.sock")).unwrap();
        restored.restore_state(&saved).unwrap();
        let mut rg = Guest::start(&mut restored);
        for (v, g, uds, held) in [
            (&mut v, &mut g, dir.path().join("v.sock"), true),
            (&mut restored, &mut rg, dir.path().join("clone.sock"), true),
            (&mut untold, &mut ug, dir.path().join("untold.sock"), false),
        ] {
            g.offer_rx(&[4096]);
            let mut s = UnixStream::connect(&uds).unwrap();
            s.write_all(b"CONNECT 1024\n").unwrap();
            let within = Duration::from_millis(if held { 300 } else { 5000 });
            let early = g.poll_until(v, None, within, |got| !got.is_empty());
            if held {
                assert!(
                    early.is_empty(),
                    "{uds:?}: the guest got {early:?} before handling the reset"
                );
                // The guest handled the event: the buffer back, the queue notified.
                g.ev.add_chain(&g.mem, &[(buf, 8, true)]);
                v.queue_notify(EVENT_QUEUE);
            }
            let got = match held {
                true => g.poll_until(v, None, Duration::from_secs(5), |got| !got.is_empty()),
                false => early,
            };
            assert_eq!(got.len(), 1, "{uds:?}: {got:?}");
            assert_eq!(
                (got[0].0.op, got[0].0.dst_port),
                (OP_REQUEST, 1024),
                "{uds:?}"
            );
        }
        // A template saved before the device kept a state restores with nothing held.
        let mut old = Vsock::new(3, &dir.path().join("old.sock")).unwrap();
        old.restore_state(&serde_json::Value::Null).unwrap();
        assert!(!old.reset_unseen);
        assert!(old
            .restore_state(&serde_json::json!({"reset_unseen": 7}))
            .is_err());
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
        assert!(v.muxer.ctrl.is_empty());
        // The payload the guest sent is counted, as its headers say (the connection's
        // packets carry none).
        assert_eq!(v.io_counters().unwrap().from_guest, want.len() as u64);
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

    /// Connections with data for the guest take turns: each sends one packet, then waits
    /// behind the others, so a busy connection does not hold the others' data back.
    #[test]
    fn connections_with_data_take_turns() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut hosts = Vec::new();
        for port in [1234, 1235, 1236] {
            hosts.push(connect(&mut g, &mut v, &l, port, 5000, 65536));
        }
        for s in &mut hosts {
            s.write_all(&[9u8; 1000]).unwrap();
        }
        // Chains with room for 100 bytes of data each: ten packets per connection.
        for _ in 0..9 {
            g.offer_rx(&[HDR_LEN as u32 + 100]);
        }
        v.process_backend();
        let ports: Vec<u32> = g
            .received()
            .iter()
            .map(|(h, p, _)| {
                assert_eq!((h.op, p.len()), (OP_RW, 100));
                h.dst_port
            })
            .collect();
        assert_eq!(ports.len(), 9);
        let mut round: Vec<u32> = ports[..3].to_vec();
        round.sort_unstable();
        assert_eq!(round, [1234, 1235, 1236], "one packet each first");
        for next in ports.chunks(3) {
            assert_eq!(next, &ports[..3], "then again in the same order");
        }
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

        // The host's data waits for RX buffers while the credit is large; then the guest
        // shrinks it.
        let mut s2 = connect(&mut g, &mut v, &l, 1300, 5000, 4096);
        let key = (5000, 1300);
        s2.write_all(&[7u8; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !v.muxer.conns[&key].in_rxq && Instant::now() < deadline {
            // No RX buffers on offer: the connection waits for its turn, its data unread.
            v.muxer.handle_host_events();
            v.muxer.update_interests();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            v.muxer.conns[&key].in_rxq,
            "the host's data waits for its turn"
        );
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

    /// The payloads of `packets`, all data packets, one after the other.
    fn payloads(packets: &[(Header, Vec<u8>, u32)]) -> Vec<u8> {
        packets
            .iter()
            .flat_map(|(h, p, _)| {
                assert_eq!(h.op, OP_RW);
                p.clone()
            })
            .collect()
    }

    /// Host data larger than an RX buffer fills one buffer after another, in order, in one
    /// pass: a connection whose socket still has data after filling a buffer stays queued.
    /// When the socket turns out drained just as a buffer came, the buffer stays the guest's
    /// for the next data.
    #[test]
    fn host_data_fills_buffer_after_buffer_in_order() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        // Header and payload in buffers of their own, as older Linux guests offer them.
        for _ in 0..10 {
            g.offer_rx(&[HDR_LEN as u32, 1000]);
        }
        v.process_backend();
        let got = g.received();
        assert_eq!(got.len(), 10, "one pass filled every buffer");
        assert!(got.iter().all(|(_, p, _)| p.len() == 1000));
        assert!(payloads(&got) == data);
        // Drained exactly at a buffer's end: it was still queued, a read finds nothing, and
        // the next buffer is not used up empty.
        assert!(v.muxer.conns[&(5000, 1234)].in_rxq);
        g.offer_rx(&[HDR_LEN as u32 + 1000]);
        v.process_backend();
        assert_eq!(g.rx.take_used(&g.mem), [], "an empty buffer went back");
        assert!(!v.muxer.conns[&(5000, 1234)].in_rxq);
        s.write_all(b"tail").unwrap();
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| !p.is_empty());
        assert_eq!(payloads(&got), b"tail");
    }

    /// A connection stops where the guest's credit ends, without reading further, and waits
    /// for its credit update rather than epoll; each update lets exactly the credit through,
    /// and the guest gets every byte once, in order.
    #[test]
    fn host_data_stops_at_the_credit_and_resumes_after_an_update() {
        const ALLOC: u32 = 1500;
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, ALLOC);
        let key = (5000, 1234);
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
        s.write_all(&data).unwrap();
        for _ in 0..8 {
            g.offer_rx(&[HDR_LEN as u32 + 1000]);
        }
        let mut received = Vec::new();
        let mut fwd = 0;
        for want in [vec![1000, 500], vec![1000, 500], vec![1000]] {
            v.process_backend();
            for _ in 0..3 {
                // More passes: nothing beyond the credit comes.
                v.process_backend();
            }
            let got = g.received();
            let sizes: Vec<usize> = got.iter().map(|x| x.1.len()).collect();
            assert_eq!(sizes, want);
            received.extend(payloads(&got));
            let c = &v.muxer.conns[&key];
            if received.len() < data.len() {
                assert_eq!(c.peer_credit(), 0);
                assert!(c.host_readable && !c.in_rxq);
                assert!(
                    !c.wanted_events().contains(EventSet::IN),
                    "without credit it waits for an update, not for epoll"
                );
            }
            g.offer_rx(&vec![HDR_LEN as u32 + 1000; sizes.len()]);
            // The guest's application read everything: it tells the host.
            fwd = received.len() as u32;
            let mut u = hdr(OP_CREDIT_UPDATE, 1234, 5000, 0);
            (u.buf_alloc, u.fwd_cnt) = (ALLOC, fwd);
            g.packet(&mut v, u, &[]);
        }
        assert_eq!(fwd as usize, data.len());
        assert!(received == data);
    }

    /// The host writes and closes: the guest gets all the data, then a SHUTDOWN, and
    /// nothing after it. A host socket that fails instead resets the connection.
    #[test]
    fn host_end_of_file_comes_after_all_its_data() {
        let (_dir, mut v, l) = device_with_listener(5000);
        let mut g = Guest::start(&mut v);
        let mut s = connect(&mut g, &mut v, &l, 1234, 5000, 65536);
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 241) as u8).collect();
        s.write_all(&data).unwrap();
        drop(s);
        for _ in 0..6 {
            g.offer_rx(&[HDR_LEN as u32 + 1000]);
        }
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| {
            p.iter().any(|x| x.0.op == OP_SHUTDOWN)
        });
        let (last, rest) = got.split_last().expect("packets");
        assert_eq!((last.0.op, last.0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(payloads(rest) == data);
        let more = g.poll_until(&mut v, None, Duration::from_millis(20), |_| false);
        assert!(more.is_empty(), "{more:?}");

        // The host closes with the guest's data unread: reading its socket fails.
        let mut s = connect(&mut g, &mut v, &l, 1300, 5000, 65536);
        g.packet(&mut v, hdr(OP_RW, 1300, 5000, 5), b"hello");
        s.write_all(b"bye").unwrap();
        drop(s);
        g.offer_rx(&[HDR_LEN as u32 + 1000]);
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| {
            p.iter().any(|x| x.0.op == OP_RST)
        });
        assert_eq!(got.last().map(|x| x.0.op), Some(OP_RST));
        assert!(!v.muxer.conns.contains_key(&(5000, 1300)));
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
        assert_eq!(v.muxer.ctrl.pop_front().map(|h| h.op), Some(OP_RST));
        assert!(v.muxer.ctrl.is_empty());
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
        assert_eq!(v.muxer.ctrl.len(), 1);
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
        assert_eq!(v.muxer.ctrl.len(), 1, "the packet still waits");
        g.offer_rx(&[4096]);
        let got = g.poll_until(&mut v, None, Duration::from_secs(5), |p| !p.is_empty());
        assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
        // A good packet still gets through.
        g.packet(&mut v, hdr(OP_RW, 1234, 5000, 4), b"good");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"good");
    }
}
