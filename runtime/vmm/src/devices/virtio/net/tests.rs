//! The device end to end on real rings: over a Unix datagram socket (frames, order, refusals,
//! merged buffers, a backend that would block) and over a real tap in a private network
//! namespace (needs root and /dev/net/tun; fails, not skips, without them).

use std::{os::fd::AsRawFd, time::Duration};

use vm_memory::{Bytes, GuestAddress};

use super::{
    test_utils::{
        create_tap, enter_fresh_netns, readable, seq_of, test_frame, Guest, PacketSocket, GUEST_MAC,
    },
    Net, SocketBackend, Tap, TapError, VnetHdr, F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4,
    F_GUEST_TSO6, F_HOST_TSO4, F_MAC, F_MRG_RXBUF, F_MTU, F_STATUS, GSO_ECN, GSO_TCPV4,
    VNET_HDR_LEN,
};
use crate::devices::virtio::{mmio::MmioTransport, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const SHORT: Duration = Duration::from_millis(200);
const LONG: Duration = Duration::from_secs(5);
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// A guest over a socket pair, and the network's end of it.
fn socket_guest(acked: u64) -> (Guest, std::os::unix::net::UnixDatagram) {
    let (backend, peer) = SocketBackend::pair().unwrap();
    (Guest::new(Box::new(backend), 1500, acked), peer)
}

fn recv_datagram(peer: &std::os::unix::net::UnixDatagram) -> Option<Vec<u8>> {
    if !readable(peer.as_raw_fd(), SHORT) {
        return None;
    }
    let mut b = vec![0u8; 70000];
    let n = peer.recv(&mut b).ok()?;
    b.truncate(n);
    Some(b)
}

fn with_plain_header(frame: &[u8]) -> Vec<u8> {
    let mut b = VnetHdr::default().to_bytes().to_vec();
    b.extend_from_slice(frame);
    b
}

#[test]
fn tx_frames_reach_the_backend_whole_with_their_header() {
    let (mut g, peer) = socket_guest(VIRTIO_F_VERSION_1);
    for (seq, len, pieces) in [(1, 60, 1), (2, 1514, 2), (3, 700, 5)] {
        let frame = test_frame(seq, len);
        let head = g.queue_tx(VnetHdr::default(), &frame, pieces);
        g.net.queue_notify(1);
        assert_eq!(recv_datagram(&peer).unwrap(), with_plain_header(&frame));
        assert_eq!(g.txq.take_used(&g.mem), vec![(head, 0)]);
    }
    assert_eq!(g.irq.evt.read().unwrap(), 3);
    let s = g.net.stats();
    assert_eq!(
        (s.tx_frames, s.tx_bytes, s.tx_dropped),
        (3, 60 + 1514 + 700, 0)
    );
}

#[test]
fn rx_frames_land_in_guest_buffers_after_a_header() {
    let (mut g, peer) = socket_guest(VIRTIO_F_VERSION_1);
    g.add_rx(4, 2048);
    g.net.queue_notify(0);
    let frame = test_frame(7, 1000);
    peer.send(&with_plain_header(&frame)).unwrap();
    assert!(
        g.serve_backend(LONG),
        "the device does not watch the backend"
    );
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.num_buffers, 1, "num_buffers not written");
    assert_eq!(got[0].1, frame);
    assert_eq!(g.net.stats().rx_bytes, 1000);
}

/// No receive buffers: the device stops watching the backend (no busy I/O thread), the
/// frames wait there, and arrive in order once the guest adds buffers and notifies.
#[test]
fn without_buffers_frames_wait_for_the_guest() {
    let (mut g, peer) = socket_guest(VIRTIO_F_VERSION_1);
    for seq in 0..3 {
        peer.send(&with_plain_header(&test_frame(seq, 100)))
            .unwrap();
    }
    assert!(
        !g.serve_backend(SHORT),
        "the backend is watched with no buffers to fill"
    );
    assert!(g.received().is_empty());
    g.add_rx(2, 2048);
    g.net.queue_notify(0);
    g.add_rx(2, 2048);
    g.net.queue_notify(0);
    let seqs: Vec<_> = g
        .received()
        .iter()
        .map(|(_, f)| seq_of(f).unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2]);
    // Buffers left over: the backend is watched again.
    peer.send(&with_plain_header(&test_frame(3, 100))).unwrap();
    assert!(g.serve_backend(LONG));
    assert_eq!(seq_of(&g.received()[0].1), Some(3));
}

