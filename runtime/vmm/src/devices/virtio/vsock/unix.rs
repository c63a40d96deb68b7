//! The hybrid-vsock side on the host, over Unix sockets: the listener on `uds` where host
//! peers connect and ask for a guest port with a `CONNECT <port>\n` line, and the connects
//! to `<uds>_P` for the guest's connections to host port P.

use std::{
    collections::HashMap,
    ffi::OsString,
    io::{ErrorKind, Read},
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::{
            ffi::OsStrExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{muxer::MAX_CONNS, VsockError};
use crate::{devices::ratelimit::LogLimiter, poll::watch};

/// A connection accepted on `uds`, waiting for its `CONNECT <port>` line.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The Unix socket `uds` host peers connect to, and the connections accepted on it that
/// have not said which guest port they want yet. The socket file goes when this does.
#[derive(Debug)]
pub(super) struct HostListener {
    /// The socket's path, removed at the end.
    uds: PathBuf,
    /// Where `<ports_base>_<port>` host listeners are looked for: `uds`, or its path inside
    /// the VMM's jail.
    ports_base: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, Pending>,
    accept_log: LogLimiter,
}

impl HostListener {
    /// Listens on `uds` (replacing a stale socket file).
    pub(super) fn bind(uds: &Path) -> Result<HostListener, VsockError> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)
            .map_err(|e| VsockError::Listen(uds.display().to_string(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Listen(uds.display().to_string(), e))?;
        Ok(HostListener {
            uds: uds.to_path_buf(),
            ports_base: uds.to_path_buf(),
            listener,
            pending: HashMap::new(),
            accept_log: LogLimiter::default(),
        })
    }

    /// The socket's path inside the VMM's jail: where `<path>_<port>` host listeners are
    /// looked for once jailed (the socket itself is removed by its host path, if the VMM
    /// ends before its jail, or by its caller).
    pub(super) fn ports_at(&mut self, path: PathBuf) {
        self.ports_base = path;
    }

    /// Connects to the host's listener for the guest's connections to host port `port`,
    /// `<uds>_<port>`, without ever waiting.
    pub(super) fn connect_port(&self, port: u32) -> std::io::Result<UnixStream> {
        let mut path = OsString::from(self.ports_base.as_os_str());
        path.push(format!("_{port}"));
        connect_nonblocking(Path::new(&path))
    }

    /// Accepts every waiting host peer, and watches each in `epoll` (its fd the token) for
    /// its CONNECT line.
    pub(super) fn accept_all(&mut self, epoll: &Epoll) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() || self.pending.len() >= MAX_CONNS {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if watch(epoll, fd, EventSet::IN, fd as u64).is_ok() {
                        self.pending.insert(
                            fd,
                            Pending {
                                stream: s,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    if let Some(left_out) = self.accept_log.hit() {
                        tracing::warn!(
                            "vsock accept: {e} ({left_out} more failures since the last warning)"
                        );
                    }
                    break;
                }
            }
        }
    }

    /// Whether `fd` is a host peer that has not sent its CONNECT line yet.
    pub(super) fn is_pending(&self, fd: RawFd) -> bool {
        self.pending.contains_key(&fd)
    }

    /// Reads what came of the pending connection `fd`'s CONNECT line. Once the line is
    /// complete, or the peer went or sent garbage, the connection stops being pending (and
    /// watched in `epoll`): a valid line gives its stream and the guest port it asked for,
    /// to connect to the guest; anything else closes it.
    pub(super) fn read_connect_line(
        &mut self,
        epoll: &Epoll,
        fd: RawFd,
    ) -> Option<(UnixStream, u32)> {
        let p = self.pending.get_mut(&fd)?;
        let mut b = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => {
                    let line = String::from_utf8_lossy(&p.line).into_owned();
                    break line
                        .strip_prefix("CONNECT ")
                        .and_then(|n| n.trim().parse::<u32>().ok());
                }
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() > 64 {
                        break None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let p = self.pending.remove(&fd).expect("present");
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        Some((p.stream, port?))
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Connects a non-blocking stream socket to the Unix socket at `path` without ever waiting:
/// on Linux a Unix-socket connect either completes at once or fails, and with a full
/// listener backlog a non-blocking one fails with EAGAIN (instead of sleeping until the
/// listener accepts). The caller treats every error as a refusal.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL, and no NUL inside (it would name another socket).
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns; the stream closes it on drop,
    // also on the error path below.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call, and `len` does not
    // exceed its size (checked above).
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::devices::virtio::vsock::{
        muxer::Muxer,
        packet::{OP_REQUEST, OP_RESPONSE},
        test_utils::{hdr, host_peer},
    };

    #[test]
    fn host_connect_line_makes_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Muxer::new(3, &uds).unwrap();
        let mut c = host_peer(&mut v, &uds, 1024);
        let req = v.ctrl.pop_front().expect("a REQUEST");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, 3));
        // The guest accepts: the host reads OK <port>.
        let mut resp = hdr(OP_RESPONSE, 1024, req.src_port, 0);
        resp.dst_port = req.src_port;
        v.handle_guest_packet(resp, &[]);
        let mut line = [0u8; 64];
        let n = c.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        // Garbage instead of CONNECT closes the connection without a request.
        let mut g = UnixStream::connect(&uds).unwrap();
        g.write_all(b"HELLO\n").unwrap();
        for _ in 0..10 {
            v.handle_host_events();
        }
        assert!(v.ctrl.is_empty());
        let mut b = [0u8; 1];
        assert_eq!(g.read(&mut b).unwrap(), 0);
        drop(v);
        assert!(!uds.exists(), "the socket file is removed");
    }

    #[test]
    fn nonblocking_connect_refuses_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connect_nonblocking(&dir.path().join("nobody")).is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).map(|_| ()).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let p = dir.path().join("ok");
        let l = UnixListener::bind(&p).unwrap();
        let mut s = connect_nonblocking(&p).unwrap();
        let (mut a, _) = l.accept().unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        a.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // The stream is non-blocking.
        assert_eq!(
            s.read(&mut b).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock)
        );
    }
}
