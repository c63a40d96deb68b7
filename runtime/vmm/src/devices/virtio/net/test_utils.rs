//! What the net tests share: a guest driving the device through real rings in fake guest
//! memory, frames to send, and the host side of a real tap (a tap in a network namespace of
//! the test's own thread, reached through an AF_PACKET socket bound to it).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Net, NetBackend, VnetHdr, VNET_HDR_LEN};
use crate::devices::virtio::{testing::DriverQueue, IrqLine, VirtioDevice};

/// The EtherType of the tests' plain frames (IEEE local experimental): anything else a
/// tap picks up (IPv6 neighbour discovery) is not the test's.
pub const TEST_ETHERTYPE: u16 = 0x88b5;
pub const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MEM: u64 = 8 << 20;
/// Guest buffers: TX frames from here, RX buffers from [`RX_BUFS`].
const TX_BUFS: u64 = 1 << 20;
const RX_BUFS: u64 = 4 << 20;

/// An Ethernet frame of `len` bytes (header included) to the guest's MAC, with
/// [`TEST_ETHERTYPE`] and `seq` in its first payload bytes, then a pattern.
pub fn test_frame(seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 18);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend((f.len()..len).map(|i| (i % 251) as u8));
    f
}

/// The sequence number of a test frame, or None for any other frame.
pub fn seq_of(frame: &[u8]) -> Option<u32> {
    (frame.len() >= 18 && frame[12..14] == TEST_ETHERTYPE.to_be_bytes())
        .then(|| u32::from_be_bytes(frame[14..18].try_into().expect("4 bytes")))
}

/// A guest with the device activated on two rings (RX at 0x10000, TX at 0x20000).
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub rxq: DriverQueue,
    pub txq: DriverQueue,
    pub net: Net,
    pub irq: Arc<IrqLine>,
    next_tx: u64,
    next_rx: u64,
}

impl Guest {
    /// The device over `backend` with MTU `mtu`, activated with `acked` features.
    pub fn new(backend: Box<dyn NetBackend>, mtu: u16, acked: u64) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let mut net = Net::new("net0", backend, GUEST_MAC, mtu).unwrap();
        let (rxq, txq) = (DriverQueue::new(0x10000, 64), DriverQueue::new(0x20000, 64));
        let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert_eq!(acked & !net.features(), 0, "acked what was not offered");
        net.ack_features(acked);
        net.activate(
            mem.clone(),
            vec![rxq.device_queue(&mem), txq.device_queue(&mem)],
            irq.clone(),
        );
        Guest {
            mem,
            rxq,
            txq,
            net,
            irq,
            next_tx: TX_BUFS,
            next_rx: RX_BUFS,
        }
    }

    /// Room in guest memory for `len` bytes of TX data.
    fn tx_room(&mut self, len: usize) -> u64 {
        if self.next_tx + len as u64 > RX_BUFS {
            self.next_tx = TX_BUFS;
        }
        let a = self.next_tx;
        self.next_tx += (len as u64 + 0xfff) & !0xfff;
        a
    }

    /// Puts `hdr` + `frame` on the TX ring in `pieces` descriptors (split evenly), without
    /// notifying; returns the chain's head.
    pub fn queue_tx(&mut self, hdr: VnetHdr, frame: &[u8], pieces: usize) -> u16 {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        let addr = self.tx_room(bytes.len());
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let step = bytes.len().div_ceil(pieces);
        let bufs: Vec<_> = (0..bytes.len())
            .step_by(step)
            .map(|o| (addr + o as u64, step.min(bytes.len() - o) as u32, false))
            .collect();
        self.txq.add_chain(&self.mem, &bufs)
    }

    /// Sends `frame` with a plain header, in two descriptors, and notifies.
    pub fn send(&mut self, frame: &[u8]) -> u16 {
        let head = self.queue_tx(VnetHdr::default(), frame, 2);
        self.net.queue_notify(1);
        head
    }

    /// Makes `n` receive chains of `len` bytes available (each one descriptor), without
    /// notifying.
    pub fn add_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let a = self.next_rx;
            self.next_rx += (u64::from(len) + 0xfff) & !0xfff;
            if self.next_rx > MEM {
                self.next_rx = RX_BUFS;
            }
            // Garbage where num_buffers goes: the device must write it.
            self.mem
                .write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(a))
                .unwrap();
            self.rxq.add_chain(&self.mem, &[(a, len, true)]);
        }
    }

    /// The frames the device put on the RX ring since the last call, each as its header and
    /// its bytes (a frame over several chains joined).
    pub fn received(&mut self) -> Vec<(VnetHdr, Vec<u8>)> {
        let used = self.rxq.take_used(&self.mem);
        let mut out = Vec::new();
        let mut it = used.into_iter();
        while let Some((head, len)) = it.next() {
            let mut bytes = self.rxq.read_chain(&self.mem, head, len);
            assert!(bytes.len() >= VNET_HDR_LEN, "a used chain of {len} bytes");
            let hdr = VnetHdr::parse(bytes[..VNET_HDR_LEN].try_into().unwrap());
            for _ in 1..hdr.num_buffers {
                let (h, l) = it
                    .next()
                    .expect("num_buffers counts chains that are not used");
                bytes.extend(self.rxq.read_chain(&self.mem, h, l));
            }
            out.push((hdr, bytes.split_off(VNET_HDR_LEN)));
        }
        out
    }

    /// Waits up to `timeout` for the device's backend fd (what the I/O thread polls) to be
    /// readable, and has the device handle it as the I/O thread does; false if it was not.
    pub fn serve_backend(&mut self, timeout: Duration) -> bool {
        if !readable(self.net.backend_fd().unwrap(), timeout) {
            return false;
        }
        self.net.process_backend();
        true
    }
}

