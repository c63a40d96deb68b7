//! A tiny hand-written guest through husk-vmm's real vCPU loop, on this host's own KVM
//! (PVM runs such guests fine, though not Linux). Needs /dev/kvm; CI has it.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use husk_vmm::vmm::{run_raw, Outcome};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tiny_guest_uses_serial_boot_timer_and_reset() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (CI machines have it)"
    );
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8 (COM1)
        0xb0, b'h', 0xee,       // mov al, 'h'; out dx, al
        0xb0, b'i', 0xee,       // mov al, 'i'; out dx, al
        0xba, 0xf0, 0x03,       // mov dx, 0x3f0 (boot timer)
        0xb0, 0x01, 0xee,       // mov al, 1; out dx, al
        0xba, 0x64, 0x00,       // mov dx, 0x64 (i8042)
        0xb0, 0xfe, 0xee,       // mov al, 0xfe; out dx, al (reset)
        0xf4,                   // hlt
    ];
    let out = Capture::default();
    let (outcome, ready) = run_raw(code, Box::new(out.clone())).expect("the tiny guest ran");
    assert_eq!(outcome, Outcome::GuestExit);
    assert_eq!(&out.0.lock().unwrap()[..], b"hi");
    assert!(ready.is_some(), "the boot-timer write was not seen");
}