/// Merged buffers: a frame longer than one buffer takes several chains (num_buffers says
/// how many), and the chains it did not need take the next frame.
#[test]
fn merged_buffers_carry_a_frame_over_several_chains() {
    let acked = VIRTIO_F_VERSION_1 | F_MRG_RXBUF | F_MTU;
    let (mut g, peer) = socket_guest(acked);
    g.add_rx(4, 1024);
    g.net.queue_notify(0);
    let big = test_frame(1, 1514);
    peer.send(&with_plain_header(&big)).unwrap();
    peer.send(&with_plain_header(&test_frame(2, 60))).unwrap();
    assert!(g.serve_backend(LONG));
    let got = g.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].0.num_buffers, &got[0].1), (2, &big));
    assert_eq!((got[1].0.num_buffers, seq_of(&got[1].1)), (1, Some(2)));
    // One chain is left, too small for the longest frame: the device waits for more.
    peer.send(&with_plain_header(&test_frame(3, 60))).unwrap();
    assert!(!g.serve_backend(SHORT) || g.received().is_empty());
    g.add_rx(1, 1024);
    g.net.queue_notify(0);
    assert_eq!(seq_of(&g.received()[0].1), Some(3));
}

/// Chains a guest must not build are returned unused, with a count, and the device goes on.
#[test]
fn malformed_chains_are_refused() {
    let (mut g, peer) = socket_guest(VIRTIO_F_VERSION_1 | F_CSUM);
    let frame = test_frame(1, 100);
    g.mem
        .write_slice(&with_plain_header(&frame), GuestAddress(0x100000))
        .unwrap();
    let gso = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1000,
        ..VnetHdr::default()
    };
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        // A device-writable buffer in a transmit chain.
        vec![(0x100000, 12, false), (0x100000 + 12, 100, true)],
        // Shorter than a header and an Ethernet header.
        vec![(0x100000, 20, false)],
        // Outside guest memory.
        vec![(0x100000, 12, false), (1 << 40, 100, false)],
        // Longer than MTU + Ethernet and VLAN headers without TSO.
        vec![(0x100000, 12 + 1519, false)],
    ];
    for bufs in &bad {
        g.txq.add_chain(&g.mem, bufs);
    }
    // Segmentation without HOST_TSO4 acked.
    g.queue_tx(gso, &test_frame(2, 3000), 1);
    let good = g.send(&frame);
    let used = g.txq.take_used(&g.mem);
    assert_eq!(used.len(), 6);
    assert_eq!(used[5], (good, 0));
    assert_eq!(recv_datagram(&peer).unwrap(), with_plain_header(&frame));
    assert!(recv_datagram(&peer).is_none(), "a refused frame went out");
    assert_eq!(g.net.stats().tx_dropped, 5);

    // Receive chains: a device-readable buffer, and room for less than a header.
    g.rxq.add_chain(&g.mem, &[(0x400000, 100, false)]);
    g.rxq.add_chain(&g.mem, &[(0x401000, 8, true)]);
    g.add_rx(1, 2048);
    g.net.queue_notify(0);
    let used = g.rxq.take_used(&g.mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0]);
    peer.send(&with_plain_header(&frame)).unwrap();
    assert!(g.serve_backend(LONG));
    assert_eq!(g.received()[0].1, frame);
    assert_eq!(g.net.stats().rx_refused_chains, 2);
}

/// A backend that would block keeps the frame at the head of the ring: nothing is lost or
/// reordered, the vCPU never waits, and the backend's room brings the rest out.
#[test]
fn a_full_backend_keeps_frames_in_order() {
    let (backend, peer) = SocketBackend::pair().unwrap();
    let small: libc::c_int = 4096;
    // SAFETY: SO_SNDBUF reads one int from the pointer given with its size.
    let rc = unsafe {
        libc::setsockopt(
            backend.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let mut g = Guest::new(Box::new(backend), 1500, VIRTIO_F_VERSION_1);
    for seq in 0..40 {
        g.queue_tx(VnetHdr::default(), &test_frame(seq, 1000), 1);
    }
    g.net.queue_notify(1);
    let sent_first = g.txq.take_used(&g.mem).len();
    assert!(
        sent_first < 40,
        "the socket took every frame: nothing was tested"
    );
    let mut seqs = Vec::new();
    while seqs.len() < 40 {
        while let Some(d) = recv_datagram(&peer) {
            seqs.push(seq_of(&d[VNET_HDR_LEN..]).unwrap());
        }
        if seqs.len() < 40 {
            assert!(
                g.serve_backend(LONG),
                "room in the backend did not wake the device"
            );
        }
    }
    assert_eq!(seqs, (0..40).collect::<Vec<_>>());
    assert_eq!(g.net.stats().tx_frames, 40);
}

#[test]
fn config_space_and_features() {
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let net = Net::new("net0", Box::new(backend), GUEST_MAC, 1450).unwrap();
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1450);
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1450);
    let mut past = [0xffu8; 4];
    net.read_config(10, &mut past);
    assert_eq!(past[2..], [0, 0]);
    net.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    let f = net.features();
    for want in [
        VIRTIO_F_VERSION_1,
        F_MAC,
        F_MTU,
        F_STATUS,
        F_CSUM,
        F_MRG_RXBUF,
    ] {
        assert_ne!(f & want, 0);
    }
    assert_eq!(net.device_type(), 1);
}

