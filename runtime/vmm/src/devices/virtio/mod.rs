//! virtio devices over the virtio-mmio transport (version 2).

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The interrupt line of a device: an irqfd plus the InterruptStatus bits.
#[derive(Debug)]
pub struct IrqLine {
    pub evt: EventFd,
    status: AtomicU32,
}

impl IrqLine {
    pub fn new(evt: EventFd) -> Arc<Self> {
        Arc::new(IrqLine {
            evt,
            status: AtomicU32::new(0),
        })
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used(&self) {
        self.status.fetch_or(1, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Tells the driver the configuration changed.
    pub fn signal_config(&self) {
        self.status.fetch_or(2, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A virtio device behind the mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, 19 vsock).
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The features the driver accepted (a subset of [`features`](Self::features)), told
    /// just before [`activate`](Self::activate).
    fn ack_features(&mut self, _acked: u64) {}
    /// The driver set DRIVER_OK: the device may use the queues.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// A file descriptor to poll for backend events, if the device has any.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Handles backend events (when `backend_fd` is readable).
    fn process_backend(&mut self) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Gives a block device a new backing file (Firecracker's drive update).
    fn update_backing(&mut self, _path: &std::path::Path) -> Result<(), String> {
        Err("not a block device".into())
    }
    /// Puts an image layer on a layered drive; returns its byte range.
    fn add_layer(&mut self, _path: &std::path::Path) -> Result<std::ops::Range<u64>, String> {
        Err("not a block device".into())
    }
    /// Takes the layer that starts at byte `start` off a layered drive.
    fn remove_layer(&mut self, _start: u64) -> Result<(), String> {
        Err("not a block device".into())
    }
}
