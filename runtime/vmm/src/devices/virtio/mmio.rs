//! The virtio-mmio transport, version 2: registers, feature negotiation, queue setup.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{IrqLine, VirtioDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b53_5548; // "HUSK"

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

/// One device's mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
    /// The queues as the driver set them up, kept at activation (the device owns them then).
    set_up: Vec<QueueSetup>,
}

/// One queue as the driver set it up through the transport's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetup {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// What a snapshot keeps of a transport: its registers and its queues' setup. Where each
/// queue stood is not kept: a device at rest has given back every chain it took, so the
/// used ring's index in guest memory is both where the device goes on reading the available
/// ring and where it goes on writing the used one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub activated: bool,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSetup>,
    /// The device's own (see [`VirtioDevice::saved_state`]).
    #[serde(default)]
    pub device: serde_json::Value,
}

/// Why a transport's state cannot be put back onto a device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the state is of a device of type {saved}, not {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("the state has {saved} queues, the device {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("the state acks features {acked:#x} the device does not offer ({offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("queue {0}: {1}")]
    Queue(usize, String),
    #[error("the device's state: {0}")]
    Device(String),
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
            set_up: Vec::new(),
        }
    }

    /// Raises again the interrupts the transport has pending: on a restored VM, once its
    /// vCPUs' and interrupt controllers' states are back (which would undo one raised
    /// before). The driver reads the interrupt status, so a second one is harmless.
    pub fn resignal(&self) {
        let status = self.irq.status();
        if status & 1 != 0 {
            self.irq.signal_used();
        }
        if status & 2 != 0 {
            self.irq.signal_config();
        }
    }

    /// The transport's state, for a snapshot of a VM at rest (see [`MmioState`]).
    pub fn state(&self) -> MmioState {
        let queues = if self.activated {
            self.set_up.clone()
        } else {
            self.queues.iter().map(QueueSetup::of).collect()
        };
        MmioState {
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            activated: self.activated,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            queues,
            device: self.device.saved_state(),
        }
    }

    /// A transport for `device` as `state` left one: its registers back, and, if it was
    /// activated, the device activated on queues that go on from the used rings' indexes
    /// in `mem` (restored guest memory), with the features the driver had acked.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqLine>,
        state: &MmioState,
    ) -> Result<Self, RestoreError> {
        let (saved, type_) = (state.device_type, device.device_type());
        if saved != type_ {
            return Err(RestoreError::DeviceType {
                saved,
                device: type_,
            });
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let offered = device.features();
        if state.driver_features & !offered != 0 {
            return Err(RestoreError::Features {
                acked: state.driver_features,
                offered,
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (setup, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            let mut q = Queue::new(max).expect("queue sizes are powers of two");
            q.set_size(setup.size);
            q.set_desc_table_address(
                Some(setup.desc_table as u32),
                Some((setup.desc_table >> 32) as u32),
            );
            q.set_avail_ring_address(
                Some(setup.avail_ring as u32),
                Some((setup.avail_ring >> 32) as u32),
            );
            q.set_used_ring_address(
                Some(setup.used_ring as u32),
                Some((setup.used_ring >> 32) as u32),
            );
            q.set_ready(setup.ready);
            if state.activated && setup.ready {
                if !q.is_valid(&mem) {
                    return Err(RestoreError::Queue(i, "not valid in guest memory".into()));
                }
                let idx: u16 = mem
                    .read_obj(GuestAddress(setup.used_ring + 2))
                    .map(u16::from_le)
                    .map_err(|e| RestoreError::Queue(i, format!("reading its used index: {e}")))?;
                q.set_next_avail(idx);
                q.set_next_used(idx);
            }
            queues.push(q);
        }
        let mut device = device;
        device
            .restore_state(&state.device)
            .map_err(RestoreError::Device)?;
        let mut t = MmioTransport::new(device, mem, irq);
        t.queue_sel = state.queue_sel;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.status = state.status;
        t.config_generation = state.config_generation;
        if state.interrupt_status & 1 != 0 {
            t.irq.signal_used();
        }
        if state.interrupt_status & 2 != 0 {
            t.irq.signal_config();
        }
        if state.activated {
            t.activated = true;
            t.set_up = state.queues.clone();
            t.device.ack_features(t.driver_features);
            t.device.activate(t.mem.clone(), queues, t.irq.clone());
        } else {
            t.queues = queues;
        }
        Ok(t)
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("queue sizes are powers of two"))
            .collect()
    }

    /// The driver's status register (ACKNOWLEDGE 1, DRIVER 2, DRIVER_OK 4, FEATURES_OK 8,
    /// FAILED 128): how far the guest got with this device.
    pub fn driver_status(&self) -> u32 {
        self.status
    }

    /// What the device moved (see [`super::VirtioDevice::io_counters`]).
    pub fn io_counters(&self) -> Option<super::IoCounters> {
        self.device.io_counters()
    }

    /// The device, e.g. for backend events and drive updates.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Marks a configuration change (the config generation moves, the driver is told).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.signal_config();
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.queue().map_or(0, |q| q.max_size() as u32),
            0x044 => self.queue().map_or(0, |q| q.ready() as u32),
            0x060 => self.irq.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // No device here has writable configuration.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let setting_up = !self.activated;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if setting_up => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                // Only what the device offers can be accepted.
                let accepted = ((v as u64) << shift) & self.device.features();
                self.driver_features |= accepted;
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if setting_up => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 if setting_up => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 if self.activated => self.device.queue_notify(v as u16),
            0x064 => self.irq.ack(v),
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setting_up => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(low, high),
                        0x090 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            // Reset.
            self.device.reset();
            self.queues = Self::fresh_queues(self.device.as_ref());
            self.status = 0;
            self.activated = false;
            self.driver_features = 0;
            self.irq.ack(u32::MAX);
            return;
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && !self.activated {
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                self.status |= STATUS_FAILED;
                return;
            }
            self.activated = true;
            self.set_up = self.queues.iter().map(QueueSetup::of).collect();
            let queues = std::mem::take(&mut self.queues);
            self.queues = Self::fresh_queues(self.device.as_ref());
            self.device.ack_features(self.driver_features);
            self.device
                .activate(self.mem.clone(), queues, self.irq.clone());
        }
    }
}

