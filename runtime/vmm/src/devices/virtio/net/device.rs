//! The virtio device: config space, feature negotiation and the offloads it sets on the tap,
//! the receive path (tap to the guest's chains) and the transmit path (the guest's chains to
//! the tap), and the epoll set over the tap that the I/O thread waits on.

use std::{io, os::fd::RawFd, sync::Arc};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{
    backend::NetBackend,
    frame::{rx_chain, tx_chain, write_at, IoVecs, TxRules, ETH_OVERHEAD, VNET_HDR_LEN},
    NetError, F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_ECN,
    F_HOST_TSO4, F_HOST_TSO6, F_MAC, F_MRG_RXBUF, F_MTU, F_STATUS, MAX_GSO_FRAME,
};
use crate::devices::{
    ratelimit::LogLimiter,
    virtio::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1},
};

const VIRTIO_ID_NET: u32 = 1;
const RX: usize = 0;
const TX: usize = 1;
/// RX, TX (no control queue).
const QUEUE_SIZES: &[u16] = &[256, 256];
/// The epoll token of the tap in the device's own set.
const TAP_TOKEN: u64 = 0;
/// The config space's link status: up.
const LINK_UP: u16 = 1;
/// With this many iovecs collected for one frame, no more receive chains are added (a
/// readv takes at most 1024, and one buffer may take two when it spans memory regions).
const MAX_RX_BUFS: usize = 480;

/// What the device counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames longer than every buffer the guest had (cut by the kernel, dropped).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Chains refused or frames the tap refused.
    pub tx_dropped: u64,
    /// Receive chains refused (returned empty).
    pub rx_refused_chains: u64,
}

/// The virtio-net device over a [`NetBackend`].
#[derive(Debug)]
pub struct Net {
    id: String,
    mac: [u8; 6],
    mtu: u16,
    backend: Box<dyn NetBackend>,
    /// The guest's acked features.
    acked: u64,
    /// The device's own epoll set (the tap); its fd is the device's backend fd.
    epoll: Epoll,
    /// What the epoll set watches the tap for now.
    interest: EventSet,
    /// The tap reported an error or hang-up (it was deleted): it is no longer watched.
    dead: bool,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    irq: Option<Arc<IrqLine>>,
    /// The guest had no receive buffers: the tap is not watched for input until it notifies.
    rx_wait_buffers: bool,
    /// The tap would block a write: the head of the TX ring waits for room.
    tx_blocked: bool,
    /// Scratch lists, reused for every frame.
    bufs: Vec<(GuestAddress, usize)>,
    chains: Vec<(u16, usize)>,
    iov: IoVecs,
    stats: NetStats,
    rx_warn: LogLimiter,
    tx_warn: LogLimiter,
}

