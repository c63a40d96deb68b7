//! The agent's listeners: ttrpc API and stdio streams, on vsock or on Unix sockets.

use std::{path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use husk_proto::StreamHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stdio::{Conn, StreamRegistry};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `unix:PATH`: the API on PATH, stdio on PATH.stdio.
    Unix(PathBuf),
    /// `vsock`: the API on port 1024, stdio on port 1025, any CID.
    Vsock,
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.trim_start_matches("//");
            if !p.is_empty() {
                return Ok(ListenAddr::Unix(p.into()));
            }
        }
        if s == "vsock" {
            return Ok(ListenAddr::Vsock);
        }
        Err(format!(
            "{s:?} is not a listen address (want unix:PATH or vsock)"
        ))
    }
}

impl ListenAddr {
    fn stdio_path(path: &std::path::Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(husk_proto::STDIO_UNIX_SUFFIX);
        p.into()
    }

    /// Binds the API listener as a ttrpc listener.
    pub fn bind_api(&self) -> std::io::Result<ttrpc::asynchronous::transport::Listener> {
        match self {
            ListenAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = tokio::net::UnixListener::bind(p)?;
                Ok(l.into())
            }
            ListenAddr::Vsock => {
                let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    libc::VMADDR_CID_ANY,
                    husk_proto::AGENT_VSOCK_PORT,
                ))?;
                Ok(l.into())
            }
        }
    }

    /// Binds the stdio listener and serves it forever.
    pub fn serve_stdio(&self, registry: Arc<StreamRegistry>) -> std::io::Result<()> {
        match self {
            ListenAddr::Unix(p) => {
                let p = Self::stdio_path(p);
                let _ = std::fs::remove_file(&p);
                let l = tokio::net::UnixListener::bind(&p)?;
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => {
                                tokio::spawn(handshake(Box::new(s), registry.clone()));
                            }
                            Err(e) => tracing::warn!("stdio accept: {e}"),
                        }
                    }
                });
            }
            ListenAddr::Vsock => {
                let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    libc::VMADDR_CID_ANY,
                    husk_proto::STDIO_VSOCK_PORT,
                ))?;
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => {
                                tokio::spawn(handshake(Box::new(s), registry.clone()));
                            }
                            Err(e) => tracing::warn!("stdio accept: {e}"),
                        }
                    }
                });
            }
        }
        Ok(())
    }

    /// Removes the socket files of a Unix listener.
    pub fn cleanup(&self) {
        if let ListenAddr::Unix(p) = self {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_file(Self::stdio_path(p));
        }
    }
}

/// Reads a stream header and hands the connection to the stream's pump.
async fn handshake(mut conn: Box<dyn Conn>, registry: Arc<StreamRegistry>) {
    let header = match tokio::time::timeout(Duration::from_secs(10), read_header(&mut conn)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
        Err(_) => return,
    };
    // Claim the stream before saying OK, so that a WaitProcess the client sends after the OK
    // waits for this stream's output.
    let claimed = match registry.claim(&header) {
        Ok(c) => c,
        Err(e) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
    };
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    if let Err(e) = claimed.deliver(conn) {
        tracing::debug!("stdio attach: {e}");
    }
}

async fn read_header(conn: &mut Box<dyn Conn>) -> Result<StreamHeader, String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match conn.read(&mut b).await {
            Ok(0) => return Err("connection closed before the stream header".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
        if line.len() > StreamHeader::MAX_LEN {
            return Err("stream header too long".into());
        }
    }
    StreamHeader::parse(&String::from_utf8_lossy(&line))
}