#[test]
fn tap_offloads_follow_the_guests_features() {
    let t = Net::tap_offloads;
    assert_eq!(t(0), 0);
    assert_eq!(t(F_GUEST_TSO4), 0, "TSO without checksum offload");
    assert_eq!(t(F_GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        t(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    assert_eq!(t(F_GUEST_CSUM | F_GUEST_ECN), libc::TUN_F_CSUM);
}

/// Through the mmio registers: what the driver accepts is what the device sets on the
/// backend at DRIVER_OK, and a reset takes the offloads off again.
#[test]
fn acked_features_reach_the_backend_through_the_transport() {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let offloads = backend.offloads.clone();
    let net = Net::new("net0", Box::new(backend), GUEST_MAC, 1500).unwrap();
    let irq = IrqLine::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(Box::new(net), mem, irq);
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(&mut t, 0x70, 1 | 2);
    w(&mut t, 0x24, 0);
    w(&mut t, 0x20, (F_GUEST_CSUM | F_GUEST_TSO4 | F_MAC) as u32);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 1 | 2 | 8);
    for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
        w(&mut t, 0x30, q);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, base);
        w(&mut t, 0x90, base + 0x1000);
        w(&mut t, 0xa0, base + 0x2000);
        w(&mut t, 0x44, 1);
    }
    w(&mut t, 0x70, 1 | 2 | 8 | 4);
    w(&mut t, 0x70, 0);
    let got = offloads.lock().unwrap().clone();
    assert_eq!(got, [libc::TUN_F_CSUM | libc::TUN_F_TSO4, 0]);
}

/// Real tap: frames both ways between the guest's rings and an AF_PACKET socket on the
/// tap's interface, with the header handled on each side.
#[test]
fn frames_cross_a_real_tap_both_ways() {
    enter_fresh_netns();
    let fd = create_tap("hnet0", TAP_FLAGS, false);
    let sock = PacketSocket::bind("hnet0", false);
    // SAFETY: the fd is ours and handed over.
    let tap = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }.unwrap();
    assert_eq!(tap.name(), "hnet0");
    let mut g = Guest::new(Box::new(tap), 1500, VIRTIO_F_VERSION_1 | F_MAC | F_MTU);

    let out = test_frame(1, 1514);
    g.send(&out);
    assert_eq!(sock.recv_test_frame(LONG).as_deref(), Some(&out[..]));

    g.add_rx(8, 2048);
    g.net.queue_notify(0);
    for seq in 10..13 {
        sock.send(&test_frame(seq, 60 + seq as usize));
    }
    let mut got = Vec::new();
    while got.len() < 3 && g.serve_backend(LONG) {
        got.extend(
            g.received()
                .into_iter()
                .filter(|(_, f)| seq_of(f).is_some()),
        );
    }
    assert_eq!(got.len(), 3);
    for (i, (hdr, frame)) in got.iter().enumerate() {
        assert_eq!(*frame, test_frame(10 + i as u32, 70 + i));
        assert_eq!((hdr.flags, hdr.gso_type, hdr.num_buffers), (0, 0, 1));
    }
}

/// Real tap: a frame longer than the guest's only buffer (no merged buffers) is cut by the
/// kernel; the device drops it and the buffer takes the next frame.
#[test]
fn a_frame_too_long_for_the_buffers_is_dropped_not_cut() {
    enter_fresh_netns();
    let fd = create_tap("hnet1", TAP_FLAGS, false);
    let sock = PacketSocket::bind("hnet1", false);
    // SAFETY: the fd is ours and handed over.
    let tap = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }.unwrap();
    let mut g = Guest::new(Box::new(tap), 1500, VIRTIO_F_VERSION_1);
    g.add_rx(1, 200);
    g.net.queue_notify(0);
    sock.send(&test_frame(1, 500));
    sock.send(&test_frame(2, 100));
    let mut got = Vec::new();
    while got.is_empty() && g.serve_backend(LONG) {
        got.extend(
            g.received()
                .into_iter()
                .filter(|(_, f)| seq_of(f).is_some()),
        );
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, test_frame(2, 100));
    assert_eq!(g.net.stats().rx_dropped, 1);
}

