//! The re-exec'd helpers: `husk-agent __container-init` and `husk-agent __container-exec`.
//!
//! They run in a fresh single-threaded process (never in the multi-threaded agent), with
//! stdio already on 0/1/2 and the pipes at fixed fds:
//! - [`FD_CONFIG`]: the JSON configuration, until EOF;
//! - [`FD_STATUS`]: status messages to the agent ([`Msg`]), close-on-exec in the container
//!   process, so EOF tells the agent the user program was exec'd;
//! - [`FD_START`] (init only): the agent writes a byte (or closes it) to release execve.
//!
//! Fork chain: the helper joins / creates the namespaces, forks the container process (pid 1
//! of a new pid namespace, or an exec'd process inside the container's), reports its pid and
//! exits, so the container process is reparented to the agent (PID 1 or subreaper), whose
//! reaper collects its exit status.

use std::{
    convert::Infallible,
    ffi::{CString, OsStr, OsString},
    fs::{self, File},
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, FcntlArg, FdFlag},
    sched::CloneFlags,
    sys::{
        resource::{setrlimit, Resource},
        signal::{SigHandler, SigSet, SigmaskHow, Signal},
        stat::Mode,
    },
    unistd::{ForkResult, Gid, Uid},
};
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Process, Spec};
use serde::{Deserialize, Serialize};

use super::{
    capabilities,
    channel::{self, ChildError, Msg, Step},
    mounts, seccomp,
    syscall::{Linux, Syscall},
};

pub const VERB_INIT: &str = "__container-init";
pub const VERB_EXEC: &str = "__container-exec";
pub const FD_CONFIG: RawFd = 3;
pub const FD_STATUS: RawFd = 4;
pub const FD_START: RawFd = 5;

/// What `__container-init` gets on [`FD_CONFIG`].
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub spec: Spec,
    /// The rootfs directory in the agent's mount namespace.
    pub rootfs: PathBuf,
    pub seccomp: Option<seccomp::Program>,
    pub terminal: bool,
}

/// What `__container-exec` gets on [`FD_CONFIG`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    pub process: Process,
    /// The container's init, whose namespaces to join.
    pub init_pid: i32,
    pub seccomp: Option<seccomp::Program>,
    pub terminal: bool,
}

/// The default PATH for finding the program when the process's env has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs a helper verb and exits. Called by `maybe_run_child` in the re-exec'd agent.
pub fn run(verb: &OsStr) -> ! {
    // SAFETY: by the protocol with the agent, fd FD_STATUS is the status pipe's write end,
    // open and owned by nobody else in this fresh process.
    let mut status = File::from(unsafe { OwnedFd::from_raw_fd(FD_STATUS) });
    // A panic (a bug) in the helper or the container's init is reported like any setup error,
    // instead of an unexplained exit.
    std::panic::set_hook(Box::new(|info| {
        // SAFETY: FD_STATUS stays open for the life of this process (`status` owns it; the
        // ManuallyDrop keeps this borrow from closing it).
        let mut f =
            std::mem::ManuallyDrop::new(File::from(unsafe { OwnedFd::from_raw_fd(FD_STATUS) }));
        let _ = channel::send(
            &mut f,
            &Msg::Error(ChildError::new("panic", info.to_string())),
        );
    }));
    let is_init = verb == VERB_INIT;
    let keep: &[RawFd] = if is_init {
        &[FD_CONFIG, FD_STATUS, FD_START]
    } else {
        &[FD_CONFIG, FD_STATUS]
    };
    close_other_fds(keep);
    let res = read_config().and_then(|bytes| {
        if is_init {
            let cfg: InitConfig = serde_json::from_slice(&bytes)
                .map_err(|e| ChildError::new("decoding the init configuration", e.to_string()))?;
            // SAFETY: by the protocol, FD_START is the start pipe's read end, owned by nobody else.
            let start = File::from(unsafe { OwnedFd::from_raw_fd(FD_START) });
            run_init(cfg, &mut status, start)
        } else {
            let cfg: ExecConfig = serde_json::from_slice(&bytes)
                .map_err(|e| ChildError::new("decoding the exec configuration", e.to_string()))?;
            run_exec(cfg, &mut status)
        }
    });
    let Err(e) = res;
    let _ = channel::send(&mut status, &Msg::Error(e));
    exit(1)
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or destructors, which
    // is what a helper that may have forked wants.
    unsafe { libc::_exit(code) }
}