impl QueueSetup {
    fn of(q: &Queue) -> QueueSetup {
        QueueSetup {
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy(Vec<u16>, std::sync::Arc<std::sync::atomic::AtomicU32>);
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn activate(&mut self, _: GuestMemoryMmap, q: Vec<Queue>, _: Arc<IrqLine>) {
            self.1
                .store(q.len() as u32, std::sync::atomic::Ordering::SeqCst);
        }
        fn queue_notify(&mut self, _: u16) {}
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// Sets up queues 0 and 1 (each offered at 16, driven at 8) as a driver does, at their
    /// own ring addresses, then DRIVER_OK.
    fn set_up_two_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            t.write(0x30, &q.to_le_bytes());
            assert_eq!(r(t, 0x34), 16);
            t.write(0x38, &8u32.to_le_bytes());
            t.write(0x80, &(0x1000 * (q + 1)).to_le_bytes());
            t.write(0x90, &(0x4000 + 0x1000 * q).to_le_bytes());
            t.write(0xa0, &(0x8000 + 0x1000 * q).to_le_bytes());
            t.write(0x44, &1u32.to_le_bytes());
        }
        t.write(0x70, &(1 | 2 | 8 | 4u32).to_le_bytes());
    }

    #[test]
    fn negotiation_and_activation() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut t = MmioTransport::new(
            Box::new(Dummy(vec![16, 16], activated.clone())),
            mem,
            IrqLine::new(EventFd::new(0).unwrap()),
        );
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        t.write(0x14, &1u32.to_le_bytes());
        assert_eq!(r(&mut t, 0x10), 1);
        // The driver cannot accept a feature that was not offered.
        t.write(0x24, &0u32.to_le_bytes());
        t.write(0x20, &0xffu32.to_le_bytes());
        assert_eq!(t.driver_features, 1);
        set_up_two_queues(&mut t);
        assert_eq!(activated.load(std::sync::atomic::Ordering::SeqCst), 2);
        let mut c = [0u8; 2];
        t.read(0x100, &mut c);
        assert_eq!(c, [7, 7]);
        // Odd-sized register accesses are ignored, not fatal.
        let mut odd = [1u8; 2];
        t.read(0x10, &mut odd);
        assert_eq!(odd, [0, 0]);
        // A queue outside guest memory fails activation instead of being used.
        let activated = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t = MmioTransport::new(
            Box::new(Dummy(vec![16], activated.clone())),
            mem,
            IrqLine::new(EventFd::new(0).unwrap()),
        );
        t.write(0x38, &8u32.to_le_bytes());
        t.write(0x80, &0xffff_0000u32.to_le_bytes());
        t.write(0x44, &1u32.to_le_bytes());
        t.write(0x70, &(1 | 2 | 8 | 4u32).to_le_bytes());
        assert_eq!(activated.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_ne!(r(&mut t, 0x70) & STATUS_FAILED, 0);
    }

