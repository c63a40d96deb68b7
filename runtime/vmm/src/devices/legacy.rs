//! Port-I/O devices: the 8250 serial console, the i8042 controller (its reset line, and just
//! enough of the rest that the guest's driver probes it at once) and the boot timer.

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

/// The i8042 keyboard controller, as far as a guest kernel's probe goes: the status register,
/// a one-byte output buffer, the controller configuration byte (CTR) and the commands that
/// read and write it, the self-tests, and the keyboard port's enable bit. No keyboard sits
/// behind it (bytes written to the keyboard are dropped) and it raises no interrupt.
///
/// A controller that answers nothing costs a Linux guest its i8042 driver's command timeout
/// (500 ms of polling the status port, one VM exit per poll) before "Can't read CTR while
/// initializing i8042", on every boot; `reboot=k` needs the controller there, so it stays.
#[derive(Debug)]
struct I8042 {
    ctr: u8,
    /// The byte the guest reads next from the data port.
    output: Option<u8>,
    /// The command whose parameter the next data-port write is.
    pending: Option<u8>,
}

/// Status register: output buffer full (a byte waits in the data port).
const I8042_STR_OBF: u8 = 0x01;
/// Status register: the system flag, set once the controller passed its self-test.
const I8042_STR_SYS: u8 = 0x04;
/// Status register: the keyboard is not locked (the bit is active low).
const I8042_STR_KEYLOCK: u8 = 0x10;
/// Status register: the last write was a command (to 0x64), not data.
const I8042_STR_CMDDAT: u8 = 0x08;
/// CTR: keyboard interrupt enabled, system flag, scancode translation (a PC's default).
const I8042_CTR_DEFAULT: u8 = 0x01 | 0x04 | 0x40;
const I8042_CTR_KBDDIS: u8 = 0x10;
const I8042_CTR_AUXDIS: u8 = 0x20;

impl I8042 {
    fn new() -> Self {
        I8042 {
            ctr: I8042_CTR_DEFAULT,
            output: None,
            pending: None,
        }
    }

    fn status(&self) -> u8 {
        let obf = if self.output.is_some() {
            I8042_STR_OBF
        } else {
            0
        };
        let cmd = if self.pending.is_some() {
            I8042_STR_CMDDAT
        } else {
            0
        };
        obf | cmd | (self.ctr & I8042_STR_SYS) | I8042_STR_KEYLOCK
    }

    fn read_data(&mut self) -> u8 {
        self.output.take().unwrap_or(0)
    }

    /// A command written to port 0x64 (but the reset, which the bus handles).
    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            0x20 => self.output = Some(self.ctr),
            // Write the CTR, or the output port: the parameter follows on the data port.
            0x60 | 0xd1 => self.pending = Some(cmd),
            0xa7 => self.ctr |= I8042_CTR_AUXDIS,
            0xa8 => self.ctr &= !I8042_CTR_AUXDIS,
            // The controller's self-test passes; the keyboard and aux interface tests find no
            // fault (0) on their lines.
            0xaa => self.output = Some(0x55),
            0xa9 | 0xab => self.output = Some(0x00),
            0xad => self.ctr |= I8042_CTR_KBDDIS,
            0xae => self.ctr &= !I8042_CTR_KBDDIS,
            // Read the output port: the reset line is high (not in reset), A20 enabled.
            0xd0 => self.output = Some(0x03),
            _ => {}
        }
    }

    /// A byte written to port 0x60: a command's parameter, or a byte for the (absent)
    /// keyboard, dropped. Returns true when the byte asks for a reset (output port bit 0 low).
    fn write_data(&mut self, v: u8) -> bool {
        match self.pending.take() {
            Some(0x60) => {
                self.ctr = v;
                false
            }
            Some(0xd1) => v & 1 == 0,
            _ => false,
        }
    }
}

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the guest kernel prints when it panics.
const PANIC_LINE: &[u8] = b"Kernel panic";

