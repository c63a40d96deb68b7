//! Process file descriptors: watching, signalling and peeking at processes the agent did
//! not necessarily spawn itself, without racing the reaper for their pid.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout},
    sys::signal::Signal,
    unistd::Pid,
};

pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn pidfd_signal(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How the process behind `fd` ended, without reaping it (the reaper still gets it): waits
/// (bounded) for the exit, then peeks with waitid(P_PIDFD, WNOWAIT). None when the caller is
/// not its parent or a reaper was faster.
pub fn exit_status(fd: &OwnedFd, deadline: Instant) -> Option<String> {
    if !wait_exited(fd, deadline.min(Instant::now() + Duration::from_secs(1))) {
        return Some("still running".into());
    }
    // SAFETY: siginfo_t is plain data; waitid fills it for a valid pidfd.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: P_PIDFD with an fd we own, a valid siginfo pointer, and flags that neither block
    // nor reap.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: waitid succeeded with WEXITED, so si_status and si_code are set.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    match code {
        libc::CLD_EXITED => Some(format!("exit status {status}")),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(format!(
            "killed by {}",
            Signal::try_from(status)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {status}"))
        )),
        _ => None,
    }
}

/// Waits until the process of `fd` has exited (a pidfd turns readable), at most until
/// `deadline`. Returns whether it has.
pub fn wait_exited(fd: &OwnedFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}
