//! The errors of the container engine, one enum per operation.

use std::{io, path::PathBuf, time::Duration};

use nix::{errno::Errno, unistd::Pid};

use super::{
    cgroup::CgroupError,
    channel::{ChannelError, ChildError},
    helper::HelperError,
    spec::SpecError,
};

/// Why [`Container::create`](super::Container::create) failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The spec asks for something invalid or unsupported; the message names the field.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("rootfs {}: {problem}", path.display())]
    InvalidRootfs { path: PathBuf, problem: String },
    #[error("creating the state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image layers or the scratch drive of a layered rootfs.
    #[error("{0}")]
    Layers(String),
    #[error("mounting the rootfs {} ({fstype}) at {}", source_dev.display(), target.display())]
    MountRootfs {
        source_dev: PathBuf,
        fstype: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("setting up the container's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("starting the init helper {}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending the configuration to the init helper")]
    SendConfig(#[source] io::Error),
    #[error("waiting for the container's setup")]
    Channel(#[source] ChannelError),
    /// A setup step in the container's init failed (mount, pivot_root, user, ...).
    #[error("container setup failed")]
    Setup(#[source] ChildError),
    /// The helper or the init died without a report (a signal, or a crash); `status` is what
    /// could be learnt about how (e.g. "killed by SIGKILL"), when the agent is its parent.
    #[error("the container's {who} exited during setup without a report{}", status.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Exited {
        who: &'static str,
        status: Option<String>,
    },
    /// The OOM killer ended the helper or the init while it set the container up: the
    /// container's memory limit (`memory.max`, as the cgroup has it) is too small for that.
    #[error("the container's {who} was killed by the OOM killer during setup: its memory limit ({limit}) is too small to start it")]
    OomAtSetup { who: &'static str, limit: String },
    #[error("watching the init process {pid}")]
    Pidfd {
        pid: Pid,
        #[source]
        source: io::Error,
    },
}

impl CreateError {
    /// The request was at fault (INVALID_ARGUMENT), not the system.
    pub fn is_invalid_spec(&self) -> bool {
        match self {
            CreateError::InvalidSpec(_)
            | CreateError::InvalidRootfs { .. }
            | CreateError::OomAtSetup { .. } => true,
            CreateError::Cgroup(e) => e.is_invalid_spec(),
            _ => false,
        }
    }
}

impl From<HelperError> for CreateError {
    fn from(e: HelperError) -> Self {
        match e {
            HelperError::Spawn { exe, source } => CreateError::Spawn { exe, source },
            HelperError::Cgroup(e) => CreateError::Cgroup(e),
            HelperError::SendConfig(e) => CreateError::SendConfig(e),
        }
    }
}

/// Why [`Container::start`](super::Container::start) failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the container was already started")]
    AlreadyStarted,
    #[error("the container was destroyed")]
    Destroyed,
    /// execve of the user program failed, e.g. `exec "nope": executable file not found in $PATH`.
    #[error("exec {program:?}: {message}")]
    Exec { program: String, message: String },
    #[error("the container's init exited before it could start")]
    InitGone,
    #[error("waiting for the container's program to start")]
    Channel(#[source] ChannelError),
    #[error("container setup failed")]
    Setup(#[source] ChildError),
}

/// Why [`Container::exec`](super::Container::exec) failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The process is invalid; the message names the field.
    #[error(transparent)]
    InvalidProcess(#[from] SpecError),
    #[error("the container is not running")]
    NotRunning,
    #[error("putting the exec helper into the container's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("starting the exec helper {}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending the configuration to the exec helper")]
    SendConfig(#[source] io::Error),
    #[error("waiting for the exec'd process")]
    Channel(#[source] ChannelError),
    #[error("setting up the exec'd process failed")]
    Setup(#[source] ChildError),
    /// execve failed, e.g. `exec "nope": executable file not found in $PATH`.
    #[error("exec {program:?}: {message}")]
    Exec { program: String, message: String },
    #[error("the exec helper exited without reporting a process")]
    Exited,
}

impl ExecError {
    /// The request was at fault (INVALID_ARGUMENT), not the system.
    pub fn is_invalid_spec(&self) -> bool {
        matches!(self, ExecError::InvalidProcess(_))
    }
}

impl From<HelperError> for ExecError {
    fn from(e: HelperError) -> Self {
        match e {
            HelperError::Spawn { exe, source } => ExecError::Spawn { exe, source },
            HelperError::Cgroup(e) => ExecError::Cgroup(e),
            HelperError::SendConfig(e) => ExecError::SendConfig(e),
        }
    }
}

/// Why signalling or listing the container's processes failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("sending {signal} to {pid}")]
    Signal {
        signal: nix::sys::signal::Signal,
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("listing processes in /proc")]
    Proc(#[source] io::Error),
    #[error("the container was destroyed")]
    Destroyed,
}

/// Why [`Container::destroy`](super::Container::destroy) did not finish; it may be retried.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("killing the container's processes")]
    Kill(#[source] CgroupError),
    #[error("the container's init {pid} was still alive {timeout:?} after SIGKILL")]
    InitAlive { pid: Pid, timeout: Duration },
    #[error("removing the container's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("unmounting the rootfs {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("removing the state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
