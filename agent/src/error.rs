//! Errors of the agent's domain operations and their ttrpc codes.

use ttrpc::Code;

use crate::{
    container::{cgroup::CgroupError, CreateError, ExecError, StartError},
    stdio::ResizeError,
};

/// Why an agent request failed. Each variant maps to one ttrpc code, so the runtime can tell
/// "no such container" from "bad spec" from "the agent broke".
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// The ttrpc code of this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }

    /// An internal error with its whole source chain in the message.
    pub fn internal(context: &str, e: &dyn std::error::Error) -> Self {
        AgentError::Internal(format!("{context}: {}", chain(e)))
    }
}

/// A request that does not parse is INVALID_ARGUMENT, a MAC no interface has NOT_FOUND.
impl From<crate::network::NetworkError> for AgentError {
    fn from(e: crate::network::NetworkError) -> Self {
        use crate::network::NetworkError as N;
        match e {
            N::Invalid(m) => AgentError::InvalidArgument(m),
            e @ N::NoInterface { .. } => AgentError::NotFound(e.to_string()),
            e @ N::Netlink { .. } => AgentError::Internal(format!("configuring the network: {e}")),
        }
    }
}

/// The request was at fault (a bad spec: INVALID_ARGUMENT), or the system (INTERNAL).
impl From<CreateError> for AgentError {
    fn from(e: CreateError) -> Self {
        let msg = chain(&e);
        if e.is_invalid_spec() {
            AgentError::InvalidArgument(msg)
        } else {
            AgentError::Internal(format!("creating container: {msg}"))
        }
    }
}

/// A bad process is INVALID_ARGUMENT; a program that cannot run in this container (as for
/// StartContainer) or a container that does not run FAILED_PRECONDITION; the rest INTERNAL.
impl From<ExecError> for AgentError {
    fn from(e: ExecError) -> Self {
        let msg = chain(&e);
        match e {
            _ if e.is_invalid_spec() => AgentError::InvalidArgument(msg),
            ExecError::Exec { .. } | ExecError::NotRunning => {
                AgentError::FailedPrecondition(format!("exec: {msg}"))
            }
            _ => AgentError::Internal(format!("exec: {msg}")),
        }
    }
}

/// A terminal resize fails for the state of the process (no terminal), FAILED_PRECONDITION.
impl From<ResizeError> for AgentError {
    fn from(e: ResizeError) -> Self {
        AgentError::FailedPrecondition(chain(&e))
    }
}

impl AgentError {
    /// Starting container `id` failed: the program cannot run (FAILED_PRECONDITION).
    pub fn start(id: &str, e: &StartError) -> Self {
        AgentError::FailedPrecondition(format!("starting container {id:?}: {}", chain(e)))
    }

    /// A cgroup error with its code: the request's fault (a bad value, a controller the
    /// guest lacks) INVALID_ARGUMENT, a container without a cgroup FAILED_PRECONDITION, the
    /// system's (I/O) INTERNAL.
    pub fn cgroup(what: &str, e: CgroupError) -> Self {
        let msg = format!("{what}: {}", chain(&e));
        if e.is_invalid_spec() {
            AgentError::InvalidArgument(msg)
        } else if matches!(e, CgroupError::NoCgroup) {
            AgentError::FailedPrecondition(msg)
        } else {
            AgentError::Internal(msg)
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let more = src.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_cross_the_wire() {
        let e: ttrpc::Error = AgentError::NotFound("container \"x\" not found".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "container \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resize_errors_keep_their_message() {
        let e = AgentError::from(ResizeError::NoTerminal);
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert_eq!(e.to_string(), "the process has no terminal");
        let io = std::io::Error::from_raw_os_error(libc::ENOTTY);
        let e = AgentError::from(ResizeError::Ioctl(io));
        assert_eq!(
            e.to_string(),
            format!(
                "TIOCSWINSZ: {}",
                std::io::Error::from_raw_os_error(libc::ENOTTY)
            )
        );
    }

    #[test]
    fn cgroup_errors_are_coded_by_fault() {
        let e = AgentError::cgroup("reading stats", CgroupError::NoCgroup);
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert_eq!(
            e.to_string(),
            "reading stats: the container has no cgroup (cgroup support is off)"
        );
    }

    #[test]
    fn chain_joins_sources_once() {
        let io = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("mounting rootfs")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(chain(&Outer(io)), "mounting rootfs: disk on fire");
    }
}
