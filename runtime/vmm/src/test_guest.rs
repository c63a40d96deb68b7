//! Tiny test guests: hand-written code run on one vCPU through the VMM's own start path and
//! vCPU loop, with the legacy devices and virtio-mmio devices, for tests on hosts whose KVM
//! cannot boot Linux (PVM runs such guests fine, though not Linux). The tests here need
//! /dev/kvm (and root to open it); CI has both, so they fail rather than skip without them.

use std::{io::Write, time::Duration, time::Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::{
    arch::{self, layout},
    device_manager::{DeviceManager, NamedDevices},
    vmm::{self, Machine, Outcome, VmmError},
    vstate::{vcpu::Entry, vm::Vm},
};

/// Why a test guest did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The guest ran on past its timeout.
    #[error("the test guest did not end within {0:?}")]
    Timeout(Duration),
    /// The code does not fit below the boot tables in long mode.
    #[error("the test guest's code ({0} bytes) would overlap the boot stack and page tables")]
    CodeTooBig(usize),
    /// Writing the code or page tables into guest memory.
    #[error("guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Boot(#[from] arch::BootError),
    /// Opening a template file.
    #[error("the template file")]
    Io(#[source] std::io::Error),
}

/// The CPU mode a tiny test guest starts in (see [`run_raw_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RawMode {
    /// Flat 16-bit real mode (CS base 0, no paging).
    #[default]
    Real,
    /// 64-bit long mode as the Linux boot protocol enters it (the boot GDT, RSP at
    /// `layout::BOOT_STACK`), with identity-mapped 2 MiB pages for the first GiB and for
    /// 3-4 GiB, where the virtio-mmio windows are.
    Long,
}

/// A tiny test guest: its code, the mode it starts in and its virtio devices.
#[derive(Default)]
pub struct RawGuest<'a> {
    /// Loaded at guest address 0x1000, where the guest starts (in [`RawMode::Long`] at most
    /// 24 KiB: the boot stack and page tables follow).
    pub code: &'a [u8],
    pub mode: RawMode,
    /// Attached as [`vmm::run`] attaches its devices: device `i` at
    /// `layout::MMIO_BASE + i * layout::MMIO_SIZE`.
    pub devices: NamedDevices,
    /// How long the guest may run before the run fails (default 60 s).
    pub timeout: Option<Duration>,
    /// The control socket, if the guest has one.
    pub api: Option<std::os::unix::net::UnixListener>,
}

impl std::fmt::Debug for RawGuest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawGuest")
            .field("code_len", &self.code.len())
            .field("mode", &self.mode)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// Where the code is loaded and starts.
const CODE: u64 = 0x1000;
/// The page directory for 3-4 GiB in [`RawMode::Long`] (after the boot page tables).
const RAW_HIGH_PD: u64 = layout::PD + 0x1000;

/// Runs flat 16-bit `code` loaded at 0x1000 on one vCPU with the legacy devices, until the
/// guest resets or crashes: the smallest guest that exercises the vCPU loop. The serial
/// output goes to `serial`.
pub fn run_raw(
    code: &[u8],
    serial: Box<dyn Write + Send>,
) -> Result<(Outcome, Option<Duration>), TestGuestError> {
    run_raw_with(
        RawGuest {
            code,
            ..Default::default()
        },
        serial,
    )
}

/// Runs a tiny guest on one vCPU through the VMM's own start path and vCPU loop, with the
/// legacy devices and `guest.devices` behind virtio-mmio (port I/O and MMIO exits both
/// reach real devices), until it resets or crashes. Returns how it ended (a reset after
/// "Kernel panic" on the serial port is [`Outcome::GuestPanic`], as in [`vmm::run`]) and
/// when it wrote the boot timer. Backend events of the devices are served as in
/// [`vmm::run`]; there is no control API.
pub fn run_raw_with(
    guest: RawGuest<'_>,
    serial: Box<dyn Write + Send>,
) -> Result<(Outcome, Option<Duration>), TestGuestError> {
    let timeout = guest.timeout.unwrap_or(Duration::from_secs(60));
    let running = start_raw(guest, serial)?;
    let outcome = running
        .wait_for(timeout)
        .ok_or(TestGuestError::Timeout(timeout))??;
    Ok((outcome, running.ready_after()))
}

