//! Stdio of container processes, streamed over one connection per stream.
//!
//! For each process the agent keeps the host side of its stdio (pipe ends, or a pty master)
//! and one pump task per stream. A pump waits until the client attaches a connection through
//! the stdio listener (see `agent.proto`), then copies bytes. Until then the process's output
//! stays in its pipe, and the process blocks once the pipe is full: nothing is lost.
//! An output pump reports "drained" once the process has exited and everything it wrote was
//! handed to the connection; `WaitProcess` answers only after that for every attached stream.
//! A stream nobody attached does not hold `WaitProcess` up: its output stays in the pipe, and
//! a later attach still gets all of it.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use husk_proto::{StdioStream, StreamHeader};
use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    pty::{openpty, Winsize},
};
use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{oneshot, watch, Notify},
};

use crate::{container::ProcessIo, reaper::ExitWatch};

/// A connection from the client carrying one stream.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}

/// Why a client's connection could not be attached to its stream.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No stream of that name waits for a connection.
    #[error("no {} stream of container {container_id:?} process {exec_id:?} is waiting (unknown process, stream not opened, or already attached)", stream.as_str())]
    NotWaiting {
        container_id: String,
        exec_id: String,
        stream: StdioStream,
    },
    /// The stream's pump ended (the process was removed) before the connection reached it.
    #[error("the process's stream is gone")]
    Gone,
}

/// Why a terminal could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("TIOCSWINSZ")]
    Ioctl(#[source] io::Error),
}

/// Identifies a stream: container, exec id ("" for init), which stream.
pub type StreamKey = (String, String, StdioStream);

/// A stream waiting for its connection.
#[derive(Debug)]
struct Waiting {
    conn: oneshot::Sender<Box<dyn Conn>>,
    /// For an output stream: cleared on attach, set again by the pump once drained.
    drained: Option<Arc<watch::Sender<bool>>>,
}

/// Streams waiting for their connection.
#[derive(Debug, Default)]
pub struct StreamRegistry {
    waiting: Mutex<HashMap<StreamKey, Waiting>>,
}

impl std::fmt::Debug for dyn Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl StreamRegistry {
    fn add(
        &self,
        key: StreamKey,
        drained: Option<Arc<watch::Sender<bool>>>,
    ) -> oneshot::Receiver<Box<dyn Conn>> {
        let (conn, rx) = oneshot::channel();
        self.lock().insert(key, Waiting { conn, drained });
        rx
    }

    /// Hands `conn` to the pump of the stream named by `header`.
    pub fn attach(&self, header: &StreamHeader, conn: Box<dyn Conn>) -> Result<(), AttachError> {
        self.claim(header)?.deliver(conn)
    }

    /// Takes the stream named by `header` for a connection about to be delivered. From now on
    /// WaitProcess waits for this stream to be drained.
    pub fn claim(&self, header: &StreamHeader) -> Result<Claimed, AttachError> {
        let key = (
            header.container_id.clone(),
            header.exec_id.clone(),
            header.stream,
        );
        let w = self
            .lock()
            .remove(&key)
            .ok_or_else(|| AttachError::NotWaiting {
                container_id: header.container_id.clone(),
                exec_id: header.exec_id.clone(),
                stream: header.stream,
            })?;
        if let Some(d) = &w.drained {
            d.send_replace(false);
        }
        Ok(Claimed(Some(w)))
    }

    /// Forgets the waiting streams of one process, ending their pumps.
    pub fn remove_process(&self, container_id: &str, exec_id: &str) {
        self.lock()
            .retain(|(cid, eid, _), _| cid != container_id || eid != exec_id);
    }