/// Real tap: a guest's segmentation-offload frame (TCP/IPv4, checksum left to the host)
/// goes into the tap as one frame with its header, as the guest built it.
#[test]
fn a_gso_frame_goes_through_the_tap_whole() {
    enter_fresh_netns();
    let fd = create_tap("hnet2", TAP_FLAGS, false);
    let sock = PacketSocket::bind("hnet2", true);
    // SAFETY: the fd is ours and handed over.
    let tap = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }.unwrap();
    let acked = VIRTIO_F_VERSION_1 | F_CSUM | F_HOST_TSO4;
    let mut g = Guest::new(Box::new(tap), 1500, acked);
    let payload = 4000;
    let frame = tcp4_frame(payload);
    let hdr = VnetHdr {
        flags: 1,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    g.queue_tx(hdr, &frame, 3);
    g.net.queue_notify(1);
    assert_eq!(g.net.stats().tx_frames, 1, "{:?}", g.net.stats());
    // The socket's frames come with a 10-byte virtio_net_hdr in front.
    let got = sock.recv(LONG, |f| f.len() > 10 + 14 && f[10 + 12..10 + 14] == [8, 0]);
    let got = got.expect("the frame did not come out of the tap");
    assert_eq!(
        got[1] & !GSO_ECN,
        GSO_TCPV4,
        "not a GSO frame: {:?}",
        &got[..10]
    );
    assert_eq!(u16::from_le_bytes([got[4], got[5]]), 1448);
    assert_eq!(got.len() - 10, frame.len());
    assert_eq!(got[10 + 54..], frame[54..]);
}

/// An Ethernet + IPv4 + TCP frame to the guest's MAC with `payload` bytes.
fn tcp4_frame(payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[8, 0]);
    let total = (20 + 20 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| (i % 253) as u8));
    f
}

/// Real tap: the offloads the guest acks are the tap's (read back with ethtool's ioctls),
/// and a reset takes them off.
#[test]
fn the_tap_gets_the_offloads_the_guest_acked() {
    enter_fresh_netns();
    let fd = create_tap("hnet3", TAP_FLAGS, false);
    // SAFETY: the fd is ours and handed over.
    let tap = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }.unwrap();
    let (txcsum, tso) = (0x16, 0x1e); // ETHTOOL_GTXCSUM, ETHTOOL_GTSO
    assert_eq!(
        (ethtool_get("hnet3", txcsum), ethtool_get("hnet3", tso)),
        (0, 0)
    );
    let acked = VIRTIO_F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6;
    let mut g = Guest::new(Box::new(tap), 1500, acked);
    assert_eq!(
        (ethtool_get("hnet3", txcsum), ethtool_get("hnet3", tso)),
        (1, 1)
    );
    g.net.reset();
    assert_eq!(
        (ethtool_get("hnet3", txcsum), ethtool_get("hnet3", tso)),
        (0, 0)
    );
    g.net.ack_features(VIRTIO_F_VERSION_1 | F_GUEST_CSUM);
    g.net.activate(
        g.mem.clone(),
        vec![g.rxq.device_queue(&g.mem), g.txq.device_queue(&g.mem)],
        g.irq.clone(),
    );
    assert_eq!(
        (ethtool_get("hnet3", txcsum), ethtool_get("hnet3", tso)),
        (1, 0)
    );
}

/// An ethtool "get one value" command on `ifname`.
fn ethtool_get(ifname: &str, cmd: u32) -> u32 {
    #[repr(C)]
    struct Req {
        name: [u8; libc::IFNAMSIZ],
        data: *mut [u32; 2],
        _pad: [u8; 16],
    }
    let mut value = [cmd, 0u32];
    let mut req = Req {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: creates a socket, checked below and closed at the end.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(s >= 0);
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, which both
    // live across the call.
    let rc = unsafe { libc::ioctl(s, libc::SIOCETHTOOL, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own socket.
    unsafe { libc::close(s) };
    assert_eq!(rc, 0, "SIOCETHTOOL {cmd:#x}: {err}");
    value[1]
}

#[test]
fn taps_are_checked_before_use() {
    enter_fresh_netns();
    assert!(matches!(
        Tap::open_named("nosuchtap"),
        Err(TapError::NoSuchInterface(_))
    ));
    // A persistent tap nobody holds: attached to by name.
    drop(create_tap("hnet4", TAP_FLAGS, true));
    let tap = Tap::open_named("hnet4").unwrap();
    assert_eq!(tap.name(), "hnet4");
    // Busy: a single-queue tap takes one fd.
    assert!(matches!(
        Tap::open_named("hnet4"),
        Err(TapError::Attach(..))
    ));
    // Not a tap at all, and a tap without the virtio-net header.
    let null = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: the fd is ours and handed over.
    let r = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(null)) };
    assert!(matches!(r, Err(TapError::NotATap(..))), "{r:?}");
    let plain = create_tap("hnet5", libc::IFF_TAP | libc::IFF_NO_PI, false);
    // SAFETY: the fd is ours and handed over.
    let r = unsafe { Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(plain)) };
    assert!(
        matches!(r, Err(TapError::Flags(_, "IFF_VNET_HDR"))),
        "{r:?}"
    );
}
