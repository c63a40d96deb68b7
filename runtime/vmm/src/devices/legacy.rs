//! Port-I/O devices: the 8250 serial console, the i8042 reset line and the boot timer.

use std::{io::Write, sync::mpsc::Sender, time::Instant};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// How the guest ended, as seen by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked for a reset (i8042 0xfe): its `reboot`, or `panic=-1` after a panic.
    Reset,
}

/// The I/O port of the boot timer: the agent writes [`BOOT_TIMER_READY`] here when it serves.
pub const BOOT_TIMER_PORT: u16 = 0x03f0;
/// The value the agent writes.
pub const BOOT_TIMER_READY: u8 = 1;
const SERIAL_BASE: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Everything on the port-I/O bus.
pub struct LegacyBus {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    /// Recent serial output, to recognise a kernel panic.
    tail: Vec<u8>,
    exit: Sender<GuestExit>,
    started: Instant,
    ready: Option<std::time::Duration>,
    on_ready: Option<Box<dyn FnMut() + Send>>,
}

impl std::fmt::Debug for LegacyBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyBus")
            .field("ready", &self.ready)
            .finish()
    }
}

impl LegacyBus {
    pub fn new(
        serial_irq: EventFd,
        out: Box<dyn Write + Send>,
        exit: Sender<GuestExit>,
        started: Instant,
    ) -> Self {
        LegacyBus {
            serial: Serial::new(IrqTrigger(serial_irq), out),
            tail: Vec::new(),
            exit,
            started,
            ready: None,
            on_ready: None,
        }
    }

    /// Runs `f` once, when the guest signals ready.
    pub fn on_ready(&mut self, f: Box<dyn FnMut() + Send>) {
        self.on_ready = Some(f);
    }

    /// Whether the serial output mentions a kernel panic.
    pub fn saw_panic(&self) -> bool {
        String::from_utf8_lossy(&self.tail).contains("Kernel panic")
    }

    /// When the guest signalled ready, since VMM start.
    pub fn ready_after(&self) -> Option<std::time::Duration> {
        self.ready
    }

    /// Handles an OUT; returns true if the port is ours.
    pub fn write(&mut self, port: u16, data: &[u8]) -> bool {
        let Some(&v) = data.first() else { return false };
        match port {
            p if (SERIAL_BASE..SERIAL_BASE + 8).contains(&p) => {
                if p == SERIAL_BASE {
                    self.tail.push(v);
                    if self.tail.len() > 4096 {
                        self.tail.drain(..2048);
                    }
                }
                let _ = self.serial.write((p - SERIAL_BASE) as u8, v);
                true
            }
            I8042_CMD if v == I8042_RESET => {
                let _ = self.exit.send(GuestExit::Reset);
                true
            }
            BOOT_TIMER_PORT if v == BOOT_TIMER_READY => {
                if self.ready.is_none() {
                    let t = self.started.elapsed();
                    self.ready = Some(t);
                    println!("guest ready after {} ms", t.as_millis());
                    if let Some(mut f) = self.on_ready.take() {
                        f();
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Handles an IN; unknown ports read as all ones.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            p if (SERIAL_BASE..SERIAL_BASE + 8).contains(&p) => {
                self.serial.read((p - SERIAL_BASE) as u8)
            }
            // i8042: no data, input buffer empty (so a guest reset write goes through).
            I8042_DATA | I8042_CMD => 0,
            _ => 0xff,
        };
        data.fill(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_reset_and_boot_timer() {
        let (tx, rx) = mpsc::channel();
        let out = Shared::default();
        let mut bus = LegacyBus::new(
            EventFd::new(0).unwrap(),
            Box::new(out.clone()),
            tx,
            Instant::now(),
        );
        for b in b"Kernel panic - not syncing" {
            assert!(bus.write(0x3f8, &[*b]));
        }
        assert_eq!(&out.0.lock().unwrap()[..], b"Kernel panic - not syncing");
        assert!(bus.saw_panic());
        assert!(bus.ready_after().is_none());
        assert!(bus.write(BOOT_TIMER_PORT, &[BOOT_TIMER_READY]));
        assert!(bus.ready_after().is_some());
        assert!(rx.try_recv().is_err());
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(rx.try_recv().unwrap(), GuestExit::Reset);
        let mut d = [0u8; 1];
        bus.read(0x1234, &mut d);
        assert_eq!(d[0], 0xff);
        assert!(!bus.write(0x1234, &[1]));
    }
}
