//! A hostile guest and a hostile network around the virtio-net device: the guest fills
//! memory (descriptor tables, rings, headers, frames) and notifies either queue at will; the
//! network (a Unix datagram socket standing in for the tap) sends frames of any length with
//! any header, and takes the device's frames or leaves them (so writes would block). Whatever
//! happens the device must not panic, hang or touch memory outside the guest's; chains it
//! refuses are given back.
//!
//! Input: byte 0 picks the features the driver acks (bit i: the i-th of [`ACKABLE`]); then
//! 8 KiB of guest memory (zero-padded), where the fixed setup puts the RX ring's descriptor
//! table at 0x0 (avail 0x400, used 0x800) and the TX ring's at 0x1000 (avail 0x1400, used
//! 0x1800), 16 entries each; then 8-byte operations [kind, a, b, c, value (4 bytes)].
//! seeds/gen.py writes inputs that send and receive a frame.
#![no_main]

use husk_vmm::devices::virtio::{
    mmio::MmioTransport,
    net::{
        Net, SocketBackend, F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6,
        F_HOST_ECN, F_HOST_TSO4, F_MRG_RXBUF,
    },
    IrqLine,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;
const IMAGE: usize = 8 << 10;
const ACKABLE: [u64; 8] = [
    F_CSUM,
    F_HOST_TSO4,
    F_HOST_ECN,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_GUEST_ECN,
    F_MRG_RXBUF,
];

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (image, ops) = rest.split_at(rest.len().min(IMAGE));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let (backend, peer) = SocketBackend::pair().unwrap();
    let net = Net::new("net0", Box::new(backend), [2, 0, 0, 0, 0, 1], 1500).unwrap();
    let acked = ACKABLE
        .iter()
        .enumerate()
        .filter(|(i, _)| which & (1 << i) != 0)
        .fold(1u64 << 32, |a, (_, f)| a | f);
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq);
    w(&mut t, 0x70, 1 | 2);
    for sel in 0..2u32 {
        w(&mut t, 0x24, sel);
        w(&mut t, 0x20, (acked >> (32 * sel)) as u32);
    }
    w(&mut t, 0x70, 1 | 2 | 8);
    for (q, base) in [(0u32, 0u32), (1, 0x1000)] {
        w(&mut t, 0x30, q);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, base);
        w(&mut t, 0x90, base + 0x400);
        w(&mut t, 0xa0, base + 0x800);
        w(&mut t, 0x44, 1);
    }
    w(&mut t, 0x70, 1 | 2 | 8 | 4);

    let mut frame = vec![0u8; 70000];
    for op in ops.chunks_exact(8) {
        let v = [op[4], op[5], op[6], op[7]];
        match op[0] % 5 {
            0 => w(&mut t, 0x50, u32::from(op[1] & 1)),
            1 => {
                // The network sends a frame: a header made of `v`, then `len` bytes.
                let len = usize::from(u16::from_le_bytes([op[1], op[2]])) % (frame.len() - 12);
                frame[..12]
                    .copy_from_slice(&[v[0], v[1], v[2], v[3], v[0], v[1], v[2], v[3], 0, 0, 0, 0]);
                let _ = peer.send(&frame[..12 + len]);
            }
            2 => t.device_mut().process_backend(),
            3 => {
                let addr = (u64::from(u16::from_le_bytes([op[1], op[2]])) * 4) % MEM as u64;
                let _ = mem.write_slice(&v, GuestAddress(addr));
            }
            _ => {
                // The network takes what the device sent (or, by never doing so, fills up).
                while peer.recv(&mut frame).is_ok() {}
            }
        }
    }
    // A reset in the middle of it all must be harmless too.
    w(&mut t, 0x70, 0);
    t.device_mut().process_backend();
});