    /// Forgets the waiting streams of a container (all its processes), ending their pumps.
    pub fn remove_container(&self, container_id: &str) {
        self.lock().retain(|(cid, _, _), _| cid != container_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream taken for a connection; dropping it without delivering leaves the pump to drain
/// and discard.
#[derive(Debug)]
pub struct Claimed(Option<Waiting>);

impl Claimed {
    /// Hands the connection to the stream's pump.
    pub fn deliver(mut self, conn: Box<dyn Conn>) -> Result<(), AttachError> {
        let w = self.0.take().expect("delivered once");
        w.conn.send(conn).map_err(|_| {
            if let Some(d) = &w.drained {
                d.send_replace(true);
            }
            AttachError::Gone
        })
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        // Not delivered: the pump sees its attach channel closed, drains, discards and marks
        // the stream drained itself.
        if let Some(w) = self.0.take() {
            drop(w.conn);
        }
    }
}

/// The agent's side of a process's stdio, before the process exists.
#[derive(Debug)]
pub struct HostSide {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    terminal: bool,
}

/// Makes the stdio of a new process: pipes, or a pty when `terminal` (of the size the spec's
/// `process.consoleSize` gives, else 0x0 until a resize). Returns what the engine gives the
/// process and what the agent keeps.
pub fn prepare(
    terminal: bool,
    size: Option<oci_spec::runtime::Box>,
    stdin: bool,
) -> io::Result<(ProcessIo, HostSide)> {
    if terminal {
        let ws = size.map(|b| Winsize {
            ws_row: b.height().min(u16::MAX.into()) as u16,
            ws_col: b.width().min(u16::MAX.into()) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = openpty(ws.as_ref(), None).map_err(io::Error::from)?;
        // Close-on-exec everywhere: the engine dups the child's ends onto 0/1/2 itself, and
        // no other child spawned meanwhile may inherit them (it would delay EOF).
        set_cloexec(&pty.master)?;
        set_cloexec(&pty.slave)?;
        let slave = pty.slave;
        let io = ProcessIo {
            stdin: slave.try_clone()?,
            stdout: slave.try_clone()?,
            stderr: slave,
            terminal: true,
        };
        let stdin = if stdin {
            Some(pty.master.try_clone()?)
        } else {
            None
        };
        Ok((
            io,
            HostSide {
                stdin,
                stdout: pty.master,
                stderr: None,
                terminal: true,
            },
        ))
    } else {
        let (child_in, host_in) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            // std opens files close-on-exec.
            (std::fs::File::open("/dev/null")?.into(), None)
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok((
            ProcessIo {
                stdin: child_in,
                stdout: out_w,
                stderr: err_w,
                terminal: false,
            },
            HostSide {
                stdin: host_in,
                stdout: out_r,
                stderr: Some(err_r),
                terminal: false,
            },
        ))
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// Registers an owned fd with the reactor.
fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns its descriptor: it stays open, and `as_raw_fd` returns the same
    // number, for as long as the `AsyncFd` holds it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(
        fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?,
    );
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// The running stdio of a process.
#[derive(Debug)]
pub struct Streams {
    drained: Vec<watch::Receiver<bool>>,
    close_stdin: Arc<Notify>,
    pty_master: Option<OwnedFd>,
}

impl HostSide {
    /// Registers the process's streams and starts their pumps.
    pub fn start(
        self,
        registry: &StreamRegistry,
        container_id: &str,
        exec_id: &str,
        exited: ExitWatch,
    ) -> io::Result<Streams> {
        let key = |s| (container_id.to_string(), exec_id.to_string(), s);
        let pty_master = if self.terminal {
            Some(self.stdout.try_clone()?)
        } else {
            None
        };
        let close_stdin = Arc::new(Notify::new());
        if let Some(fd) = self.stdin {
            set_nonblocking(&fd)?;
            let attach = registry.add(key(StdioStream::Stdin), None);
            let close = close_stdin.clone();
            let terminal = self.terminal;
            tokio::spawn(pump_stdin(async_fd(fd)?, attach, close, terminal));
        }
        let mut drained = Vec::new();
        let mut outputs = vec![(StdioStream::Stdout, self.stdout)];
        if let Some(e) = self.stderr {
            outputs.push((StdioStream::Stderr, e));
        }
        for (stream, fd) in outputs {
            set_nonblocking(&fd)?;
            // Nothing to deliver until a client attaches.
            let (tx, rx) = watch::channel(true);
            let tx = Arc::new(tx);
            drained.push(rx);
            let attach = registry.add(key(stream), Some(tx.clone()));
            tokio::spawn(pump_output(
                async_fd(fd)?,
                attach,
                exited.clone(),
                tx,
                self.terminal,
            ));
        }
        Ok(Streams {
            drained,
            close_stdin,
            pty_master,
        })
    }
}

impl Streams {
    /// Waits until every attached output stream has carried all the process wrote (call after
    /// it exited).
    pub async fn drained(&self) {
        for d in &self.drained {
            let mut d = d.clone();
            // An error means the pump ended, which it only does once drained or abandoned.
            let _ = d.wait_for(|v| *v).await;
        }
    }

    /// Closes the process's stdin (now, or as soon as a stdin pump is waiting).
    pub fn close_stdin(&self) {
        self.close_stdin.notify_one();
    }

    /// Sets the terminal size; fails if the process has no terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ResizeError> {
        let master = self.pty_master.as_ref().ok_or(ResizeError::NoTerminal)?;
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live,
        // initialized `Winsize` (the same layout as the C struct) for the whole call; the fd is
        // an open pty master owned by `self`.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(ResizeError::Ioctl(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Copies a process's output to its connection, once attached.
async fn pump_output(
    fd: AsyncFd<OwnedFd>,
    attach: oneshot::Receiver<Box<dyn Conn>>,
    mut exited: ExitWatch,
    drained: Arc<watch::Sender<bool>>,
    pty: bool,
) {
    // Until a connection comes, the output waits in the pipe (bounded by the pipe's size).
    // An error: the process was removed before anyone attached; drain and discard.
    let mut conn = attach.await.ok();
    let mut buf = vec![0u8; 64 * 1024];
    let mut exit_seen = false;
    loop {
        match read_now(&fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = c.write_all(&buf[..n]).await {
                        // The client went away: keep draining so the process never blocks.
                        tracing::debug!("stdio client gone: {e}");
                        conn = None;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if exit_seen {
                    if let Some(c) = conn.as_mut() {
                        let _ = c.flush().await;
                    }
                    drained.send_replace(true);
                }
                tokio::select! {
                    r = fd.readable() => match r {
                        Ok(mut g) => g.clear_ready(),
                        Err(e) => { tracing::warn!("stdio poll: {e}"); break; }
                    },
                    r = exited.wait_for(|e| e.is_some()), if !exit_seen => {
                        // Also if the sender is gone: then nobody will report an exit.
                        let _ = r;
                        exit_seen = true;
                    }
                }
            }
            // A pty master reads EIO once every slave fd is closed: that is its EOF.
            Err(e) if pty && e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("stdio read: {e}");
                break;
            }
        }
    }
    if let Some(mut c) = conn {
        let _ = c.flush().await;
        let _ = c.shutdown().await;
    }
    drained.send_replace(true);
}

fn read_now(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.get_ref().as_fd().as_raw_fd(), buf).map_err(io::Error::from)
}

/// Copies the client's bytes to the process's stdin until the client shuts its write half
/// down (then closes the process's stdin) or `close` is notified.
async fn pump_stdin(
    fd: AsyncFd<OwnedFd>,
    attach: oneshot::Receiver<Box<dyn Conn>>,
    close: Arc<Notify>,
    terminal: bool,
) {
    let mut conn = tokio::select! {
        c = attach => match c { Ok(c) => c, Err(_) => return },
        _ = close.notified() => return,
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = tokio::select! {
            r = conn.read(&mut buf) => r.unwrap_or(0),
            _ = close.notified() => 0,
        };
        if n == 0 {
            break;
        }
        if let Err(e) = write_all_fd(&fd, &buf[..n]).await {
            tracing::debug!("stdin write: {e}");
            break;
        }
    }
    if terminal {
        // The pty stays open (it is also the output); an EOT makes a canonical-mode reader
        // see end of input, like ^D typed at a terminal.
        let _ = tokio::time::timeout(Duration::from_secs(1), write_all_fd(&fd, b"\x04")).await;
    }
    // Dropping `fd` closes the write end of the stdin pipe.
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Exit;
    use std::time::SystemTime;
    use tokio::io::AsyncReadExt;

    fn header(stream: StdioStream) -> StreamHeader {
        StreamHeader {
            container_id: "c".into(),
            exec_id: String::new(),
            stream,
        }
    }

    /// Attaches a client connection holding at most `capacity` bytes to `stream` of process
    /// "c"; returns the client's end.
    fn connect(
        registry: &StreamRegistry,
        stream: StdioStream,
        capacity: usize,
    ) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(capacity);
        registry.attach(&header(stream), Box::new(server)).unwrap();
        client
    }

    /// The process exited with status 0.
    fn exit(tx: &watch::Sender<Option<Exit>>) {
        tx.send_replace(Some(Exit {
            status: 0,
            at: SystemTime::now(),
        }));
    }

    // Multi-threaded: the "process" below blocks on a full pipe until the pump reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_written_before_attach_and_exit_all_arrives() {
        let registry = StreamRegistry::default();
        let (io, host) = prepare(false, None, true).unwrap();
        let (exit_tx, exit_rx) = watch::channel(None);
        let streams = host.start(&registry, "c", "", exit_rx).unwrap();
        // The "process" writes 100 KiB, more than a pipe holds: it blocks until the client
        // attaches and the pump reads.
        let out = std::fs::File::from(io.stdout);
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut out = out;
            out.write_all(&vec![b'x'; 100 * 1024]).unwrap();
        });
        drop(io.stderr);
        drop(io.stdin);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut client = connect(&registry, StdioStream::Stdout, 1 << 20);
        let mut eclient = connect(&registry, StdioStream::Stderr, 1024);
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        exit(&exit_tx);
        tokio::time::timeout(Duration::from_secs(10), streams.drained())
            .await
            .expect("drained");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 100 * 1024);
        let mut e = Vec::new();
        eclient.read_to_end(&mut e).await.unwrap();
        assert!(e.is_empty());
        // A second attach of the same stream is refused.
        let (_c, s) = tokio::io::duplex(16);
        assert!(registry
            .attach(&header(StdioStream::Stdout), Box::new(s))
            .is_err());
    }