impl Net {
    /// The device `id` with MAC `mac` and MTU `mtu` over `backend`.
    pub fn new(
        id: &str,
        backend: Box<dyn NetBackend>,
        mac: [u8; 6],
        mtu: u16,
    ) -> Result<Net, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                backend.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), TAP_TOKEN),
            )
            .map_err(NetError::Epoll)?;
        Ok(Net {
            id: id.to_string(),
            mac,
            mtu,
            backend,
            acked: 0,
            epoll,
            interest: EventSet::empty(),
            dead: false,
            mem: None,
            queues: Vec::new(),
            irq: None,
            rx_wait_buffers: false,
            tx_blocked: false,
            bufs: Vec::new(),
            chains: Vec::new(),
            iov: IoVecs::default(),
            stats: NetStats::default(),
            rx_warn: LogLimiter::default(),
            tx_warn: LogLimiter::default(),
        })
    }

    /// The device's id ("net0").
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What it counted.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn acked(&self, f: u64) -> bool {
        self.acked & f != 0
    }

    /// The `TUN_F_*` offloads the guest takes on received frames, from its acked features.
    /// Segmentation needs checksum offload (the tap ignores it without).
    pub fn tap_offloads(acked: u64) -> u32 {
        let mut f = 0;
        if acked & F_GUEST_CSUM != 0 {
            f |= libc::TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                f |= libc::TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                f |= libc::TUN_F_TSO6;
            }
            if acked & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 && acked & F_GUEST_ECN != 0 {
                f |= libc::TUN_F_TSO_ECN;
            }
        }
        f
    }

    /// The longest frame (header excluded) the guest may receive.
    fn max_rx_frame(&self) -> usize {
        let tso = Self::tap_offloads(self.acked) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0;
        if tso {
            MAX_GSO_FRAME
        } else {
            usize::from(self.mtu) + ETH_OVERHEAD
        }
    }

    fn tx_rules(&self) -> TxRules {
        let csum = self.acked(F_CSUM);
        let (tso4, tso6) = (
            csum && self.acked(F_HOST_TSO4),
            csum && self.acked(F_HOST_TSO6),
        );
        TxRules {
            max_frame: if tso4 || tso6 {
                MAX_GSO_FRAME
            } else {
                usize::from(self.mtu) + ETH_OVERHEAD
            },
            csum,
            tso4,
            tso6,
            ecn: self.acked(F_HOST_ECN),
        }
    }

    /// Moves the guest's frames to the tap until the ring is empty or the tap is full.
    /// Returns whether chains were used.
    fn process_tx(&mut self) -> bool {
        let (Some(mem), false) = (self.mem.as_ref(), self.tx_blocked || self.dead) else {
            return false;
        };
        let rules = self.tx_rules();
        let fd = self.backend.as_raw_fd();
        let mut used = false;
        loop {
            let Some(q) = self.queues.get_mut(TX) else {
                return used;
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let frame = tx_chain(mem, chain, &rules, &mut self.bufs);
            let result = match frame {
                Err(e) => Err(e.to_string()),
                Ok(_) => match retry_eintr(|| self.iov.writev(fd, mem, &self.bufs)) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The frame stays first in line; the tap's room brings it back.
                        q.go_to_previous_position();
                        self.tx_blocked = true;
                        break;
                    }
                    Err(e) => Err(format!("the tap refused a frame: {e}")),
                },
            };
            match result {
                Ok(n) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += n.saturating_sub(VNET_HDR_LEN) as u64;
                }
                Err(why) => {
                    self.stats.tx_dropped += 1;
                    if let Some(left_out) = self.tx_warn.hit() {
                        tracing::warn!(
                            device = %self.id,
                            left_out,
                            "guest frame dropped: {why}"
                        );
                    }
                }
            }
            let _ = q.add_used(mem, head, 0);
            used = true;
        }
        used
    }

    /// Reads the tap's frames into the guest's receive chains until the tap is empty or the
    /// guest has no room. Returns whether chains were used.
    fn process_rx(&mut self) -> bool {
        let (Some(mem), false) = (self.mem.clone(), self.dead) else {
            return false;
        };
        let mrg = self.acked(F_MRG_RXBUF);
        // With merged buffers a frame may take several chains: enough of them for the
        // longest frame are taken before reading, and the ones it did not need go back.
        let want = VNET_HDR_LEN + self.max_rx_frame();
        let fd = self.backend.as_raw_fd();
        let mut used = false;
        loop {
            let Some(q) = self.queues.get_mut(RX) else {
                return used;
            };
            self.bufs.clear();
            self.chains.clear();
            let mut first = q.next_avail();
            let (mut cap, mut popped, mut ring_dry) = (0usize, 0usize, false);
            while self.chains.is_empty() || (mrg && cap < want && self.bufs.len() < MAX_RX_BUFS) {
                let Some(chain) = q.pop_descriptor_chain(&mem) else {
                    ring_dry = true;
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                match rx_chain(&mem, chain, &mut self.bufs) {
                    Ok(c) => {
                        self.chains.push((head, c));
                        cap += c;
                    }
                    Err(e) => {
                        // Returned empty, with the chains taken before it (they cannot go
                        // back past it): a guest that builds such chains loses buffers.
                        for &(h, _) in &self.chains {
                            let _ = q.add_used(&mem, h, 0);
                        }
                        let _ = q.add_used(&mem, head, 0);
                        self.stats.rx_refused_chains += self.chains.len() as u64 + 1;
                        self.chains.clear();
                        self.bufs.clear();
                        cap = 0;
                        first = q.next_avail();
                        used = true;
                        if let Some(left_out) = self.rx_warn.hit() {
                            tracing::warn!(
                                device = %self.id,
                                left_out,
                                "guest receive buffers refused: {e}"
                            );
                        }
                    }
                }
            }
            let whole_ring = popped >= usize::from(q.size());
            if self.chains.is_empty() || (mrg && cap < want && ring_dry && !whole_ring) {
                // Not enough room for the longest frame: wait for the guest's buffers.
                q.set_next_avail(first);
                self.rx_wait_buffers = true;
                break;
            }
            let n = match retry_eintr(|| self.iov.readv(fd, &mem, &self.bufs)) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        q.set_next_avail(first);
                    } else {
                        // Buffers the kernel would not take: returned empty, so that the
                        // device moves on instead of trying them again.
                        for &(h, _) in &self.chains {
                            let _ = q.add_used(&mem, h, 0);
                        }
                        used = true;
                        if let Some(left_out) = self.rx_warn.hit() {
                            tracing::warn!(
                                device = %self.id,
                                left_out,
                                "reading a frame from the tap: {e}"
                            );
                        }
                    }
                    break;
                }
            };
            if n > cap || n < VNET_HDR_LEN {
                // Cut to fit by the kernel (the guest's buffers are smaller than the frame):
                // the frame is lost, the buffers go back for the next one.
                q.set_next_avail(first);
                self.stats.rx_dropped += 1;
                if let Some(left_out) = self.rx_warn.hit() {
                    tracing::warn!(
                        device = %self.id,
                        left_out,
                        "a {n}-byte frame from the tap did not fit the guest's {cap} bytes of buffers: dropped"
                    );
                }
                continue;
            }
            // num_buffers: how many chains the frame took, in the first chain's header.
            let mut left = n;
            let mut taken = 0u16;
            for &(_, c) in &self.chains {
                taken += 1;
                left = left.saturating_sub(c);
                if left == 0 {
                    break;
                }
            }
            write_at(&mem, &self.bufs, 10, &taken.to_le_bytes());
            let mut left = n;
            for &(h, c) in &self.chains[..usize::from(taken)] {
                let len = left.min(c);
                let _ = q.add_used(&mem, h, len as u32);
                left -= len;
            }
            q.set_next_avail(first.wrapping_add(taken));
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (n - VNET_HDR_LEN) as u64;
            used = true;
        }
        used
    }

    /// Watches the tap for what the device waits for now: input while the guest has
    /// buffers, room while a write is blocked.
    fn update_interest(&mut self) {
        if self.dead {
            return;
        }
        let active = self.mem.is_some();
        let mut want = EventSet::empty();
        if active && !self.rx_wait_buffers {
            want |= EventSet::IN;
        }
        if active && self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want != self.interest {
            let ev = EpollEvent::new(want, TAP_TOKEN);
            match self
                .epoll
                .ctl(ControlOperation::Modify, self.backend.as_raw_fd(), ev)
            {
                Ok(()) => self.interest = want,
                Err(e) => tracing::error!(device = %self.id, "watching the tap: {e}"),
            }
        }
    }

    fn signal(&mut self, used: bool) {
        if !used {
            return;
        }
        let (Some(mem), Some(irq)) = (self.mem.as_ref(), self.irq.as_ref()) else {
            return;
        };
        let notify = self
            .queues
            .iter_mut()
            .any(|q| q.needs_notification(mem).unwrap_or(true));
        if notify {
            irq.signal_used();
        }
    }

    /// Both paths, then the tap's interest and the interrupt.
    fn process(&mut self) {
        let used = self.process_tx() | self.process_rx();
        self.update_interest();
        self.signal(used);
    }
}