    /// A device that records the queues it is activated on: (size, next avail, next used,
    /// descriptor table), and the features acked.
    type Seen = std::sync::Arc<std::sync::Mutex<(Vec<(u16, u16, u16, u64)>, u64)>>;
    struct Recorder(Seen);
    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn ack_features(&mut self, acked: u64) {
            self.0.lock().unwrap().1 = acked;
        }
        fn activate(&mut self, _: GuestMemoryMmap, queues: Vec<Queue>, _: Arc<IrqLine>) {
            self.0.lock().unwrap().0 = queues
                .iter()
                .map(|q| (q.size(), q.next_avail(), q.next_used(), q.desc_table()))
                .collect();
        }
        fn queue_notify(&mut self, _: u16) {}
    }

    #[test]
    fn a_transport_saved_at_rest_goes_on_where_its_queues_stood() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = || IrqLine::new(EventFd::new(0).unwrap());
        let seen = Seen::default();
        let mut t = MmioTransport::new(Box::new(Recorder(seen.clone())), mem.clone(), irq());
        for (sel, v) in [(0u32, 1u32), (1, 1)] {
            t.write(0x24, &sel.to_le_bytes());
            t.write(0x20, &v.to_le_bytes());
        }
        set_up_two_queues(&mut t);
        assert_eq!(
            seen.lock().unwrap().0,
            [(8, 0, 0, 0x1000), (8, 0, 0, 0x2000)]
        );
        // The device used 5 chains of queue 0 and 2 of queue 1 (the used rings' indexes).
        mem.write_obj(5u16.to_le(), GuestAddress(0x8000 + 2))
            .unwrap();
        mem.write_obj(2u16.to_le(), GuestAddress(0x9000 + 2))
            .unwrap();
        t.config_changed();

        let json = serde_json::to_string(&t.state()).unwrap();
        let state: MmioState = serde_json::from_str(&json).unwrap();
        let seen = Seen::default();
        let mut back =
            MmioTransport::restore(Box::new(Recorder(seen.clone())), mem.clone(), irq(), &state)
                .unwrap();
        assert_eq!(back.state(), state);
        let features = super::super::VIRTIO_F_VERSION_1 | 1;
        assert_eq!(
            *seen.lock().unwrap(),
            (vec![(8, 5, 5, 0x1000), (8, 2, 2, 0x2000)], features)
        );
        assert_eq!(r(&mut back, 0x70), 15);
        assert_eq!(r(&mut back, 0xfc), 1);
        assert_eq!(
            r(&mut back, 0x60) & 2,
            2,
            "the config change is still pending"
        );

        // A state that does not fit the device is refused.
        let refused = |f: &dyn Fn(&mut MmioState)| {
            let mut s = state.clone();
            f(&mut s);
            MmioTransport::restore(Box::new(Recorder(Seen::default())), mem.clone(), irq(), &s)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&|s| s.device_type = 2).contains("type 2"));
        assert!(refused(&|s| s.driver_features |= 1 << 40).contains("does not offer"));
        assert!(refused(&|s| {
            s.queues.pop();
        })
        .contains("1 queues"));
        assert!(refused(&|s| s.queues[1].used_ring = 0xffff_0000).contains("queue 1"));
    }
}