/// Whether `fd` becomes readable within `timeout`.
pub fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, which lives across the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) == 1 }
}

/// Fails the test, saying why, unless it runs as root with /dev/net/tun: the real-tap tests
/// need both and must not pass by skipping.
pub fn require_root_and_tun() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces and taps): run the tests as root"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (modprobe tun)"
    );
}

/// Moves the calling thread (the test's own) into a fresh network namespace with IPv6 off,
/// so its taps are private and quiet.
pub fn enter_fresh_netns() {
    require_root_and_tun();
    // SAFETY: unshare takes flags only; CLONE_NEWNET changes the namespace of this thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        io::Error::last_os_error()
    );
    for f in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_int) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

/// Creates the tap `name` in this thread's namespace with `flags` and brings it up;
/// returns its fd (the tap lives as long as the fd, or on if `persist`).
pub fn create_tap(name: &str, flags: libc::c_int, persist: bool) -> OwnedFd {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes one ifreq-sized struct, which `req` is.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    if persist {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(rc, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
    }
    link_up(name);
    OwnedFd::from(f)
}

fn link_up(name: &str) {
    // SAFETY: creates a socket; the result is checked and owned right away.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0);
    // SAFETY: `s` is a new fd nobody else owns.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = ifreq(name, 0);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq, which `req` is.
    unsafe {
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req), 0);
        req.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            0,
            "bringing {name} up: {}",
            io::Error::last_os_error()
        );
    }
}

/// An AF_PACKET socket bound to an interface: the host side of a tap. Frames it sends go
/// out of the interface, into the tap's fd (the device's RX); frames the device writes to
/// the tap come in here.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Bound to `ifname`; with `vnet_hdr` every frame sent and received carries a 10-byte
    /// virtio_net_hdr (PACKET_VNET_HDR), so segmentation offload can be asked for.
    pub fn bind(ifname: &str, vnet_hdr: bool) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: creates a socket; the result is checked and owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::c_int::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated string that lives across the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        if vnet_hdr {
            let one: libc::c_int = 1;
            // SAFETY: PACKET_VNET_HDR reads one int from the pointer given with its size.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: binds to a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "binding to {ifname}: {}", io::Error::last_os_error());
        PacketSocket { fd, ifindex }
    }

    /// Sends `frame` (with its virtio_net_hdr in front, for a vnet_hdr socket) out of the
    /// interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        // SAFETY: sends `frame`'s bytes to a sockaddr_ll of the size given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// The next test frame that comes in within `timeout` (frames of other EtherTypes, and
    /// the socket's own outgoing ones, are skipped).
    pub fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv(timeout, |f| seq_of(f).is_some())
    }

    /// The next incoming frame within `timeout` that `want` takes.
    pub fn recv(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !readable(self.fd.as_raw_fd(), left) {
                return None;
            }
            let mut buf = vec![0u8; 70000];
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: receives into `buf` (its length given) and `sll` (its size given).
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n < 0 {
                continue;
            }
            buf.truncate(n as usize);
            if sll.sll_pkttype != libc::PACKET_OUTGOING && want(&buf) {
                return Some(buf);
            }
        }
    }
}