/// The most serial output a log file gets: a guest printing in a loop cannot fill the host's
/// disk.
pub const SERIAL_LOG_MAX: u64 = 16 << 20;

/// Passes the first `max` bytes on to `inner`, then writes one line saying the rest was
/// dropped, then drops everything (still reporting success, so the serial device goes on).
#[derive(Debug)]
pub struct CappedWriter<W> {
    inner: W,
    max: u64,
    written: u64,
    truncated: bool,
}

impl<W: Write> CappedWriter<W> {
    pub fn new(inner: W, max: u64) -> Self {
        CappedWriter {
            inner,
            max,
            written: 0,
            truncated: false,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.truncated {
            return Ok(buf.len());
        }
        let room = self.max - self.written;
        if room == 0 {
            self.truncated = true;
            let _ = write!(
                self.inner,
                "\n[husk-vmm: serial log truncated after {} bytes; further output is dropped]\n",
                self.max
            );
            let _ = self.inner.flush();
            return Ok(buf.len());
        }
        let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..n])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Everything on the port-I/O bus.
pub struct LegacyBus {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    i8042: I8042,
    /// The last few bytes of serial output (up to the length of [`PANIC_LINE`]), to
    /// recognise the panic line however the guest's writes split it.
    recent: Vec<u8>,
    /// The guest printed [`PANIC_LINE`]: sticky, so no amount of output after it (a long
    /// stack dump) hides the panic from the reset that follows.
    panicked: bool,
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
            i8042: I8042::new(),
            recent: Vec::with_capacity(PANIC_LINE.len()),
            panicked: false,
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

    /// Whether the serial output ever mentioned a kernel panic.
    pub fn saw_panic(&self) -> bool {
        self.panicked
    }