/// Starts a tiny guest as [`run_raw_with`] does, and returns it running.
pub(crate) fn start_raw(
    guest: RawGuest<'_>,
    serial: Box<dyn Write + Send>,
) -> Result<vmm::Running, TestGuestError> {
    let started = Instant::now();
    let vm = Vm::new(16).map_err(VmmError::from)?;
    let mode = guest.mode;
    if mode == RawMode::Long && guest.code.len() > 0x6000 {
        return Err(TestGuestError::CodeTooBig(guest.code.len()));
    }
    vm.mem.write_slice(guest.code, GuestAddress(CODE))?;
    if mode == RawMode::Long {
        arch::write_boot_tables(&vm.mem)?;
        vm.mem
            .write_obj(RAW_HIGH_PD | 0x03, GuestAddress(layout::PDPT + 3 * 8))?;
        for i in 0..512u64 {
            let page = (3 << 30) + (i << 21);
            // Present, writable, 2 MiB page, cache disabled (device memory).
            vm.mem
                .write_obj(page | 0x83 | 0x10, GuestAddress(RAW_HIGH_PD + i * 8))?;
        }
    }
    let devices = DeviceManager::attach(&vm, guest.devices).map_err(VmmError::from)?;
    let entry = match mode {
        RawMode::Real => Entry::Real(CODE),
        RawMode::Long => Entry::Long(CODE),
    };
    Ok(vmm::start(
        Machine {
            vm,
            devices,
            vcpus: 1,
            entry,
            serial,
            on_ready: None,
            api: guest.api,
            stop_signals: None,
            started,
            restore: None,
        },
        // The real filters: the raw guests exercise the vCPU and device paths under them.
        &crate::seccomp::Filters::new(seccompiler::SeccompAction::KillProcess)
            .map_err(VmmError::from)?,
    )?)
}

