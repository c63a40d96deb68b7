//! The agent's listeners: ttrpc API and stdio streams, on vsock or on Unix sockets.

use std::{io, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use husk_proto::{ConnHeader, StreamHeader};
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

/// Reads a connection's header, then hands the connection to a stdio stream's pump or
/// forwards it to a port on the guest's loopback.
async fn handshake(mut conn: Box<dyn Conn>, registry: Arc<StreamRegistry>) {
    let header = match tokio::time::timeout(Duration::from_secs(10), read_header(&mut conn)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
        Err(_) => return,
    };
    match header {
        ConnHeader::Stdio(h) => attach(conn, &h, &registry).await,
        ConnHeader::Forward(port) => forward(conn, port).await,
    }
}

/// Hands a stdio connection to its stream's pump.
async fn attach(mut conn: Box<dyn Conn>, header: &StreamHeader, registry: &StreamRegistry) {
    // Claim the stream before saying OK, so that a WaitProcess the client sends after the OK
    // waits for this stream's output.
    let claimed = match registry.claim(header) {
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

/// How long connecting to a forwarded port may take.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `port` on the guest's loopback and copies bytes both ways until both sides
/// have closed (a half-close is passed on).
async fn forward(mut conn: Box<dyn Conn>, port: u16) {
    let target = match tokio::time::timeout(FORWARD_CONNECT_TIMEOUT, connect_loopback(port)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let msg = format!("ERR connecting to port {port} on the guest's loopback: {e}\n");
            let _ = conn.write_all(msg.as_bytes()).await;
            return;
        }
        Err(_) => {
            let msg = format!(
                "ERR connecting to port {port} on the guest's loopback: no answer in {} s\n",
                FORWARD_CONNECT_TIMEOUT.as_secs()
            );
            let _ = conn.write_all(msg.as_bytes()).await;
            return;
        }
    };
    let mut target = target;
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut conn, &mut target).await {
        Ok((up, down)) => tracing::debug!(port, up, down, "forwarded connection closed"),
        Err(e) => tracing::debug!(port, "forwarded connection: {e}"),
    }
}

/// 127.0.0.1:`port`, else [::1]:`port` (a server may listen on either), as containerd does
/// for a runc pod; the IPv4 error is the one reported.
async fn connect_loopback(port: u16) -> io::Result<tokio::net::TcpStream> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(s) => Ok(s),
        Err(e4) => tokio::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port))
            .await
            .map_err(|_| e4),
    }
}

/// Why a connection's header could not be read; the client gets the message.
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

async fn read_header(conn: &mut Box<dyn Conn>) -> Result<ConnHeader, HeaderError> {
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
    ConnHeader::parse(&String::from_utf8_lossy(&line)).map_err(HeaderError::Malformed)
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

    /// Sends `header` on a fresh connection and returns the client's end after the agent's
    /// answer line, with that line.
    async fn open(header: &str) -> (tokio::io::DuplexStream, String) {
        let (mut client, server) = tokio::io::duplex(4096);
        let registry = Arc::new(StreamRegistry::default());
        tokio::spawn(handshake(Box::new(server), registry));
        client.write_all(header.as_bytes()).await.unwrap();
        let mut line = Vec::new();
        loop {
            let mut b = [0u8; 1];
            if client.read(&mut b).await.unwrap() == 0 || b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        (client, String::from_utf8(line).unwrap())
    }

    #[tokio::test]
    async fn a_forwarded_connection_reaches_a_loopback_port_both_ways() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap(); // ends with the client's half-close
            s.write_all(&got).await.unwrap();
            s.write_all(b" back").await.unwrap();
        });
        let (mut client, answer) = open(&format!("FORWARD {port}\n")).await;
        assert_eq!(answer, "OK");
        client.write_all(b"there").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "there back");
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn forwarding_to_a_closed_port_is_refused_naming_the_port() {
        // A port just released: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut client, answer) = open(&format!("FORWARD {port}\n")).await;
        assert!(
            answer.starts_with(&format!(
                "ERR connecting to port {port} on the guest's loopback: "
            )) && answer.contains("refused"),
            "{answer}"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (_, answer) = open("FORWARD 0\n").await;
        assert_eq!(answer, "ERR \"0\" is not a TCP port (1-65535)");
    }
}
