//! virtio-vsock emulated in user space, with the hybrid-vsock (Firecracker) convention on the
//! host side:
//! - the host connects to the Unix socket `uds`, writes `CONNECT <port>\n`, and once the guest
//!   accepts gets `OK <hostport>\n`; then bytes flow to the guest listener on `port`;
//! - a guest connection to CID 2 port P is forwarded to the Unix socket `<uds>_P`. The
//!   connect never blocks (the device runs on a vCPU or the I/O thread, under the device
//!   lock): a listener whose backlog is full refuses the guest with RST at once, as a port
//!   nobody listens on does, and the guest may retry.
//!
//! Flow control is virtio's credit scheme: we never send the guest more than it said it has
//! room for (buf_alloc - (rx_cnt - fwd_cnt)), and we advertise [`BUF_ALLOC`] of our own,
//! keeping at most that much of the guest's data per connection while the host reader is slow.
//! The host's data is not buffered at all: it stays in the host socket until the guest has an
//! RX buffer and credit for it, and is read straight into that buffer.
//! Everything from the guest is bounded: packet sizes, connection buffers, the control queue,
//! and the warnings it can trigger (rate-limited, see
//! [`LogLimiter`](crate::devices::ratelimit::LogLimiter)).
//!
//! The parts, from the guest's buffers to the host's sockets:
//! - `device`: the virtio device ([`Vsock`]): its queues, taking packets off the TX ring and
//!   filling RX buffers, interrupts;
//! - `packet`: the packet header ([`Header`]), and packets in and out of guest buffers;
//! - `muxer`: the connection table, the epoll set of every host socket, and what goes to the
//!   guest next (control packets first, then each connection with data in turn);
//! - `connection`: one connection's state machine and credit, which tells the muxer what to do;
//! - `unix`: the hybrid side on the host: the listener on `uds`, `CONNECT` lines, and connects
//!   to `<uds>_P`.

mod connection;
mod device;
mod muxer;
mod packet;
mod unix;

pub use connection::BUF_ALLOC;

/// The most host sockets the device holds at once: its connections, and the host peers it
/// accepted that have not sent their `CONNECT` line yet.
pub const MAX_HOST_SOCKETS: usize = 2 * muxer::MAX_CONNS;
pub use device::Vsock;
pub use packet::{
    Header, HDR_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN,
};

/// Errors setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("listening on the vsock socket {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("creating the vsock event loop")]
    Epoll(#[source] std::io::Error),
}

/// What the tests of several parts share.
#[cfg(test)]
mod test_utils {
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::{
        muxer::Muxer,
        packet::{Header, HOST_CID, TYPE_STREAM},
    };

    /// A guest-to-host packet header from guest CID 3, with a 64 KiB buffer and nothing
    /// forwarded yet.
    pub(super) fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            typ: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// A host peer on muxer `v`'s socket `uds` that asked for guest port `port` with its
    /// CONNECT line, read by the muxer (a REQUEST for the guest is queued).
    pub(super) fn host_peer(v: &mut Muxer, uds: &std::path::Path, port: u32) -> UnixStream {
        use std::io::Write;
        let mut c = UnixStream::connect(uds).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        for _ in 0..10 {
            v.handle_host_events();
        }
        c
    }

    /// A muxer for guest CID 3 on a fresh socket, with a host listener on port `port`.
    pub(super) fn muxer_with_listener(port: u32) -> (tempfile::TempDir, Muxer, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let v = Muxer::new(3, &uds).unwrap();
        let l = UnixListener::bind(format!("{}_{port}", uds.display())).unwrap();
        (dir, v, l)
    }
}
