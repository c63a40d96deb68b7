//! The VMM as a child process, started with `clone3` so that it is born in a PID namespace of
//! its own (PID 1 there: it sees no other process, and no other process can be reached by a
//! pid from it) and, when given, in its own cgroup (`CLONE_INTO_CGROUP`: charged from its
//! first page); then exec'd. The caller holds a pidfd and waits for and signals the VMM
//! through it, never through a pid that could have been reused.
//!
//! Between `clone3` and `execve` the child makes only async-signal-safe calls (the caller may
//! be multi-threaded): everything it needs is built before the clone.

use std::{
    ffi::{CString, OsString},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, process::ExitStatusExt},
    },
    path::Path,
    process::ExitStatus,
};

use tokio::io::unix::AsyncFd;

/// The most files the VMM inherits beside stdio.
pub const MAX_INHERITED: usize = 8;

/// `struct clone_args` of linux/sched.h (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_NEWPID: u64 = 0x2000_0000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What to start.
#[derive(Debug)]
pub struct VmmCommand<'a> {
    pub program: &'a Path,
    pub args: Vec<OsString>,
    /// The VMM's stdout and stderr.
    pub log: File,
    /// Files the VMM inherits: (our fd, its number in the VMM), without close-on-exec.
    pub inherit: Vec<(RawFd, RawFd)>,
    /// The cgroup (a directory opened read-only) the VMM is born in.
    pub cgroup: Option<&'a File>,
}

/// A started VMM; dropping it kills and reaps the VMM if it still runs.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
    /// The write end of the VMM's stdin, never written: it closes when this process ends,
    /// however it ends, and the VMM reads that as its parent being gone (when a change of
    /// user has reset its parent-death signal, see `husk-vmm --jail`).
    _lifeline: OwnedFd,
}

impl VmmProcess {
    /// Starts `c`: the VMM dies with the calling thread's process (`PR_SET_PDEATHSIG`), runs
    /// in a process group of its own (a Ctrl-C at a terminal is the caller's to handle), has
    /// a lifeline as stdin (a pipe nobody writes, whose write end closes with the caller)
    /// and every signal unblocked and at its default.
    pub fn spawn(c: VmmCommand<'_>) -> io::Result<VmmProcess> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::other("a NUL byte in the VMM's command line"))
        };
        let prog = cstr(c.program.as_os_str().as_bytes())?;
        let mut argv_c = vec![prog.clone()];
        for a in &c.args {
            argv_c.push(cstr(a.as_bytes())?);
        }
        let mut env_c = Vec::new();
        for (k, v) in std::env::vars_os() {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env_c.push(cstr(&kv)?);
        }
        let argv: Vec<*const libc::c_char> = argv_c
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = env_c
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        if c.inherit.len() > MAX_INHERITED {
            return Err(io::Error::other(format!(
                "the VMM can inherit at most {MAX_INHERITED} files"
            )));
        }
        let mut inherit = [(-1, -1); MAX_INHERITED];
        inherit[..c.inherit.len()].copy_from_slice(&c.inherit);
        let inherit = &inherit[..c.inherit.len()];
        let (lifeline_r, lifeline_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // The child writes its errno here if it cannot exec; close-on-exec, so a successful
        // exec reads as end of file.
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

        let mut pidfd: RawFd = -1;
        let mut args = CloneArgs {
            flags: CLONE_PIDFD | CLONE_NEWPID,
            pidfd: &mut pidfd as *mut RawFd as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        if let Some(cg) = c.cgroup {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = cg.as_raw_fd() as u64;
        }
        // SAFETY: `args` is a valid clone_args of the size given; without CLONE_VM the child
        // runs on a copy of this stack, as after fork.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child, which only makes async-signal-safe calls on data built
            // above, then execs or exits.
            unsafe {
                exec_child(
                    &prog,
                    &argv,
                    &envp,
                    lifeline_r.as_raw_fd(),
                    c.log.as_raw_fd(),
                    inherit,
                    err_w.as_raw_fd(),
                )
            }
        }
        drop(err_w);
        drop(lifeline_r);
        // SAFETY: clone3 wrote a new pidfd, ours alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let mut errno = [0u8; 4];
        let got = loop {
            match nix::unistd::read(err_r.as_raw_fd(), &mut errno) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.unwrap_or(0),
            }
        };
        if got == errno.len() {
            let _ = wait_blocking(&pidfd);
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        // SAFETY: the pidfd is ours and stays open as long as the AsyncFd that owns it.
        let pidfd = match unsafe { AsyncFd::register(pidfd) } {
            Ok(fd) => fd,
            Err(e) => {
                // Not watchable (epoll limits): the VMM must not run on unwatched.
                let (pidfd, e) = e.into_parts();
                let _ = kill(&pidfd);
                let _ = wait_blocking(&pidfd);
                return Err(e);
            }
        };
        Ok(VmmProcess {
            pid: pid as u32,
            pidfd,
            reaped: false,
            _lifeline: lifeline_w,
        })
    }