    /// The ordering WaitProcess relies on: after the exit, `drained` waits until the client's
    /// connection took every byte, not merely until the process is gone.
    #[tokio::test]
    async fn drained_waits_until_the_connection_took_everything() {
        let registry = StreamRegistry::default();
        let (io, host) = prepare(false, None, false).unwrap();
        let (exit_tx, exit_rx) = watch::channel(None);
        let streams = host.start(&registry, "c", "", exit_rx).unwrap();
        // 32 KiB fit in the pipe: the "process" is done at once; the connection holds 1 KiB.
        nix::unistd::write(&io.stdout, &[b'y'; 32 * 1024]).unwrap();
        drop(io);
        let mut client = connect(&registry, StdioStream::Stdout, 1024);
        let _ec = connect(&registry, StdioStream::Stderr, 1024);
        exit(&exit_tx);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), streams.drained())
                .await
                .is_err(),
            "drained while 31 KiB had not reached the connection"
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        tokio::time::timeout(Duration::from_secs(10), streams.drained())
            .await
            .expect("drained once read");
        assert_eq!(reader.await.unwrap(), 32 * 1024);
    }

    #[tokio::test]
    async fn drained_even_if_a_child_keeps_the_pipe_open() {
        let registry = StreamRegistry::default();
        let (io, host) = prepare(false, None, false).unwrap();
        let (exit_tx, exit_rx) = watch::channel(None);
        let streams = host.start(&registry, "c", "", exit_rx).unwrap();
        let mut client = connect(&registry, StdioStream::Stdout, 1024);
        let _ec = connect(&registry, StdioStream::Stderr, 1024);
        nix::unistd::write(&io.stdout, b"hello").unwrap();
        // `io.stdout` stays open, as if a background child inherited it.
        exit(&exit_tx);
        tokio::time::timeout(Duration::from_secs(10), streams.drained())
            .await
            .expect("drained");
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        drop(io);
    }

    #[tokio::test]
    async fn stdin_reaches_the_pipe_and_eof_closes_it() {
        let registry = StreamRegistry::default();
        let (io, host) = prepare(false, None, true).unwrap();
        let (_exit_tx, exit_rx) = watch::channel(None);
        let _streams = host.start(&registry, "c", "", exit_rx).unwrap();
        let mut client = connect(&registry, StdioStream::Stdin, 1024);
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        drop(client);
        let mut f = tokio::fs::File::from_std(std::fs::File::from(io.stdin));
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), f.read_to_end(&mut got))
            .await
            .expect("stdin closed")
            .unwrap();
        assert_eq!(got, b"ping");
    }

    #[tokio::test]
    async fn unknown_stream_is_refused() {
        let registry = StreamRegistry::default();
        let (_c, s) = tokio::io::duplex(16);
        let err = registry
            .attach(&header(StdioStream::Stdin), Box::new(s))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no stdin stream"), "{err}");
    }
}
