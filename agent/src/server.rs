//! The agent's listeners: ttrpc API and stdio streams, on vsock or on Unix sockets.

use std::{io, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

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

/// A string that is not a [`ListenAddr`].
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a listen address (want unix:PATH or vsock)")]
pub struct ParseListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ParseListenAddrError;
    fn from_str(s: &str) -> Result<Self, ParseListenAddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.trim_start_matches("//");
            if !p.is_empty() {
                return Ok(ListenAddr::Unix(p.into()));
            }
        }
        if s == "vsock" {
            return Ok(ListenAddr::Vsock);
        }
        Err(ParseListenAddrError(s.to_string()))
    }
}

impl ListenAddr {
    fn stdio_path(path: &std::path::Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(husk_proto::STDIO_UNIX_SUFFIX);
        p.into()
    }

    /// Binds the API listener as a ttrpc listener.
    pub fn bind_api(&self) -> io::Result<ttrpc::asynchronous::transport::Listener> {
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
    pub fn serve_stdio(&self, registry: Arc<StreamRegistry>) -> io::Result<()> {
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

/// Why a stdio connection's stream header could not be read; the client gets the message.
#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error("connection closed before the stream header")]
    Closed,
    #[error("stream header too long")]
    TooLong,
    #[error(transparent)]
    Read(io::Error),
    /// The header line is not one; husk-proto's parser says why.
    #[error("{0}")]
    Malformed(String),
}

async fn read_header(conn: &mut Box<dyn Conn>) -> Result<StreamHeader, HeaderError> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match conn.read(&mut b).await {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(HeaderError::Read(e)),
        }
        if line.len() > StreamHeader::MAX_LEN {
            return Err(HeaderError::TooLong);
        }
    }
    StreamHeader::parse(&String::from_utf8_lossy(&line)).map_err(HeaderError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:///run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!("vsock".parse::<ListenAddr>().unwrap(), ListenAddr::Vsock);
        assert_eq!(
            "tcp:1".parse::<ListenAddr>().unwrap_err().to_string(),
            "\"tcp:1\" is not a listen address (want unix:PATH or vsock)"
        );
    }

    #[tokio::test]
    async fn a_bad_header_is_refused_with_its_reason() {
        let (mut client, server) = tokio::io::duplex(256);
        let registry = Arc::new(StreamRegistry::default());
        let task = tokio::spawn(handshake(Box::new(server), registry));
        client.write_all(b"HELLO\n").await.unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        task.await.unwrap();
        assert!(reply.starts_with("ERR "), "{reply}");
    }
}