/// Runs `f` again while it is interrupted by a signal.
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn io_counters(&self) -> Option<crate::devices::virtio::IoCounters> {
        Some(crate::devices::virtio::IoCounters {
            to_guest: self.stats.rx_bytes,
            from_guest: self.stats.tx_bytes,
        })
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | F_MAC
            | F_MTU
            | F_STATUS
            | F_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_MRG_RXBUF
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|a| cfg.get(a)).copied().unwrap_or(0);
        }
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>) {
        let offloads = Self::tap_offloads(self.acked);
        if let Err(e) = self.backend.set_offload(offloads) {
            // The tap keeps none: every frame reaches the guest whole and checksummed,
            // which a guest that acked offloads takes as well.
            tracing::warn!(device = %self.id, "setting the tap's offloads to {offloads:#x}: {e}");
        }
        self.mem = Some(mem);
        self.queues = queues;
        self.irq = Some(irq);
        self.rx_wait_buffers = false;
        self.tx_blocked = false;
        self.process();
    }

    fn queue_notify(&mut self, index: u16) {
        match usize::from(index) {
            RX => {
                self.rx_wait_buffers = false;
                let used = self.process_rx();
                self.update_interest();
                self.signal(used);
            }
            TX => {
                let used = self.process_tx();
                self.update_interest();
                self.signal(used);
            }
            _ => {}
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        let mut evs = [EpollEvent::default(); 1];
        let n = match self.epoll.wait(0, &mut evs) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 1 {
            let ev = evs[0].event_set();
            if ev.intersects(EventSet::ERROR | EventSet::HANG_UP) && !self.dead {
                // The tap is gone (deleted under us): stop watching it, or the I/O thread
                // would be woken for it forever. The guest's link stays up with no traffic.
                tracing::error!(device = %self.id, "the tap reported an error or hang-up; the device stops");
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    self.backend.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.dead = true;
                return;
            }
            if ev.contains(EventSet::OUT) {
                self.tx_blocked = false;
            }
        }
        self.process();
    }

    fn reset(&mut self) {
        let _ = self.backend.set_offload(0);
        self.acked = 0;
        self.mem = None;
        self.queues.clear();
        self.irq = None;
        self.rx_wait_buffers = false;
        self.tx_blocked = false;
        self.update_interest();
    }
}
