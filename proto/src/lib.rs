//! The husk runtime-to-agent API: protobuf messages and async ttrpc stubs generated from
//! `protos/*.proto`, plus the constants both sides agree on.

/// The version of the API in `protos/`. Bump it on any incompatible change.
pub const API_VERSION: u32 = 1;

/// The agent binary carries this string (it prints it for `--version`), so that `husk doctor`
/// finds which agent a guest image holds without booting it: the workspace's version (every
/// husk component has the same) and [`API_VERSION`], ended by a NUL.
pub const AGENT_MARK: &str = concat!("husk-agent-version=", env!("CARGO_PKG_VERSION"), ";api=1\0");

/// The AF_VSOCK port of the agent's ttrpc server.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The AF_VSOCK port of the agent's stdio stream listener.
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// A container whose OCI spec has a PID namespace at this path joins the pod's shared PID
/// namespace in the guest (a pod with shareProcessNamespace): the agent starts the pod's
/// pause process, PID 1 of that namespace, for its first such container.
pub const POD_PID_NAMESPACE: &str = "/run/husk-agent/pod-pid-namespace";

/// The virtio-fs tag of a pod's shared directory (the host's `DIR/shared`, served by the
/// pod's virtiofsd).
pub const SHARED_FS_TAG: &str = "husk-shared";

/// Where the agent mounts the pod's shared directory in the guest.
pub const SHARED_DIR: &str = "/run/husk/shared";

/// The suffix added to the agent's Unix socket path for its stdio listener in host-process mode.
pub const STDIO_UNIX_SUFFIX: &str = ".stdio";

/// Generated messages of `health.proto`.
#[allow(
    clippy::all,
    missing_docs,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    unused_imports
)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}

/// Generated ttrpc service stubs of `health.proto`.
#[allow(
    clippy::all,
    missing_docs,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    unused_imports
)]
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}

/// Generated messages of `agent.proto`.
#[allow(
    clippy::all,
    missing_docs,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    unused_imports
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc service stubs of `agent.proto`.
#[allow(
    clippy::all,
    missing_docs,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    unused_imports
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The stdio streams of a process, as named in the stream header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl StdioStream {
    /// The word used for this stream in the header line.
    pub fn as_str(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        }
    }
}

impl std::str::FromStr for StdioStream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdin" => Ok(StdioStream::Stdin),
            "stdout" => Ok(StdioStream::Stdout),
            "stderr" => Ok(StdioStream::Stderr),
            other => Err(format!("unknown stdio stream {other:?}")),
        }
    }
}

/// The header line a client writes first on a stdio connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stream: StdioStream,
}

impl StreamHeader {
    /// The longest header line the agent accepts, newline included.
    pub const MAX_LEN: usize = 1024;

    /// The header as a line, newline included.
    pub fn to_line(&self) -> String {
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        format!(
            "STREAM {} {} {}\n",
            self.container_id,
            exec,
            self.stream.as_str()
        )
    }

    /// Parses a header line (with or without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["STREAM", cid, exec, stream] if !cid.is_empty() && !exec.is_empty() => {
                Ok(StreamHeader {
                    container_id: (*cid).to_string(),
                    exec_id: if *exec == "-" {
                        String::new()
                    } else {
                        (*exec).to_string()
                    },
                    stream: stream.parse()?,
                })
            }
            _ => Err(format!("malformed stream header {line:?}")),
        }
    }
}

/// The header line a client writes first on a connection to the agent's stream listener: a
/// process's stdio stream, or a forwarded TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnHeader {
    /// `STREAM <container_id> <exec_id or -> <stream>`: one stdio stream of a process.
    Stdio(StreamHeader),
    /// `FORWARD <port>`: a TCP connection to `port` on the guest's loopback, which the
    /// containers share (CRI's port forwarding).
    Forward(u16),
}

impl ConnHeader {
    /// The header as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            ConnHeader::Stdio(h) => h.to_line(),
            ConnHeader::Forward(port) => format!("FORWARD {port}\n"),
        }
    }

    /// Parses a header line (with or without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let bare = line.strip_suffix('\n').unwrap_or(line);
        match bare.strip_prefix("FORWARD ") {
            Some(port) => match port.parse::<u16>() {
                Ok(p) if p != 0 && port == p.to_string() => Ok(ConnHeader::Forward(p)),
                _ => Err(format!("{port:?} is not a TCP port (1-65535)")),
            },
            None => StreamHeader::parse(line).map(ConnHeader::Stdio),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_mark_names_this_api_version() {
        let api = AGENT_MARK
            .split(";api=")
            .nth(1)
            .and_then(|s| s.strip_suffix('\0'))
            .expect("api= in the mark");
        assert_eq!(api, API_VERSION.to_string());
    }

    #[test]
    fn header_round_trips() {
        for exec in ["", "e1"] {
            let h = StreamHeader {
                container_id: "c1".into(),
                exec_id: exec.into(),
                stream: StdioStream::Stderr,
            };
            assert_eq!(StreamHeader::parse(&h.to_line()).unwrap(), h);
        }
    }

    #[test]
    fn header_rejects_garbage() {
        for bad in [
            "",
            "STREAM",
            "STREAM c1 - stdfoo",
            "HELLO c1 - stdin",
            "STREAM  - stdin",
        ] {
            assert!(StreamHeader::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn connection_headers_round_trip_and_bad_ports_are_refused() {
        for h in [
            ConnHeader::Forward(80),
            ConnHeader::Forward(65535),
            ConnHeader::Stdio(StreamHeader {
                container_id: "c1".into(),
                exec_id: String::new(),
                stream: StdioStream::Stdout,
            }),
        ] {
            assert_eq!(ConnHeader::parse(&h.to_line()).unwrap(), h);
        }
        for bad in [
            "FORWARD 0",
            "FORWARD 65536",
            "FORWARD -1",
            "FORWARD 080",
            "FORWARD ",
            "FORWARD x",
        ] {
            let e = ConnHeader::parse(bad).unwrap_err();
            assert!(e.contains("is not a TCP port"), "{bad:?}: {e}");
        }
        assert!(ConnHeader::parse("HELLO").is_err());
    }
}