    /// The VMM's pid (in the caller's PID namespace), until it is reaped.
    pub fn id(&self) -> Option<u32> {
        (!self.reaped).then_some(self.pid)
    }

    /// Waits for the VMM to exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            if let Some(status) = waitid(self.pidfd.get_ref(), libc::WNOHANG)? {
                self.reaped = true;
                return Ok(status);
            }
            ready.clear_ready();
        }
    }

    /// A handle that can kill the VMM from elsewhere, through a pidfd of its own: once the
    /// VMM is gone it reaches nothing (ESRCH), never a process that took its pid.
    pub fn killer(&self) -> io::Result<VmmKiller> {
        Ok(VmmKiller(self.pidfd.get_ref().try_clone()?))
    }

    /// The exit status if the process has exited (and reaps it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Ok(None);
        }
        let status = waitid(self.pidfd.get_ref(), libc::WNOHANG)?;
        self.reaped = status.is_some();
        Ok(status)
    }

    /// A pidfd of the process's own (to signal it or enter its namespaces, never another
    /// process's that took its pid).
    pub fn pidfd(&self) -> io::Result<OwnedFd> {
        self.pidfd.get_ref().try_clone()
    }

    /// Sends SIGKILL (through the pidfd: never to a reused pid).
    pub fn start_kill(&self) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        kill(self.pidfd.get_ref())
    }

    /// Kills the VMM and waits for it.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.start_kill()?;
        self.wait().await
    }
}

/// Kills a VMM through a pidfd (see [`VmmProcess::killer`]).
#[derive(Debug)]
pub struct VmmKiller(OwnedFd);

impl VmmKiller {
    /// SIGKILL to the VMM; ESRCH once it is gone.
    pub fn kill(&self) -> io::Result<()> {
        kill(&self.0)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.start_kill();
            let _ = wait_blocking(self.pidfd.get_ref());
        }
    }
}