/// Restores a tiny guest from the template file at `template` (a snapshot request's), with
/// `devices` (those of the snapshotted guest, in its order) and one vCPU, and returns it
/// running on from where it was snapshotted.
#[cfg(test)]
pub(crate) fn restore_raw(
    template: &std::path::Path,
    devices: NamedDevices,
    serial: Box<dyn Write + Send>,
) -> Result<vmm::Running, TestGuestError> {
    use crate::vstate::snapshot::Snapshot;
    let started = Instant::now();
    let open = || std::fs::File::open(template).map_err(TestGuestError::Io);
    let snap = Snapshot::read(&open()?).map_err(VmmError::from)?;
    let vm = Vm::from_memory_file_part(open()?, snap.memory_bytes).map_err(VmmError::from)?;
    let devices =
        DeviceManager::attach_restored(&vm, devices, &snap.devices).map_err(VmmError::from)?;
    Ok(vmm::start(
        Machine {
            vm,
            devices,
            vcpus: 1,
            entry: Entry::Long(CODE),
            serial,
            on_ready: None,
            api: None,
            stop_signals: None,
            started,
            restore: Some(vmm::Restore {
                vcpus: snap.vcpus,
                vm: snap.vm,
            }),
        },
        &crate::seccomp::Filters::new(seccompiler::SeccompAction::KillProcess)
            .map_err(VmmError::from)?,
    )?)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::virtio::{block::Block, vsock::Vsock};

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

    /// The 8 bytes at guest address `at` of a running test guest.
    fn word_at(running: &vmm::Running, at: u64) -> u64 {
        running.memory().read_obj::<u64>(GuestAddress(at)).unwrap()
    }

    fn need_kvm() {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "this test needs /dev/kvm (CI machines have it)"
        );
    }

    /// A guest that counts in memory with no exit at all, so only a kick gets its vCPU out
    /// of KVM_RUN, is paused twice: while paused the count stands still, the saved registers
    /// are the counting loop's, and after each resume it counts on; then told through memory
    /// to stop, it resets.
    #[test]
    fn a_running_guest_pauses_with_its_state_saved_and_resumes() {
        need_kvm();
        const COUNT: u64 = 0x3000;
        const STOP: u64 = 0x3008;
        #[rustfmt::skip]
        let code: &[u8] = &[
            0x48, 0xff, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,       // l: inc qword [0x3000]
            0x80, 0x3c, 0x25, 0x08, 0x30, 0x00, 0x00, 0x00,       // cmp byte [0x3008], 0
            0x74, 0xee,                                           // je l
            0xb0, 0xfe,                                           // mov al, 0xfe
            0xe6, 0x64,                                           // out 0x64, al (reset)
            0xf4,                                                 // hlt
        ];
        let running = start_raw(
            RawGuest {
                code,
                mode: RawMode::Long,
                ..Default::default()
            },
            Box::new(Capture::default()),
        )
        .expect("the guest started");
        let count = || word_at(&running, COUNT);
        let wait_for_count = |above: u64| {
            let until = Instant::now() + Duration::from_secs(20);
            while count() <= above {
                assert!(
                    Instant::now() < until,
                    "the guest does not count past {above}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for_count(0);
        for round in 0..2 {
            let states = running.pause(Duration::from_secs(5)).expect("paused");
            assert_eq!(states.len(), 1);
            let rip = states[0].regs.rip;
            assert!(
                (CODE..CODE + code.len() as u64).contains(&rip),
                "round {round}: rip {rip:#x} is not in the loop"
            );
            assert!(!states[0].msrs.is_empty() && !states[0].cpuid.is_empty());
            let at = count();
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(count(), at, "round {round}: the guest ran while paused");
            // A second pause of a paused VM is refused, and the VM stays paused.
            assert!(matches!(
                running.pause(Duration::from_millis(100)),
                Err(VmmError::Pause(
                    crate::vstate::pause::PauseError::AlreadyPaused
                ))
            ));
            assert_eq!(count(), at);
            running.resume();
            wait_for_count(at);
        }
        running.memory().write_obj(1u8, GuestAddress(STOP)).unwrap();
        let outcome = running
            .wait_for(Duration::from_secs(20))
            .expect("the guest ended after its stop flag")
            .expect("a clean end");
        assert_eq!(outcome, Outcome::GuestExit);
    }

    /// The counting guest of the pause test, with a vsock device and a control socket, is
    /// snapshotted through the socket: the VMM stops, and the template file holds its guest
    /// memory as it stood (the count, the code) and its state (its vCPU in the loop, the
    /// vsock transport). Two clones restored from it each count on from there, in memory of
    /// their own, and end when told; the template stays as it was. A template restored with
    /// other devices, or a damaged one, is refused, naming what is wrong.
    #[test]
    fn a_running_guest_is_snapshotted_to_a_template_and_restored_twice() {
        use crate::vstate::snapshot::{Snapshot, SnapshotError};
        use std::os::unix::fs::FileExt;
        need_kvm();
        const COUNT: u64 = 0x3000;
        const STOP: u64 = 0x3008;
        #[rustfmt::skip]
        // The count is kept in R12 and stored: a clone whose vCPU state was not put back
        // would count from 0 again.
        let code: &[u8] = &[
            0x49, 0xff, 0xc4,                                     // l: inc r12
            0x4c, 0x89, 0x24, 0x25, 0x00, 0x30, 0x00, 0x00,       // mov [0x3000], r12
            0x80, 0x3c, 0x25, 0x08, 0x30, 0x00, 0x00, 0x00,       // cmp byte [0x3008], 0
            0x74, 0xeb,                                           // je l
            0xb0, 0xfe,                                           // mov al, 0xfe
            0xe6, 0x64,                                           // out 0x64, al (reset)
            0xf4,                                                 // hlt
        ];
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let vsock = Vsock::new(42, &dir.path().join("v.sock")).unwrap();
        let running = start_raw(
            RawGuest {
                code,
                mode: RawMode::Long,
                devices: vec![("vsock".into(), Box::new(vsock))],
                api: Some(crate::api_server::bind(&sock).unwrap()),
                ..Default::default()
            },
            Box::new(Capture::default()),
        )
        .expect("the guest started");
        let count = || word_at(&running, COUNT);
        let until = Instant::now() + Duration::from_secs(20);
        while count() == 0 {
            assert!(Instant::now() < until, "the guest does not count");
            std::thread::sleep(Duration::from_millis(5));
        }

        let path = dir.path().join("template");
        let file = std::fs::File::create(&path).unwrap();
        husk_vmm_api::Client::new(&sock, Duration::from_secs(60))
            .snapshot(&file)
            .expect("snapshotted");
        let outcome = running
            .wait_for(Duration::from_secs(20))
            .expect("the VMM stopped after the snapshot")
            .expect("a clean stop");
        assert_eq!(outcome, Outcome::Stopped);
        let at = count();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count(), at, "the guest ran on after its snapshot");

        let file = std::fs::File::open(&path).unwrap();
        let snap = Snapshot::read(&file).expect("a template");
        assert_eq!(snap.memory_bytes, 16 << 20);
        assert_eq!(snap.vcpus.len(), 1);
        let rip = snap.vcpus[0].regs.rip;
        assert!(
            (CODE..CODE + code.len() as u64).contains(&rip),
            "rip {rip:#x} is not in the loop"
        );
        assert_eq!(snap.devices.len(), 1);
        assert_eq!(snap.devices[0].0, "vsock");
        assert_eq!(snap.devices[0].1.device_type, 19);
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, COUNT).unwrap();
        assert_eq!(u64::from_le_bytes(word), at, "the count in the template");
        let mut text = vec![0u8; code.len()];
        file.read_exact_at(&mut text, CODE).unwrap();
        assert_eq!(text, code, "the guest's code in the template");

        for clone in 0..2 {
            let vsock = Vsock::new(42, &dir.path().join(format!("c{clone}.sock"))).unwrap();
            let c = restore_raw(
                &path,
                vec![("vsock".into(), Box::new(vsock))],
                Box::new(Capture::default()),
            )
            .unwrap_or_else(|e| panic!("clone {clone}: {e}"));
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                let now = word_at(&c, COUNT);
                assert!(
                    now >= at,
                    "clone {clone} counts from {now}, not on from {at}"
                );
                if now > at + 1000 {
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "clone {clone} does not count on from {at}: {now}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            c.memory().write_obj(1u8, GuestAddress(STOP)).unwrap();
            let outcome = c
                .wait_for(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("clone {clone} did not end after its stop flag"))
                .expect("a clean end");
            assert_eq!(outcome, Outcome::GuestExit, "clone {clone}");
            file.read_exact_at(&mut word, COUNT).unwrap();
            assert_eq!(
                u64::from_le_bytes(word),
                at,
                "the template after clone {clone}"
            );
        }
        match restore_raw(&path, Vec::new(), Box::new(Capture::default())) {
            Err(e) => {
                let mut chain = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain += &format!(": {s}");
                    source = s.source();
                }
                assert!(
                    chain.contains("the VM has the devices [], its snapshot [vsock]"),
                    "{chain}"
                );
            }
            Ok(_) => panic!("a template restored without its devices"),
        }

        // Damaged: cut short, a byte more, another version.
        let whole = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8], why: &str| {
            let p = dir.path().join("damaged");
            std::fs::write(&p, bytes).unwrap();
            match Snapshot::read(&std::fs::File::open(&p).unwrap()) {
                Err(SnapshotError::NotATemplate(w)) => assert!(w.contains(why), "{w}"),
                other => panic!("a damaged template ({why}) read as {other:?}"),
            }
        };
        refused(&whole[..whole.len() - 1], "no template mark");
        let mut longer = whole.clone();
        longer.push(0);
        refused(&longer, "no template mark");
        refused(&whole[..100], "no template mark");
        let state_at = snap.memory_bytes as usize;
        let other = String::from_utf8_lossy(&whole[state_at..whole.len() - 16]).replacen(
            "\"version\":1",
            "\"version\":9",
            1,
        );
        let mut bytes = whole[..state_at].to_vec();
        bytes.extend_from_slice(other.as_bytes());
        bytes.extend_from_slice(&whole[whole.len() - 16..]);
        refused(&bytes, "of version Some(9)");
        let mut moved = whole[..state_at - 4096].to_vec();
        moved.extend_from_slice(&whole[state_at..]);
        refused(&moved, "bytes of guest memory before a state");
    }

    #[test]
    fn tiny_guest_uses_serial_boot_timer_and_reset() {
        need_kvm();
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

    /// Appends 64-bit code that reads the 32-bit register at `rbx + off` (one MMIO exit when
    /// rbx points at a virtio-mmio window) and sends it to the serial port (dx), low byte first.
    fn read_and_emit(code: &mut Vec<u8>, off: u32) {
        code.extend_from_slice(&[0x8b, 0x83]); // mov eax, [rbx + disp32]
        code.extend_from_slice(&off.to_le_bytes());
        for i in 0..4 {
            code.push(0xee); // out dx, al
            if i < 3 {
                code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
            }
        }
    }

    /// The guest reads the virtio-mmio registers of a block device (backed by a temp file) and a
    /// vsock device through MMIO exits, writes one (the status register) and reads it back, and
    /// sends every value out on the serial port; the test checks them.
    #[test]
    fn tiny_guest_reads_virtio_mmio_registers() {
        need_kvm();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let block = Block::new("rootfs", Some(&disk), false).unwrap();
        let vsock = Vsock::new(42, &dir.path().join("v.sock")).unwrap();

        let base = u32::try_from(layout::MMIO_BASE).expect("the MMIO windows are below 4 GiB");
        let window = layout::MMIO_SIZE as u32;
        // mov ebx, base (zero-extended into rbx); mov dx, 0x3f8 (COM1).
        let mut code = vec![0xbb];
        code.extend_from_slice(&base.to_le_bytes());
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]);

        // Device 0, the block device: magic, version, device id, vendor.
        for off in [0x000, 0x004, 0x008, 0x00c] {
            read_and_emit(&mut code, off);
        }
        // mov dword [rbx + 0x70], 1: the driver acknowledges the device (an MMIO write).
        code.extend_from_slice(&[0xc7, 0x83, 0x70, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]);
        read_and_emit(&mut code, 0x070);
        // The block device's configuration: its capacity in sectors (low half).
        read_and_emit(&mut code, 0x100);
        // Device 1, the vsock device: magic, device id, its configuration (the guest CID).
        for off in [0x000, 0x008, 0x100] {
            read_and_emit(&mut code, window + off);
        }
        // Past the last device: reads as 0.
        read_and_emit(&mut code, 2 * window);
        #[rustfmt::skip]
        code.extend_from_slice(&[
            0x66, 0xba, 0xf0, 0x03, // mov dx, 0x3f0 (boot timer)
            0xb0, 0x01, 0xee,       // mov al, 1; out dx, al
            0x66, 0xba, 0x64, 0x00, // mov dx, 0x64 (i8042)
            0xb0, 0xfe, 0xee,       // mov al, 0xfe; out dx, al (reset)
            0xf4,                   // hlt
        ]);

        let out = Capture::default();
        let (outcome, ready) = run_raw_with(
            RawGuest {
                code: &code,
                mode: RawMode::Long,
                devices: vec![
                    ("rootfs".into(), Box::new(block)),
                    ("vsock".into(), Box::new(vsock)),
                ],
                ..Default::default()
            },
            Box::new(out.clone()),
        )
        .expect("the tiny guest ran");
        assert_eq!(outcome, Outcome::GuestExit);
        assert!(ready.is_some(), "the boot-timer write was not seen");
        let got: Vec<u32> = out
            .0
            .lock()
            .unwrap()
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("whole registers")))
            .collect();
        assert_eq!(
            got,
            [
                0x7472_6976, // "virt"
                2,           // virtio-mmio version 2
                2,           // virtio-blk
                0x4b53_5548, // "HUSK"
                1,           // the status the guest wrote
                2048,        // 1 MiB in 512-byte sectors
                0x7472_6976,
                19, // virtio-vsock
                42, // its guest CID
                0,
            ],
            "registers as the guest read them"
        );
    }

    /// A guest that prints a panic line, then a long dump (far more than any window of recent
    /// output), then resets: the VM ended in a panic, not a clean exit.
    #[test]
    fn tiny_guest_panic_survives_a_long_dump() {
        need_kvm();
        let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
        for b in b"Kernel panic - not syncing: test\n" {
            code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
        }
        #[rustfmt::skip]
        code.extend_from_slice(&[
            0xb9, 0x00, 0x40,       // mov cx, 0x4000
            0xb0, b'x', 0xee,       // l: mov al, 'x'; out dx, al
            0xe2, 0xfb,             // loop l
            0xba, 0x64, 0x00,       // mov dx, 0x64 (i8042)
            0xb0, 0xfe, 0xee,       // mov al, 0xfe; out dx, al (reset)
            0xf4,                   // hlt
        ]);
        let out = Capture::default();
        let (outcome, _) = run_raw(&code, Box::new(out.clone())).expect("the tiny guest ran");
        let out = out.0.lock().unwrap();
        assert!(out.starts_with(b"Kernel panic - not syncing: test\n"));
        assert_eq!(out.iter().filter(|&&b| b == b'x').count(), 0x4000);
        assert_eq!(outcome, Outcome::GuestPanic);
    }
}
