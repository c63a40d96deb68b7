//! What the device sends frames to and receives them from: a file descriptor that carries one
//! frame (with its 12-byte virtio-net header in front) per `readv`/`writev`, read and written
//! without blocking. A tap is the real one; a Unix datagram socket stands in for it where no
//! tap can be had (unit tests, the fuzzer).

use std::{
    io,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
    sync::{Arc, Mutex},
};

/// A frame backend.
pub trait NetBackend: AsRawFd + Send + std::fmt::Debug {
    /// Tells the backend which offloads the guest takes on the frames it receives (`TUN_F_*`
    /// bits): with none, every frame reaches the guest whole and checksummed.
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}

/// One end of a Unix datagram socket pair as a frame backend: each datagram is one frame with
/// its header. The other end is the "network" a test or fuzzer plays.
#[derive(Debug)]
pub struct SocketBackend {
    sock: OwnedFd,
    /// Every `set_offload` call, in order.
    pub offloads: Arc<Mutex<Vec<u32>>>,
}

impl SocketBackend {
    /// A backend and the network's end of it; both nonblocking.
    pub fn pair() -> io::Result<(SocketBackend, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        let backend = SocketBackend {
            sock: OwnedFd::from(a),
            offloads: Arc::default(),
        };
        Ok((backend, b))
    }
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tun_flags);
        Ok(())
    }
}

/// No network: a socket pair whose other end nobody reads (the NIC of a VM template, whose
/// guest keeps the link down). Frames the guest would send wait in the socket's buffer;
/// none ever arrives.
#[derive(Debug)]
pub struct Unconnected {
    backend: SocketBackend,
    _network: UnixDatagram,
}

impl Unconnected {
    pub fn new() -> io::Result<Unconnected> {
        let (backend, network) = SocketBackend::pair()?;
        Ok(Unconnected {
            backend,
            _network: network,
        })
    }
}

impl AsRawFd for Unconnected {
    fn as_raw_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }
}

impl NetBackend for Unconnected {
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}