/// SIGKILL to the process of `pidfd`.
fn kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks until the process of `pidfd` exits; reaps it.
fn wait_blocking(pidfd: &OwnedFd) -> io::Result<ExitStatus> {
    loop {
        match waitid(pidfd, 0) {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `waitid(P_PIDFD, ...)` with `WEXITED | flags`: the exit status, or None (WNOHANG, still
/// running).
fn waitid(pidfd: &OwnedFd, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data, filled in by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live siginfo_t; the pidfd is ours.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a child's state change (or left si_pid 0: none yet).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// The child's side: stdio, inherited files at their numbers, signals at their defaults,
/// then exec. Any failure writes its errno to `err` and exits 127.
///
/// # Safety
/// Only in the child of clone3, before exec: makes async-signal-safe calls only.
unsafe fn exec_child(
    prog: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    stdin: RawFd,
    log: RawFd,
    inherit: &[(RawFd, RawFd)],
    err: RawFd,
) -> ! {
    // SAFETY: only async-signal-safe calls, on data the parent built before the clone.
    unsafe {
        // The error pipe first out of the way of every number stdio and the inherited files
        // take (all below 64).
        let err = match libc::fcntl(err, libc::F_DUPFD_CLOEXEC, 64) {
            -1 => libc::_exit(127),
            fd => fd,
        };
        let fail = || -> ! {
            let e = *libc::__errno_location();
            libc::write(err, (&e as *const i32).cast(), 4);
            libc::_exit(127)
        };
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail();
        }
        if libc::setpgid(0, 0) != 0 {
            fail();
        }
        for (src, dst) in [(stdin, 0), (log, 1), (log, 2)] {
            if libc::dup2(src, dst) < 0 {
                fail();
            }
            // (dup2 onto itself keeps close-on-exec.)
            if libc::fcntl(dst, libc::F_SETFD, 0) < 0 {
                fail();
            }
        }
        // First out of the way of every target number (closed at exec), then each to its
        // number: a source that sits on another's target is not clobbered.
        let mut moved = [0i32; MAX_INHERITED];
        for (i, (src, _)) in inherit.iter().enumerate() {
            moved[i] = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
            if moved[i] < 0 {
                fail();
            }
        }
        for (i, (_, dst)) in inherit.iter().enumerate() {
            if libc::dup2(moved[i], *dst) < 0 {
                fail();
            }
        }
        // Nothing else crosses the exec, whatever the caller forgot to mark close-on-exec
        // (the errno pipe is already so).
        if libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        ) < 0
        {
            fail();
        }
        for (_, dst) in inherit {
            if libc::fcntl(*dst, libc::F_SETFD, 0) < 0 {
                fail();
            }
        }
        // Handlers to their defaults first, then unblock: no handler of the caller's runs here.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command<'a>(program: &'a Path, args: &[&str], log: File) -> VmmCommand<'a> {
        VmmCommand {
            program,
            args: args.iter().map(OsString::from).collect(),
            log,
            inherit: Vec::new(),
            cgroup: None,
        }
    }

    #[tokio::test]
    async fn the_child_is_pid_1_of_its_own_namespace_and_its_status_comes_back() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it makes a PID namespace"
        );
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut p = VmmProcess::spawn(command(
            Path::new("/bin/sh"),
            &["-c", "echo pid $$ parent $PPID; exit 7"],
            log.reopen().unwrap(),
        ))
        .unwrap();
        assert!(p.id().is_some());
        let status = p.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        assert_eq!(p.id(), None);
        let out = std::fs::read_to_string(log.path()).unwrap();
        assert_eq!(out.trim(), "pid 1 parent 0");
    }

    #[tokio::test]
    async fn a_killed_child_reports_its_signal_and_a_missing_program_its_errno() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut p = VmmProcess::spawn(command(
            Path::new("/bin/sleep"),
            &["100"],
            log.reopen().unwrap(),
        ))
        .unwrap();
        let killer = p.killer().unwrap();
        let status = p.kill().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: the killer reaches nothing, whoever has that pid now.
        assert_eq!(killer.kill().unwrap_err().raw_os_error(), Some(libc::ESRCH));
        let e = VmmProcess::spawn(command(
            Path::new("/nonexistent/husk-vmm"),
            &[],
            log.reopen().unwrap(),
        ))
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    /// Stdin is a pipe nobody writes: the VMM's lifeline.
    #[tokio::test]
    async fn stdin_is_a_lifeline_pipe() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut p = VmmProcess::spawn(command(
            Path::new("/bin/sh"),
            &["-c", "readlink /proc/self/fd/0"],
            log.reopen().unwrap(),
        ))
        .unwrap();
        assert_eq!(p.wait().await.unwrap().code(), Some(0));
        let out = std::fs::read_to_string(log.path()).unwrap();
        assert!(out.starts_with("pipe:["), "{out}");
    }

    /// A file the caller left without close-on-exec does not reach the VMM.
    #[tokio::test]
    async fn only_the_files_given_are_inherited() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let stray = File::open("/dev/null").unwrap();
        // SAFETY: clearing FD_CLOEXEC on an fd we own.
        unsafe { libc::fcntl(stray.as_raw_fd(), libc::F_SETFD, 0) };
        let given = File::open("/dev/null").unwrap();
        let mut c = command(
            Path::new("/bin/sh"),
            &["-c", "ls /proc/self/fd | sort -n | xargs"],
            log.reopen().unwrap(),
        );
        c.inherit = vec![(given.as_raw_fd(), 5)];
        let mut p = VmmProcess::spawn(c).unwrap();
        assert_eq!(p.wait().await.unwrap().code(), Some(0));
        // 0-2, the given 5, and the fd ls opens to list /proc/self/fd (3).
        let out = std::fs::read_to_string(log.path()).unwrap();
        assert_eq!(out.trim(), "0 1 2 3 5", "stray fd {}", stray.as_raw_fd());
    }

    #[tokio::test]
    async fn inherited_files_arrive_at_their_numbers() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let data = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(data.path(), "inherited").unwrap();
        let f = File::open(data.path()).unwrap();
        let mut c = command(
            Path::new("/bin/sh"),
            &["-c", "cat <&5"],
            log.reopen().unwrap(),
        );
        c.inherit = vec![(f.as_raw_fd(), 5)];
        let mut p = VmmProcess::spawn(c).unwrap();
        assert_eq!(p.wait().await.unwrap().code(), Some(0));
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "inherited");
    }
}
