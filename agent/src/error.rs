//! Errors of the agent's domain operations and their ttrpc codes.

use ttrpc::Code;

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
    fn chain_joins_sources_once() {
        let io = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("mounting rootfs")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(chain(&Outer(io)), "mounting rootfs: disk on fire");
    }
}
