//! Where an agent listens, and how to open a byte stream to it.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::ClientError;

/// A byte stream to the agent (ttrpc or stdio).
pub trait Conn: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Conn for T {}

/// The address of an agent.
///
/// Textual forms: `unix:PATH` (host-process agent), `hvsock:UDS_PATH` (hybrid vsock of a husk
/// microVM: a Unix socket of the VMM, spoken to with `CONNECT <port>`), `vsock:CID` (kernel vsock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    Unix(PathBuf),
    HybridVsock(PathBuf),
    Vsock(u32),
}

impl FromStr for AgentAddr {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadAddress(s.to_string());
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.trim_start_matches("//");
            if p.is_empty() {
                return Err(bad());
            }
            Ok(AgentAddr::Unix(p.into()))
        } else if let Some(p) = s.strip_prefix("hvsock:") {
            if p.is_empty() {
                return Err(bad());
            }
            Ok(AgentAddr::HybridVsock(p.into()))
        } else if let Some(cid) = s.strip_prefix("vsock:") {
            cid.parse().map(AgentAddr::Vsock).map_err(|_| bad())
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentAddr::HybridVsock(p) => write!(f, "hvsock:{}", p.display()),
            AgentAddr::Vsock(cid) => write!(f, "vsock:{cid}"),
        }
    }
}

/// Which of the agent's two listeners to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The ttrpc API.
    Api,
    /// The stdio stream listener.
    Stdio,
}

impl AgentAddr {
    /// Opens a byte stream to one of the agent's listeners, within `timeout`.
    pub async fn connect(
        &self,
        service: Service,
        timeout: Duration,
    ) -> Result<Box<dyn Conn>, ClientError> {
        tokio::time::timeout(timeout, self.connect_inner(service))
            .await
            .map_err(|_| ClientError::Timeout(format!("connecting to the agent at {self}")))?
    }

    async fn connect_inner(&self, service: Service) -> Result<Box<dyn Conn>, ClientError> {
        let port = match service {
            Service::Api => husk_proto::AGENT_VSOCK_PORT,
            Service::Stdio => husk_proto::STDIO_VSOCK_PORT,
        };
        let unavailable = |e: std::io::Error| ClientError::Unavailable {
            addr: self.to_string(),
            source: e,
        };
        match self {
            AgentAddr::Unix(path) => {
                let path = match service {
                    Service::Api => path.clone(),
                    Service::Stdio => {
                        let mut p = path.clone().into_os_string();
                        p.push(husk_proto::STDIO_UNIX_SUFFIX);
                        p.into()
                    }
                };
                let s = UnixStream::connect(&path).await.map_err(unavailable)?;
                Ok(Box::new(s))
            }
            AgentAddr::HybridVsock(uds) => {
                let s = UnixStream::connect(uds).await.map_err(unavailable)?;
                let s = hybrid_handshake(s, port).await.map_err(unavailable)?;
                Ok(Box::new(s))
            }
            AgentAddr::Vsock(cid) => {
                let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, port))
                    .await
                    .map_err(unavailable)?;
                Ok(Box::new(s))
            }
        }
    }
}

/// The Firecracker hybrid-vsock handshake: `CONNECT <port>\n`, answered by `OK <hostport>\n`.
async fn hybrid_handshake(s: UnixStream, port: u32) -> std::io::Result<BufReader<UnixStream>> {
    let mut s = BufReader::new(s);
    s.get_mut()
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = String::new();
    read_line_bounded(&mut s, &mut line, 64).await?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("the VMM refused vsock port {port}: {:?}", line.trim_end()),
        ));
    }
    Ok(s)
}

/// Reads one `\n`-terminated line of at most `max` bytes.
pub(crate) async fn read_line_bounded<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    line: &mut String,
    max: usize,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(r, &mut byte).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a full line",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
        if buf.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
    }
    *line = String::from_utf8_lossy(&buf).into_owned();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse::<AgentAddr>().unwrap(),
            AgentAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "unix:///run/a.sock".parse::<AgentAddr>().unwrap(),
            AgentAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "hvsock:/run/vm.vsock".parse::<AgentAddr>().unwrap(),
            AgentAddr::HybridVsock("/run/vm.vsock".into())
        );
        assert_eq!("vsock:3".parse::<AgentAddr>().unwrap(), AgentAddr::Vsock(3));
        for bad in ["", "unix:", "tcp:1.2.3.4:5", "vsock:x", "hvsock:"] {
            assert!(bad.parse::<AgentAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[tokio::test]
    async fn hybrid_handshake_accepts_ok_and_rejects_refusal() {
        let dir = tempfile_dir();
        let path = dir.join("vm.vsock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            for answer in ["OK 1073741824\n", "NOPE\n"] {
                let (s, _) = l.accept().await.unwrap();
                let mut s = BufReader::new(s);
                let mut line = String::new();
                read_line_bounded(&mut s, &mut line, 64).await.unwrap();
                assert_eq!(line, "CONNECT 1024");
                s.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let addr = AgentAddr::HybridVsock(path.clone());
        let t = Duration::from_secs(5);
        assert!(addr.connect(Service::Api, t).await.is_ok());
        let err = match addr.connect(Service::Api, t).await {
            Err(e) => std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            Ok(_) => panic!("a refused CONNECT was accepted"),
        };
        assert!(err.contains("refused vsock port 1024"), "{err}");
        server.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