/// Closes every fd except stdio and `keep`: the multi-threaded agent may have leaked
/// descriptors (e.g. another container's pipes) into this process between fork and exec.
fn close_other_fds(keep: &[RawFd]) {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // The directory's own fd is already closed here: EBADF, ignored.
        let _ = nix::unistd::close(fd);
    }
}

fn read_config() -> Result<Vec<u8>, ChildError> {
    // SAFETY: by the protocol, FD_CONFIG is the config pipe's read end, owned by nobody else.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(FD_CONFIG) });
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .step(|| "reading the configuration".into())?;
    Ok(buf)
}

fn set_cloexec(fd: RawFd) -> Result<(), ChildError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .step(|| format!("setting close-on-exec on fd {fd}"))
}

fn clone_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

fn set_oom_score_adj(adj: Option<i32>) -> Result<(), ChildError> {
    if let Some(adj) = adj {
        fs::write("/proc/self/oom_score_adj", adj.to_string())
            .step(|| format!("setting oom_score_adj {adj}"))?;
    }
    Ok(())
}

/// Forks; the parent reports the child's pid and exits, the child returns.
fn fork_and_report(status: &mut File) -> Result<(), ChildError> {
    // SAFETY: this helper process is single-threaded (a fresh exec of the agent that started
    // no threads), so the child may do anything after fork.
    match unsafe { nix::unistd::fork() }.step(|| "forking the container process".into())? {
        ForkResult::Parent { child } => {
            let _ = channel::send(
                status,
                &Msg::Pid {
                    pid: child.as_raw(),
                },
            );
            exit(0)
        }
        ForkResult::Child => Ok(()),
    }
}

fn run_init(cfg: InitConfig, status: &mut File, mut start: File) -> Result<Infallible, ChildError> {
    set_cloexec(status.as_raw_fd())?;
    set_cloexec(start.as_raw_fd())?;
    let spec = &cfg.spec;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ChildError::new("reading the spec", "spec.process is missing"))?;
    set_oom_score_adj(process.oom_score_adj())?;

    // Join the namespaces that have a path, create the others.
    let mut new = CloneFlags::empty();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        // The network namespace is the VM's own (its interfaces are the pod's): never a new
        // one, never another.
        if ns.typ() == LinuxNamespaceType::Network {
            continue;
        }
        match ns.path() {
            Some(p) => {
                let f = File::open(p).step(|| format!("opening namespace {}", p.display()))?;
                nix::sched::setns(f, clone_flag(ns.typ()))
                    .step(|| format!("joining the {} namespace {}", ns.typ(), p.display()))?;
            }
            None => new |= clone_flag(ns.typ()),
        }
    }
    nix::sched::unshare(new).step(|| format!("creating namespaces {new:?}"))?;

    fork_and_report(status)?;
    // The container's init from here on (pid 1 of its pid namespace).
    session(cfg.terminal)?;
    // Devices and mount points get exactly the modes asked for.
    nix::sys::stat::umask(Mode::empty());
    let sys = Linux;
    mounts::prepare_rootfs(&sys, spec, &cfg.rootfs)?;
    sys.pivot_root(&cfg.rootfs)
        .step(|| format!("pivot_root to {}", cfg.rootfs.display()))?;
    if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h).step(|| format!("setting the hostname {h:?}"))?;
    }
    if let Some(d) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        // SAFETY: the pointer and length describe `d`'s bytes, valid for the call.
        let rc = unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) };
        Errno::result(rc).step(|| format!("setting the domainname {d:?}"))?;
    }
    if let Some(sysctl) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
        let mut keys: Vec<_> = sysctl.iter().collect();
        keys.sort();
        for (k, v) in keys {
            fs::write(mounts::sysctl_path(k), v).step(|| format!("setting sysctl {k}={v}"))?;
        }
    }
    // Masked and read-only paths after the sysctls (/proc/sys is usually read-only).
    mounts::finish_rootfs(&sys, spec)?;
    let late_filter = finalize(process, cfg.seccomp.as_ref())?;
    let exec = Exec::prepare(process, late_filter)?;
    channel::send(status, &Msg::Ready).step(|| "reporting readiness".into())?;

    let mut byte = [0u8; 1];
    loop {
        match start.read(&mut byte) {
            Ok(1) => break,
            // The agent closed the pipe without starting us: the container is going away.
            Ok(_) => exit(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => exit(0),
        }
    }
    drop(start);
    exec.run(status)
}

