//! The handshake with a re-exec'd helper, the same for create and exec: make the pipes,
//! spawn `agent_exe __container-init|exec` with the stdio on 0/1/2 and the pipes at their
//! fixed fds, move it into the container's cgroup, send its configuration, then read its
//! status messages until a deadline. The caller decides what the messages mean.

use std::{
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde::Serialize;

use super::{
    cgroup::{Cgroup, CgroupError},
    channel::{self, ChannelError, Msg, Reader},
    pidfd::{exit_status, pidfd_open, pidfd_signal, wait_exited},
    process::{self, FD_CONFIG, FD_START, FD_STATUS},
    ProcessIo, SETUP_TIMEOUT,
};

/// Which helper to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `__container-init`: creates the container's init, which waits on the start pipe.
    Init,
    /// `__container-exec`: forks a process into the running container.
    Exec,
}

impl Verb {
    fn arg(self) -> &'static str {
        match self {
            Verb::Init => process::VERB_INIT,
            Verb::Exec => process::VERB_EXEC,
        }
    }
}

/// Why starting a helper failed; the helper, if it ran, was killed.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("starting the helper {}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("putting the helper into the container's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("sending the configuration to the helper")]
    SendConfig(#[source] io::Error),
}

/// A started helper: a pidfd to watch it, its status pipe and, for the init, the
/// write end of the start pipe.
#[derive(Debug)]
pub struct Helper {
    pidfd: Option<OwnedFd>,
    status: Reader,
    start: Option<File>,
    /// Until when the helper (and what it forks) has to report: [`SETUP_TIMEOUT`] from
    /// the moment the configuration was sent.
    deadline: Instant,
}

impl Helper {
    /// Spawns the helper `verb` of `exe` with `io` on 0/1/2, moves it into `cgroup` and sends
    /// it `config`. On failure the helper, if it ran, is killed.
    pub fn start<T: Serialize>(
        exe: &Path,
        verb: Verb,
        io: ProcessIo,
        cgroup: Option<&Cgroup>,
        config: &T,
    ) -> Result<Helper, HelperError> {
        let spawn_err = |source| HelperError::Spawn {
            exe: exe.to_path_buf(),
            source,
        };
        let (config_rx, config_tx) = channel::pipe().map_err(spawn_err)?;
        let (status_rx, status_tx) = channel::pipe().map_err(spawn_err)?;
        let mut fds = vec![(config_rx, FD_CONFIG), (status_tx, FD_STATUS)];
        let start = match verb {
            Verb::Init => {
                let (start_rx, start_tx) = channel::pipe().map_err(spawn_err)?;
                fds.push((start_rx, FD_START));
                Some(File::from(start_tx))
            }
            Verb::Exec => None,
        };
        let pid = spawn(exe, verb.arg(), io, fds).map_err(spawn_err)?;
        let mut helper = Helper {
            pidfd: pidfd_open(pid).ok(),
            status: Reader::new(status_rx),
            start,
            deadline: Instant::now() + SETUP_TIMEOUT,
        };
        if let Some(cg) = cgroup {
            if let Err(e) = cg.add_process(pid) {
                helper.kill();
                return Err(HelperError::Cgroup(e));
            }
        }
        if let Err(e) = send_config(config_tx, config) {
            helper.kill();
            return Err(HelperError::SendConfig(e));
        }
        helper.deadline = Instant::now() + SETUP_TIMEOUT;
        Ok(helper)
    }

    /// The deadline of the handshake.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next status message, None at EOF (every writer is gone). On an error (the
    /// deadline passed, a broken pipe, garbage) the helper is killed.
    pub fn next(&mut self) -> Result<Option<Msg>, ChannelError> {
        let r = self.status.next(self.deadline, SETUP_TIMEOUT);
        if r.is_err() {
            self.kill();
        }
        r
    }

    /// SIGKILLs the helper (not what it forked).
    pub fn kill(&self) {
        if let Some(fd) = &self.pidfd {
            let _ = pidfd_signal(fd, Signal::SIGKILL);
        }
    }

    /// How the helper ended, when it has (see [`exit_status`]).
    pub fn exit_status(&self) -> Option<String> {
        self.pidfd
            .as_ref()
            .and_then(|fd| exit_status(fd, self.deadline))
    }

    /// Waits (bounded by the deadline) until the helper has exited: it does right after
    /// reporting the pid, and then what it forked is the agent's child (reparented), which
    /// the agent's reaper relies on. Returns the status pipe, to read on, and the start pipe.
    pub fn finish(self) -> (Reader, Option<File>) {
        if let Some(fd) = &self.pidfd {
            wait_exited(fd, self.deadline);
        }
        (self.status, self.start)
    }
}

fn send_config<T: Serialize>(tx: OwnedFd, cfg: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(cfg).map_err(io::Error::other)?;
    let mut f = File::from(tx);
    f.write_all(&bytes)
}

/// Starts `exe verb` with `io` on 0/1/2 and `fds` at their fixed numbers, and returns its
/// pid. It is not waited for: the agent's reaper collects it.
fn spawn(exe: &Path, verb: &str, io: ProcessIo, fds: Vec<(OwnedFd, RawFd)>) -> io::Result<Pid> {
    // Move the fds above the fixed numbers first, so the dup2s in the child cannot clobber
    // one another.
    let high: Vec<(OwnedFd, RawFd)> = fds
        .iter()
        .map(|(fd, target)| {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                .map(|n| (unsafe { OwnedFd::from_raw_fd(n) }, *target))
                .map_err(io::Error::from)
        })
        .collect::<io::Result<_>>()?;
    drop(fds);
    let pairs: Vec<(RawFd, RawFd)> = high.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    let mut cmd = Command::new(exe);
    cmd.arg(verb)
        .env_clear()
        .stdin(Stdio::from(io.stdin))
        .stdout(Stdio::from(io.stdout))
        .stderr(Stdio::from(io.stderr));
    // SAFETY: the closure runs between fork and exec in a copy of a multi-threaded process;
    // it only calls dup2, which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &pairs {
                if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    #[allow(clippy::zombie_processes)] // the agent's reaper waits for every child
    let child = cmd.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    drop(high);
    Ok(pid)
}
