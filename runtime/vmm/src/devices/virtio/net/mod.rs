//! virtio-net over a tap: the guest's frames go to the tap and the tap's frames to the guest,
//! each with its 12-byte virtio-net header, copied once by the kernel between the tap and the
//! guest's own buffers (one `readv` or `writev` per frame over the chain's buffers).
//!
//! - Features: VERSION_1, MAC and MTU (in config space), STATUS (link always up), the
//!   checksum and TCP segmentation offloads both ways (CSUM, HOST_TSO4/6, HOST_ECN for what
//!   the guest sends; GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN for what it receives, applied to
//!   the tap with `TUNSETOFFLOAD` from what the guest acked), and MRG_RXBUF (one frame over
//!   several receive chains, so a guest with page-sized buffers still takes 64 KiB frames).
//!   UFO is left out both ways: Linux dropped UDP fragmentation offload (a tap ignores
//!   `TUN_F_UFO`, and a guest kernel never sends it).
//! - Receive: when the tap has a frame and the guest has buffers, the frame is read into
//!   them. With no buffers the device stops watching the tap, and frames wait in the tap's
//!   queue until the guest's next notify.
//! - Transmit: each chain is checked (direction, guest memory, length, offloads the guest
//!   acked) and written to the tap as it is; a tap that would block keeps the chain at the
//!   head of the ring, and the device watches the tap for room, so frames keep their order.
//! - Everything runs on the thread that notifies (a vCPU) or on the I/O thread for tap
//!   events; nothing polls.
//!
//! The parts: `frame` (the header, the chain checks, the `readv`/`writev`), `backend` (what
//! the device talks to, a trait, and a socket stand-in for tests and the fuzzer), `tap`
//! (the real one), `device` (the virtio device).

mod backend;
mod device;
mod frame;
mod tap;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use backend::{NetBackend, SocketBackend, Unconnected};
pub use device::{Net, NetStats};
pub use frame::{
    rx_chain, tx_chain, ChainError, TxRules, VnetHdr, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6,
    MAX_GSO_FRAME, VNET_HDR_LEN,
};
pub use tap::{Tap, TapError};

use virtio_bindings::virtio_net as vn;

/// Feature bits, as the device offers them.
pub const F_CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
pub const F_GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
pub const F_MTU: u64 = 1 << vn::VIRTIO_NET_F_MTU;
pub const F_MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
pub const F_GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
pub const F_GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
pub const F_GUEST_ECN: u64 = 1 << vn::VIRTIO_NET_F_GUEST_ECN;
pub const F_HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
pub const F_HOST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO6;
pub const F_HOST_ECN: u64 = 1 << vn::VIRTIO_NET_F_HOST_ECN;
pub const F_MRG_RXBUF: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;
pub const F_STATUS: u64 = 1 << vn::VIRTIO_NET_F_STATUS;

/// Errors setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Creating the device's epoll set over the tap.
    #[error("watching the tap")]
    Epoll(#[source] std::io::Error),
}
