//! The fuzzer is a hostile guest driver: it fills guest memory (descriptor tables, rings,
//! buffers) and programs a virtio-mmio transport register by register, notifying queues
//! of a block or vsock device at will. Whatever it does, the VMM must not panic, hang, or
//! touch memory outside the guest's.
//!
//! Input: byte 0 picks the device (odd: vsock; even: a block drive, read-only with bit 1,
//! layered with bit 2: two layers, one with a zero tail, with holes around them); then 8 KiB of guest memory (zero-padded); then 8-byte
//! operations: [kind, offset_lo, offset_hi, len, value (4 bytes)]. seeds/gen.py writes
//! inputs of a well-behaved driver (init, queue setup, one request) to start from.
#![no_main]

use husk_vmm::devices::virtio::{
    block::Block, mmio::MmioTransport, vsock::Vsock, FileArg, IrqLine, VirtioDevice,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;
const IMAGE: usize = 8 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (image, ops) = rest.split_at(rest.len().min(IMAGE));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let device: Box<dyn VirtioDevice> = if which % 2 == 1 {
        Box::new(Vsock::new(3, &dir.path().join("v.sock")).unwrap())
    } else if which & 4 != 0 {
        let mut b = Block::layered("fuzz");
        for (name, len) in [("a", 5000), ("b", 4096)] {
            let layer = dir.path().join(name);
            std::fs::write(&layer, vec![0xa5u8; len]).unwrap();
            b.add_layer(FileArg::Path(layer)).unwrap();
        }
        Box::new(b)
    } else {
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0u8; 16 << 10]).unwrap();
        Box::new(Block::new("fuzz", Some(&disk), which & 2 != 0).unwrap())
    };
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(device, mem.clone(), irq);

    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        // Mostly 4-byte accesses (the only width the registers take), sometimes a wrong one.
        let len = if op[3] & 3 == 3 { 1 } else { 4 };
        let value = [op[4], op[5], op[6], op[7]];
        match op[0] % 4 {
            // Register writes (the common case: queue setup, status, notify).
            0 | 1 => t.write(offset % 0x200, &value[..len]),
            2 => {
                let mut buf = [0u8; 4];
                t.read(offset % 0x200, &mut buf[..len]);
            }
            // The driver changes guest memory between notifications.
            _ => {
                let addr = (u64::from(u16::from_le_bytes([op[1], op[2]])) * 4) % MEM as u64;
                let _ = mem.write_slice(&value, GuestAddress(addr));
            }
        }
    }
    // Backend work (vsock: host sockets; block: nothing pending) must be harmless too.
    t.device_mut().process_backend();
});
