//! Devices: the legacy port-I/O ones and virtio-mmio (block, vsock, net).

pub mod legacy;
pub mod ratelimit;
pub mod virtio;
