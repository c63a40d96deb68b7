//! The devices of a VM: each virtio device behind its virtio-mmio window and interrupt, and
//! the buses a vCPU's exits reach (port I/O to the legacy devices, MMIO to the windows).

use std::{
    os::fd::RawFd,
    sync::{Arc, Mutex, MutexGuard},
};

use vmm_sys_util::eventfd::EventFd;

use crate::{
    arch::layout,
    devices::{
        legacy::LegacyBus,
        virtio::{
            mmio::{MmioState, MmioTransport},
            IrqLine, VirtioDevice,
        },
    },
    vstate::vm::{Vm, VmError},
};

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Creating a device's interrupt eventfd.
    #[error("an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Registering a device's interrupt with KVM.
    #[error(transparent)]
    Irqfd(#[from] VmError),
    /// The devices do not match the snapshot's, or one's state cannot be put back.
    #[error("restoring the devices: {0}")]
    Restore(String),
}

/// Locks a device, also one whose previous user panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Virtio devices with their ids (drive ids, "vsock"), in the order of their windows.
pub type NamedDevices = Vec<(String, Box<dyn VirtioDevice>)>;

/// The virtio-mmio devices of a VM by id, in window order.
pub(crate) type Transports = Arc<Vec<(String, Arc<Mutex<MmioTransport>>)>>;

/// The virtio-mmio devices of a VM, wired up.
pub(crate) struct DeviceManager {
    pub(crate) transports: Transports,
    /// Backend fds to poll, with the index of their device.
    pub(crate) backend_fds: Vec<(RawFd, usize)>,
    /// The `virtio_mmio.device=` kernel arguments that announce them.
    pub(crate) cmdline: Vec<String>,
}

impl DeviceManager {
    /// Puts each device behind a virtio-mmio window: device `i` at
    /// `layout::MMIO_BASE + i * layout::MMIO_SIZE`, its interrupt on GSI
    /// `layout::MMIO_IRQ_BASE + i`.
    pub(crate) fn attach(
        vm: &Vm,
        devices: NamedDevices,
    ) -> Result<DeviceManager, DeviceManagerError> {
        DeviceManager::attach_with(vm, devices, |_, dev, mem, irq| {
            Ok(MmioTransport::new(dev, mem, irq))
        })
    }

    /// [`DeviceManager::attach`] for a VM restored from a snapshot: each device takes the
    /// state its transport had in the snapshot, which must hold the same devices (ids and
    /// types) in the same order.
    pub(crate) fn attach_restored(
        vm: &Vm,
        devices: NamedDevices,
        states: &[(String, MmioState)],
    ) -> Result<DeviceManager, DeviceManagerError> {
        let ids = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>().join(",");
        let (now, saved) = (
            ids(devices.iter().map(|(id, _)| id).collect()),
            ids(states.iter().map(|(id, _)| id).collect()),
        );
        if now != saved {
            return Err(DeviceManagerError::Restore(format!(
                "the VM has the devices [{now}], its snapshot [{saved}]"
            )));
        }
        DeviceManager::attach_with(vm, devices, |i, dev, mem, irq| {
            let (id, state) = &states[i];
            MmioTransport::restore(dev, mem, irq, state)
                .map_err(|e| DeviceManagerError::Restore(format!("device {id}: {e}")))
        })
    }

    fn attach_with(
        vm: &Vm,
        devices: NamedDevices,
        mut transport: impl FnMut(
            usize,
            Box<dyn VirtioDevice>,
            vm_memory::GuestMemoryMmap,
            Arc<IrqLine>,
        ) -> Result<MmioTransport, DeviceManagerError>,
    ) -> Result<DeviceManager, DeviceManagerError> {
        let mut transports = Vec::new();
        let mut backend_fds = Vec::new();
        let mut cmdline = Vec::new();
        for (i, (id, dev)) in devices.into_iter().enumerate() {
            let base = layout::MMIO_BASE + i as u64 * layout::MMIO_SIZE;
            let gsi = layout::MMIO_IRQ_BASE + i as u32;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
            vm.register_irqfd(&evt, gsi)?;
            cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            if let Some(fd) = dev.backend_fd() {
                backend_fds.push((fd, i));
            }
            let t = transport(i, dev, vm.mem.clone(), IrqLine::new(evt))?;
            transports.push((id, Arc::new(Mutex::new(t))));
        }
        Ok(DeviceManager {
            transports: Arc::new(transports),
            backend_fds,
            cmdline,
        })
    }
}

/// The device index and offset of an MMIO address, if it falls in a device window.
fn mmio_slot(addr: u64, count: usize) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(layout::MMIO_BASE)?;
    let i = (rel / layout::MMIO_SIZE) as usize;
    (i < count).then_some((i, rel % layout::MMIO_SIZE))
}

/// What a vCPU's I/O exits reach: the port-I/O devices and the virtio-mmio windows.
#[derive(Clone)]
pub struct DeviceBus {
    legacy: Arc<Mutex<LegacyBus>>,
    transports: Transports,
}

impl std::fmt::Debug for DeviceBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBus")
            .field("mmio_devices", &self.transports.len())
            .finish()
    }
}

impl DeviceBus {
    pub(crate) fn new(legacy: Arc<Mutex<LegacyBus>>, transports: Transports) -> DeviceBus {
        DeviceBus { legacy, transports }
    }

    pub(crate) fn pio_write(&self, port: u16, data: &[u8]) {
        lock(&self.legacy).write(port, data);
    }

    pub(crate) fn pio_read(&self, port: u16, data: &mut [u8]) {
        lock(&self.legacy).read(port, data)
    }

    /// A read outside every device window reads as zeroes.
    pub(crate) fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match mmio_slot(addr, self.transports.len()) {
            Some((i, off)) => lock(&self.transports[i].1).read(off, data),
            None => data.fill(0),
        }
    }

    /// A write outside every device window is dropped.
    pub(crate) fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((i, off)) = mmio_slot(addr, self.transports.len()) {
            lock(&self.transports[i].1).write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_addresses_map_to_devices() {
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x70, 2), Some((0, 0x70)));
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x1100, 2), Some((1, 0x100)));
        assert_eq!(mmio_slot(layout::MMIO_BASE + 0x2000, 2), None);
        assert_eq!(mmio_slot(0x1000, 2), None);
    }
}