    /// Watches one byte of serial output for the panic line.
    fn watch(&mut self, b: u8) {
        if self.panicked {
            return;
        }
        if self.recent.len() == PANIC_LINE.len() {
            self.recent.remove(0);
        }
        self.recent.push(b);
        self.panicked = self.recent == PANIC_LINE;
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
                    self.watch(v);
                }
                let _ = self.serial.write((p - SERIAL_BASE) as u8, v);
                true
            }
            I8042_CMD if v == I8042_RESET => {
                let _ = self.exit.send(GuestExit::Reset);
                true
            }
            I8042_CMD => {
                self.i8042.command(v);
                true
            }
            I8042_DATA => {
                if self.i8042.write_data(v) {
                    let _ = self.exit.send(GuestExit::Reset);
                }
                true
            }
            BOOT_TIMER_PORT if v == BOOT_TIMER_READY => {
                if self.ready.is_none() {
                    let t = self.started.elapsed();
                    self.ready = Some(t);
                    crate::log_line!("guest ready after {} ms", t.as_millis());
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
            // The input buffer always reads empty, so a guest's reset write goes through.
            I8042_CMD => self.i8042.status(),
            I8042_DATA => self.i8042.read_data(),
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

    fn bus(out: Box<dyn Write + Send>) -> (LegacyBus, mpsc::Receiver<GuestExit>) {
        let (tx, rx) = mpsc::channel();
        let bus = LegacyBus::new(EventFd::new(0).unwrap(), out, tx, Instant::now());
        (bus, rx)
    }

    fn print(bus: &mut LegacyBus, s: &[u8]) {
        for b in s {
            bus.write(SERIAL_BASE, &[*b]);
        }
    }

    /// The panic line is recognised wherever the output splits it, near misses are not, and
    /// once seen it stays seen through any amount of output after it.
    #[test]
    fn the_panic_line_is_sticky() {
        let (mut bus, _rx) = bus(Box::new(std::io::sink()));
        print(
            &mut bus,
            b"Kernel pani\nKernel  panic\nKernel_panic\nkernel panic\n",
        );
        assert!(!bus.saw_panic());
        print(&mut bus, b"KKernel");
        print(&mut bus, b" pan");
        assert!(!bus.saw_panic());
        print(&mut bus, b"ic - not syncing: VFS\n");
        assert!(bus.saw_panic());
        for i in 0..20_000 {
            print(
                &mut bus,
                format!(" [<ffffffff8100{i:04x}>] dump_stack+0x{i:x}\n").as_bytes(),
            );
        }
        assert!(bus.saw_panic());
    }

    /// The i8042 answers a Linux probe the way the driver asks: nothing to flush, the CTR read
    /// twice the same, written back and read again, the self-test passed; a reset through the
    /// output port works as one through 0xfe; bytes for the absent keyboard are dropped.
    #[test]
    fn the_i8042_answers_a_probe() {
        let (mut bus, rx) = bus(Box::new(std::io::sink()));
        let inb = |bus: &mut LegacyBus, port| {
            let mut d = [0u8; 1];
            bus.read(port, &mut d);
            d[0]
        };
        assert_eq!(inb(&mut bus, 0x64) & I8042_STR_OBF, 0, "nothing to flush");
        for _ in 0..2 {
            assert!(bus.write(0x64, &[0x20]));
            assert_eq!(inb(&mut bus, 0x64) & I8042_STR_OBF, I8042_STR_OBF);
            assert_eq!(inb(&mut bus, 0x60), I8042_CTR_DEFAULT);
            assert_eq!(inb(&mut bus, 0x64) & I8042_STR_OBF, 0);
        }
        assert!(bus.write(0x64, &[0x60]));
        assert_eq!(inb(&mut bus, 0x64) & I8042_STR_CMDDAT, I8042_STR_CMDDAT);
        assert!(bus.write(0x60, &[0x65]));
        bus.write(0x64, &[0x20]);
        assert_eq!(inb(&mut bus, 0x60), 0x65);
        bus.write(0x64, &[0xad]);
        bus.write(0x64, &[0x20]);
        assert_eq!(inb(&mut bus, 0x60), 0x65 | I8042_CTR_KBDDIS);
        bus.write(0x64, &[0xaa]);
        assert_eq!(inb(&mut bus, 0x60), 0x55);
        // A byte for the keyboard changes nothing.
        assert!(bus.write(0x60, &[0xf2]));
        assert_eq!(inb(&mut bus, 0x64) & I8042_STR_OBF, 0);
        bus.write(0x64, &[0x20]);
        assert_eq!(inb(&mut bus, 0x60), 0x65 | I8042_CTR_KBDDIS);
        assert!(rx.try_recv().is_err());
        // The output port written with its reset line (bit 0) high is no reset; low is one.
        bus.write(0x64, &[0xd1]);
        bus.write(0x60, &[0x03]);
        assert!(rx.try_recv().is_err());
        bus.write(0x64, &[0xd1]);
        bus.write(0x60, &[0x02]);
        assert_eq!(rx.try_recv().unwrap(), GuestExit::Reset);
    }

    /// The serial log stops at its cap, with one line that says so, and the guest's serial
    /// port goes on working (and the panic watch too).
    #[test]
    fn the_serial_log_is_capped() {
        let out = Shared::default();
        let mut w = CappedWriter::new(out.clone(), 10);
        w.write_all(b"0123456").unwrap();
        w.write_all(b"789abc").unwrap();
        w.write_all(b"more").unwrap();
        w.flush().unwrap();
        let got = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            got,
            "0123456789\n[husk-vmm: serial log truncated after 10 bytes; further output is dropped]\n"
        );

        let out = Shared::default();
        let (mut bus, rx) = bus(Box::new(CappedWriter::new(out.clone(), 1000)));
        for _ in 0..100 {
            print(&mut bus, &[b'x'; 100]);
        }
        print(&mut bus, b"Kernel panic");
        let len = out.0.lock().unwrap().len();
        assert!(len < 1100, "the log grew to {len} bytes");
        assert!(bus.saw_panic());
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(rx.try_recv().unwrap(), GuestExit::Reset);
    }
}
