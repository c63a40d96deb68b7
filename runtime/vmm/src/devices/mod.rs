//! Devices: the legacy port-I/O ones and virtio-mmio.

pub mod legacy;
pub mod ratelimit;
pub mod virtio;