fn run_exec(cfg: ExecConfig, status: &mut File) -> Result<Infallible, ChildError> {
    set_cloexec(status.as_raw_fd())?;
    set_oom_score_adj(cfg.process.oom_score_adj())?;
    let init = cfg.init_pid;
    // Join every namespace in which the init differs from us; the mount namespace last,
    // since it changes what /proc is.
    let kinds = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut join = Vec::new();
    for (name, flag) in kinds {
        let theirs = format!("/proc/{init}/ns/{name}");
        let target = fs::read_link(&theirs)
            .step(|| format!("reading {theirs} (is the container running?)"))?;
        let ours = fs::read_link(format!("/proc/self/ns/{name}")).ok();
        if ours.as_ref() != Some(&target) {
            let f = File::open(&theirs).step(|| format!("opening {theirs}"))?;
            join.push((name, flag, f));
        }
    }
    for (name, flag, f) in join {
        nix::sched::setns(f, flag).step(|| format!("joining the container's {name} namespace"))?;
    }
    fork_and_report(status)?;
    session(cfg.terminal)?;
    let process = &cfg.process;
    let late_filter = finalize(process, cfg.seccomp.as_ref())?;
    let exec = Exec::prepare(process, late_filter)?;
    exec.run(status)
}

/// A new session; with a terminal, stdin (the pty slave) becomes the controlling terminal.
fn session(terminal: bool) -> Result<(), ChildError> {
    nix::unistd::setsid().step(|| "setsid".into())?;
    if terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the pty slave we were given.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        Errno::result(rc).step(|| "making the pty the controlling terminal".into())?;
    }
    Ok(())
}

fn rlimit_resource(t: PosixRlimitType) -> Resource {
    match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// rlimits, seccomp, user, capabilities, no_new_privileges, umask, cwd: everything about
/// the process itself, in the order that keeps the needed privileges until they are used.
/// With no_new_privileges the seccomp filter is not installed here but returned, for
/// [`Exec::run`] to install right before execve (as runc does), so the profile never has to
/// allow the helper's own remaining system calls.
fn finalize<'a>(
    p: &Process,
    filter: Option<&'a seccomp::Program>,
) -> Result<Option<&'a seccomp::Program>, ChildError> {
    for r in p.rlimits().iter().flatten() {
        setrlimit(rlimit_resource(r.typ()), r.soft(), r.hard())
            .step(|| format!("setting {} to {}/{}", r.typ(), r.soft(), r.hard()))?;
    }
    let nnp = p.no_new_privileges().unwrap_or(false);
    let filter = filter.filter(|f| !f.filters.is_empty());
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while we have it.
    if let (false, Some(f)) = (nnp, filter) {
        seccomp::apply(f).step(|| "installing the seccomp filter".into())?;
    }
    let caps = p.capabilities().as_ref();
    if let Some(c) = caps {
        capabilities::drop_bounding(c)?;
        prctl(libc::PR_SET_KEEPCAPS, 1).step(|| "PR_SET_KEEPCAPS".into())?;
    }
    let user = p.user();
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).step(|| format!("setgroups {gids:?}"))?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).step(|| format!("setting gid {gid}"))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).step(|| format!("setting uid {uid}"))?;
    if let Some(c) = caps {
        capabilities::set_sets(c)?;
        prctl(libc::PR_SET_KEEPCAPS, 0).step(|| "PR_SET_KEEPCAPS".into())?;
    }
    if nnp {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1).step(|| "PR_SET_NO_NEW_PRIVS".into())?;
    }
    let umask = user.umask().unwrap_or(0o022);
    nix::sys::stat::umask(Mode::from_bits_truncate(umask & 0o777));
    nix::unistd::chdir(p.cwd()).step(|| format!("changing to the cwd {}", p.cwd().display()))?;
    Ok(filter.filter(|_| nnp))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the prctl options used here take integer arguments only.
    let rc = unsafe { libc::prctl(option, arg, 0, 0, 0) };
    Errno::result(rc).map(drop)
}

fn cstring(field: &str, s: &[u8]) -> Result<CString, ChildError> {
    CString::new(s).map_err(|_| ChildError::new(field, "contains a NUL byte"))
}

/// The user program, ready to execve.
struct Exec {
    program: String,
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// A seccomp filter to install right before execve, and its flags.
    filter: Option<(Vec<Vec<libc::sock_filter>>, u32)>,
}

