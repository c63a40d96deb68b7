//! The pipes between the agent and its re-exec'd helpers.
//!
//! The agent writes the helper's configuration (JSON) to the config pipe and closes it. The
//! helper and the container process it forks report on the status pipe, one JSON message
//! per line. In the container process the status pipe is close-on-exec, so EOF after the
//! last message means "execve succeeded" (or the process is gone). Every read has a
//! deadline, so a stuck or dead helper never hangs the agent.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsFd, OwnedFd},
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

/// A failed step in a helper, as reported over the status pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{step}: {message}")]
pub struct ChildError {
    /// What the helper was doing, e.g. `mounting proc at /proc`.
    pub step: String,
    /// The error, e.g. `EPERM: Operation not permitted`.
    pub message: String,
    /// The errno, when the error was a system call's.
    pub errno: Option<i32>,
}

impl ChildError {
    pub fn new(step: impl Into<String>, message: impl Into<String>) -> Self {
        ChildError {
            step: step.into(),
            message: message.into(),
            errno: None,
        }
    }

    pub fn sys(step: impl Into<String>, e: nix::errno::Errno) -> Self {
        ChildError {
            step: step.into(),
            message: e.desc().to_string(),
            errno: Some(e as i32),
        }
    }

    pub fn io(step: impl Into<String>, e: &io::Error) -> Self {
        ChildError {
            step: step.into(),
            message: e.to_string(),
            errno: e.raw_os_error(),
        }
    }
}

/// Adds the step to a system call's error.
pub trait Step<T> {
    fn step(self, f: impl FnOnce() -> String) -> Result<T, ChildError>;
}

impl<T> Step<T> for nix::Result<T> {
    fn step(self, f: impl FnOnce() -> String) -> Result<T, ChildError> {
        self.map_err(|e| ChildError::sys(f(), e))
    }
}

impl<T> Step<T> for io::Result<T> {
    fn step(self, f: impl FnOnce() -> String) -> Result<T, ChildError> {
        self.map_err(|e| ChildError::io(f(), &e))
    }
}

/// A message from a helper to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// The container process was forked; its pid in the agent's pid namespace.
    Pid { pid: i32 },
    /// Setup is complete; the container's init waits for start.
    Ready,
    /// Setup failed.
    Error(ChildError),
    /// execve of the user program failed.
    ExecFailed { program: String, message: String },
}

/// Why talking to a helper failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no answer from the helper within {0:?}")]
    Timeout(Duration),
    #[error("reading the status pipe")]
    Io(#[source] io::Error),
    #[error("a malformed status message {line:?}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Both ends of a new close-on-exec pipe (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Writes one message (a JSON line). Best effort when the agent is gone.
pub fn send(out: &mut File, msg: &Msg) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Reads messages from the status pipe.
#[derive(Debug)]
pub struct Reader {
    file: File,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    pub fn new(fd: OwnedFd) -> Self {
        Reader {
            file: File::from(fd),
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next message, None at EOF (every writer closed its end), or an error once
    /// `deadline` passes.
    pub fn next(
        &mut self,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Option<Msg>, ChannelError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = &line[..line.len() - 1];
                return serde_json::from_slice(line).map(Some).map_err(|source| {
                    ChannelError::Malformed {
                        line: String::from_utf8_lossy(line).into_owned(),
                        source,
                    }
                });
            }
            if self.eof {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ChannelError::Timeout(budget));
            }
            let ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
            let mut chunk = [0u8; 4096];
            match self.file.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ChannelError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_eof() {
        let (r, w) = pipe().unwrap();
        let mut w = File::from(w);
        send(&mut w, &Msg::Pid { pid: 42 }).unwrap();
        send(
            &mut w,
            &Msg::Error(ChildError::sys(
                "mounting proc at /proc",
                nix::errno::Errno::EPERM,
            )),
        )
        .unwrap();
        drop(w);
        let mut r = Reader::new(r);
        let d = Instant::now() + Duration::from_secs(5);
        let b = Duration::from_secs(5);
        assert_eq!(r.next(d, b).unwrap(), Some(Msg::Pid { pid: 42 }));
        match r.next(d, b).unwrap() {
            Some(Msg::Error(e)) => {
                assert_eq!(e.errno, Some(libc::EPERM));
                assert_eq!(
                    e.to_string(),
                    "mounting proc at /proc: Operation not permitted"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next(d, b).unwrap(), None);
    }

    #[test]
    fn a_silent_writer_times_out() {
        let (r, _w) = pipe().unwrap();
        let mut r = Reader::new(r);
        let b = Duration::from_millis(50);
        let e = r.next(Instant::now() + b, b).unwrap_err();
        assert!(matches!(e, ChannelError::Timeout(_)), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        let (r, w) = pipe().unwrap();
        File::from(w).write_all(b"hello\n").unwrap();
        let mut r = Reader::new(r);
        let b = Duration::from_secs(1);
        assert!(matches!(
            r.next(Instant::now() + b, b),
            Err(ChannelError::Malformed { .. })
        ));
    }
}
