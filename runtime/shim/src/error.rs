//! The shim's one error type and its one mapping to the ttrpc codes containerd sees: a caller
//! can tell "no such task" (NOT_FOUND) from "the VM died" (UNAVAILABLE) from a bad request.

use containerd_shim::protos::ttrpc::{self, Code};
use husk::pod::PodError;
use husk_client::ClientError;

/// Why a task request failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("no task {0} in this pod")]
    NoTask(String),
    #[error("no process {exec_id} in task {id}")]
    NoProcess { id: String, exec_id: String },
    /// A signal for a process that has ended.
    #[error("process {id} {exec_id} already finished")]
    Finished { id: String, exec_id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the task's state (not running, already started, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
    /// The agent refused or failed; what was being done.
    #[error("{what}: {source}")]
    Agent {
        what: &'static str,
        source: ClientError,
    },
    #[error(transparent)]
    Pod(#[from] PodError),
}

pub type Result<T, E = ShimError> = std::result::Result<T, E>;

impl ShimError {
    /// An agent error with what was being done.
    pub fn agent(what: &'static str) -> impl FnOnce(ClientError) -> ShimError {
        move |source| ShimError::Agent { what, source }
    }

    /// A missing task (`exec_id` empty) or process.
    pub fn not_found(id: &str, exec_id: &str) -> ShimError {
        if exec_id.is_empty() {
            ShimError::NoTask(id.to_string())
        } else {
            ShimError::NoProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }
        }
    }

    /// The ttrpc code containerd gets.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NoTask(_) | ShimError::NoProcess { .. } | ShimError::Finished { .. } => {
                Code::NOT_FOUND
            }
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Internal(_) => Code::INTERNAL,
            ShimError::Agent { source, .. } => source.code(),
            ShimError::Pod(e) => match e {
                PodError::Start(_) => Code::FAILED_PRECONDITION,
                PodError::Boot(_) => Code::DEADLINE_EXCEEDED,
                // Its VMM is gone: the VM was lost, not slow.
                PodError::Ended(_) | PodError::TemplateRefused(_) => Code::UNAVAILABLE,
                PodError::Agent { source, .. } => source.code(),
                PodError::Scratch { .. } => Code::RESOURCE_EXHAUSTED,
                PodError::LayerRefused { .. } | PodError::Spec(_) => Code::INTERNAL,
                PodError::LayerUnreachable { .. } => Code::UNAVAILABLE,
                PodError::Share(_) => Code::FAILED_PRECONDITION,
            },
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let cases = [
            (
                ShimError::not_found("c1", ""),
                Code::NOT_FOUND,
                "no task c1 in this pod",
            ),
            (
                ShimError::not_found("c1", "e1"),
                Code::NOT_FOUND,
                "no process e1 in task c1",
            ),
            (
                ShimError::agent("starting the container")(ClientError::NotFound(
                    "no container c1".into(),
                )),
                Code::NOT_FOUND,
                "starting the container: ",
            ),
            (
                PodError::LayerRefused {
                    image: "/l/x.img".into(),
                    reason: "the layer file /l/x.img is empty".into(),
                }
                .into(),
                Code::INTERNAL,
                "the VMM refused the layer /l/x.img: the layer file /l/x.img is empty",
            ),
            (
                PodError::Boot("did not become ready".into()).into(),
                Code::DEADLINE_EXCEEDED,
                "the pod's microVM: did not become ready",
            ),
            (
                PodError::Ended("the VMM was killed by signal 9 before the agent was ready".into())
                    .into(),
                Code::UNAVAILABLE,
                "the pod's microVM: the VMM was killed by signal 9 before the agent was ready",
            ),
            (
                ShimError::Agent {
                    what: "waiting",
                    source: ClientError::Transport("early eof".into()),
                },
                Code::UNAVAILABLE,
                "waiting: ",
            ),
            (
                ShimError::agent("execing")(ClientError::Unresponsive(
                    "exec_process, nor a health check 30.0s into it, within 60.0s (is the guest stopped or hung?)".into(),
                )),
                Code::UNAVAILABLE,
                "execing: the agent did not answer exec_process, nor a health check 30.0s into it, within 60.0s (is the guest stopped or hung?)",
            ),
        ];
        for (e, code, msg) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert!(e.to_string().contains(msg), "{e}");
            let ttrpc::Error::RpcStatus(s) = ttrpc::Error::from(e) else {
                panic!("not a status");
            };
            assert_eq!(s.code(), code);
        }
    }
}