impl Exec {
    fn prepare(p: &Process, filter: Option<&seccomp::Program>) -> Result<Exec, ChildError> {
        let args = p.args().clone().unwrap_or_default();
        let program = args
            .first()
            .cloned()
            .ok_or_else(|| ChildError::new("process.args", "must not be empty"))?;
        let mut env: Vec<String> = p.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", home_of(p.user().uid())));
        }
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_string();
        let candidates: Vec<PathBuf> = if program.contains('/') {
            vec![PathBuf::from(&program)]
        } else {
            path.split(':')
                .map(|d| if d.is_empty() { "." } else { d })
                .map(|d| Path::new(d).join(&program))
                .collect()
        };
        Ok(Exec {
            candidates: candidates
                .iter()
                .map(|c| cstring("process.args[0]", c.as_os_str().as_bytes()))
                .collect::<Result<_, _>>()?,
            argv: args
                .iter()
                .map(|a| cstring("process.args", a.as_bytes()))
                .collect::<Result<_, _>>()?,
            envp: env
                .iter()
                .map(|e| cstring("process.env", e.as_bytes()))
                .collect::<Result<_, _>>()?,
            program,
            filter: filter.map(|f| (seccomp::to_kernel(f), f.flags)),
        })
    }

    /// execve's the program (trying PATH like execvp); on failure reports it and exits 127.
    fn run(self, status: &mut File) -> ! {
        reset_signals();
        if let Some((filters, flags)) = &self.filter {
            if let Err(e) = seccomp::install(filters, *flags) {
                let _ = channel::send(
                    status,
                    &Msg::ExecFailed {
                        program: self.program,
                        message: format!("installing the seccomp filter: {e}"),
                    },
                );
                exit(127)
            }
        }
        let mut err = Errno::ENOENT;
        for c in &self.candidates {
            let Err(e) = nix::unistd::execve(c, &self.argv, &self.envp);
            match e {
                // Try the next PATH entry, remembering a permission problem.
                Errno::ENOENT | Errno::ENOTDIR => {}
                Errno::EACCES => err = e,
                e => {
                    err = e;
                    break;
                }
            }
        }
        let message = if err == Errno::ENOENT && !self.program.contains('/') {
            "executable file not found in $PATH".to_string()
        } else {
            err.desc().to_lowercase()
        };
        let _ = channel::send(
            status,
            &Msg::ExecFailed {
                program: self.program,
                message,
            },
        );
        exit(127)
    }
}

/// Default dispositions and an empty mask: the Rust runtime of this helper ignores SIGPIPE,
/// and the agent may block signals; neither may leak into the container's program.
fn reset_signals() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours in a signal context.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
}

/// The home directory of `uid` from the container's /etc/passwd, or "/".
fn home_of(uid: u32) -> String {
    let Ok(text) = fs::read("/etc/passwd") else {
        return "/".into();
    };
    for line in text.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b':').collect();
        if fields.len() >= 6 && fields[2] == uid.to_string().as_bytes() {
            let home = OsString::from(OsStr::from_bytes(fields[5]));
            if let Some(h) = home.to_str().filter(|h| !h.is_empty()) {
                return h.to_string();
            }
        }
    }
    "/".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_names_map() {
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitNofile),
            Resource::RLIMIT_NOFILE
        );
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitRttime),
            Resource::RLIMIT_RTTIME
        );
    }

    #[test]
    fn exec_candidates_follow_path() {
        let p: Process = serde_json::from_value(serde_json::json!({
            "args": ["sh", "-c", "true"], "cwd": "/",
            "env": ["PATH=/usr/bin:/bin", "A=1"], "user": {"uid": 0, "gid": 0}
        }))
        .unwrap();
        let e = Exec::prepare(&p, None).unwrap();
        assert_eq!(
            e.candidates,
            vec![
                CString::new("/usr/bin/sh").unwrap(),
                CString::new("/bin/sh").unwrap()
            ]
        );
        assert_eq!(e.argv.len(), 3);
        assert!(e.envp.iter().any(|v| v.to_bytes().starts_with(b"HOME=")));

        let p: Process = serde_json::from_value(serde_json::json!({
            "args": ["/bin/true"], "cwd": "/", "env": ["HOME=/root"], "user": {"uid": 0, "gid": 0}
        }))
        .unwrap();
        let e = Exec::prepare(&p, None).unwrap();
        assert_eq!(e.candidates, vec![CString::new("/bin/true").unwrap()]);
        assert_eq!(e.envp, vec![CString::new("HOME=/root").unwrap()]);
    }
}
