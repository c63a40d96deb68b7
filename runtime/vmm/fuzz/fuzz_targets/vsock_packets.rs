//! Raw vsock packets from the guest, straight into the device's packet handler: headers of
//! any shape, any op, any length, in any order. The device must not panic or hang, and its
//! queues of replies and connections must stay bounded by its own limits: a panic, a
//! timeout or memory beyond scripts/fuzz.sh's -rss_limit_mb is the failure. Seeds:
//! seeds/vsock_packets (written by seeds/gen.py).
//!
//! Input: a sequence of packets, each a 44-byte header followed by `len` payload bytes
//! (len taken from the header, capped by what is left).
#![no_main]

use husk_vmm::devices::virtio::vsock::{Header, Vsock, HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
    let mut rest = data;
    while rest.len() >= HDR_LEN {
        let (hdr, tail) = rest.split_at(HDR_LEN);
        let Some(h) = Header::parse(hdr) else {
            rest = tail;
            continue;
        };
        let n = (h.len as usize).min(tail.len());
        v.handle_guest_packet(h, &tail[..n]);
        rest = &tail[n..];
    }
});
