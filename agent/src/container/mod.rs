//! The container engine: creates containers from OCI runtime specs with namespaces,
//! mounts and cgroup v2, and runs processes in them. Synchronous; the service calls it
//! from `spawn_blocking`.
//!
//! Processes (see [`process`]): the agent never does setup work between fork and exec.
//! It re-execs itself (`agent_exe __container-init` / `__container-exec`) with the stdio on
//! 0/1/2 and three pipes (config in, status out, start in). The helper forks the container
//! process into the new (or joined) namespaces, reports its pid and exits; the container
//! process is then a child of the agent (PID 1 or subreaper) and the agent's reaper gets its
//! exit status. The engine never calls wait(2).
//!
//! Modules by concern: [`spec`] validation, [`cgroup`], [`mounts`] and the rootfs (both
//! behind the [`syscall`] seam), [`seccomp`], [`capabilities`], [`process`] (the helpers),
//! the handshake with a helper, [`channel`] (the pipes), pidfds.

pub mod capabilities;
pub mod cgroup;
pub mod channel;
mod error;
mod helper;
mod layers;
pub mod mounts;
mod pidfd;
pub mod pod_pid;
pub mod process;
mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod syscall;

use std::{
    fs::{self, File},
    io::{self, Write},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

pub use error::{ContainerError, CreateError, DestroyError, ExecError, StartError};
pub use layers::{LayerSpec, LayerStore, Layered};
pub use rootfs::RootfsSource;

use cgroup::{Cgroup, CgroupError};
use channel::{Msg, Reader};
use helper::{Helper, Verb};
use pidfd::{exit_status, pidfd_open, pidfd_signal, wait_exited};
use process::{ExecConfig, InitConfig};
use spec::SpecError;
use syscall::Linux;

/// How long the container's setup (mounts etc.) may take. Generous: nested guests run under
/// TCG, 10-30x slower than native.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long destroy waits for the container's processes to die after SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The stdio fds of a process; the engine dup2()s them to 0/1/2 in the child. With
/// `terminal` all three are the same pty slave: the child does setsid() + TIOCSCTTY.
///
/// The engine consumes (closes) these fds in the agent once the helper has them.
#[derive(Debug)]
pub struct ProcessIo {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub terminal: bool,
}

/// The engine's configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// cgroup v2 directory under which sandboxes live: container cgroup = <root>/<sandbox_id>/<container_id>.
    /// None = no cgroup support (then a spec with resource limits is an error naming linux.resources).
    pub cgroup_root: Option<PathBuf>,
    /// Per-container state (e.g. block rootfs mount point): <state_dir>/<id>/...
    pub state_dir: PathBuf,
    /// The agent binary to re-exec for the in-container helpers (normally /proc/self/exe).
    pub agent_exe: PathBuf,
    /// The pod's image layers and scratch drive, shared by its containers.
    pub layers: std::sync::Arc<LayerStore>,
}

/// Called first thing in main(): if argv[1] is one of the engine's internal re-exec verbs
/// (e.g. "__container-init", "__container-exec"), runs that helper and never returns; otherwise returns.
pub fn maybe_run_child() {
    let Some(verb) = std::env::args_os().nth(1) else {
        return;
    };
    if verb == process::VERB_INIT || verb == process::VERB_EXEC {
        process::run(&verb);
    }
    if verb == pod_pid::VERB {
        pod_pid::run();
    }
}

/// A container: its init process (created, then started), cgroup, rootfs and state.
#[derive(Debug)]
pub struct Container {
    id: String,
    agent_exe: PathBuf,
    /// <state_dir>/<id>
    state_dir: PathBuf,
    /// The block rootfs we mounted, if any.
    rootfs_mount: Option<PathBuf>,
    /// The layers and scratch directory a layered rootfs holds.
    layered: Option<(std::sync::Arc<LayerStore>, layers::Held)>,
    cgroup: Option<Cgroup>,
    init_pid: Pid,
    init_pidfd: Option<OwnedFd>,
    /// The start pipe; None once started.
    start_tx: Option<File>,
    /// The init's status pipe, read again by start() for execve errors.
    status_rx: Option<Reader>,
    seccomp: Option<seccomp::Program>,
    /// The init's pid namespace (`pid:[...]`), when the container has its own.
    pid_ns: Option<String>,
    /// Whether the container has a PID namespace of its own (not the pod's or another's).
    own_pid_ns: bool,
    destroyed: bool,
}

impl Container {
    /// Validates the spec, prepares the rootfs, creates the cgroup and applies limits, then spawns the
    /// container's init process in new namespaces; it sets up mounts, pivot_root, hostname, rlimits,
    /// user, caps, no_new_privileges, masked/readonly paths, seccomp, cwd, env, and then WAITS before execve
    /// until start(). Returns once setup has completed. On any failure everything is undone (no mount,
    /// cgroup, process or state dir left) and a typed error says what failed.
    pub fn create(
        cfg: &EngineConfig,
        sandbox_id: &str,
        id: &str,
        spec: Spec,
        rootfs: RootfsSource,
        io: ProcessIo,
    ) -> Result<Container, CreateError> {
        spec::validate(&spec)?;
        let resources = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .map(cgroup::resources_to_files)
            .transpose()
            .map_err(CreateError::Cgroup)?
            .unwrap_or_default();
        if cfg.cgroup_root.is_none() && !resources.is_empty() {
            return Err(SpecError::new(
                "spec.linux.resources",
                "resource limits need cgroup support, and the agent runs without cgroups",
            )
            .into());
        }
        let seccomp = spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().as_ref())
            .map(seccomp::compile)
            .transpose()?;
        let own_pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
            });

        let mut c = Container {
            id: id.to_string(),
            agent_exe: cfg.agent_exe.clone(),
            state_dir: cfg.state_dir.join(id),
            rootfs_mount: None,
            layered: None,
            cgroup: None,
            init_pid: Pid::from_raw(0),
            init_pidfd: None,
            start_tx: None,
            status_rx: None,
            seccomp,
            pid_ns: None,
            own_pid_ns,
            destroyed: false,
        };
        match c.setup(cfg, sandbox_id, spec, rootfs, &resources, io, own_pid_ns) {
            Ok(()) => {
                tracing::debug!(container = %id, pid = %c.init_pid, "container created");
                Ok(c)
            }
            Err(e) => {
                if let Err(d) = c.destroy() {
                    tracing::warn!(container = %id, "cleaning up a failed create: {d}");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setup(
        &mut self,
        cfg: &EngineConfig,
        sandbox_id: &str,
        spec: Spec,
        rootfs: RootfsSource,
        resources: &[(String, String)],
        io: ProcessIo,
        own_pid_ns: bool,
    ) -> Result<(), CreateError> {
        fs::create_dir_all(&self.state_dir).map_err(|source| CreateError::StateDir {
            path: self.state_dir.clone(),
            source,
        })?;
        let rootfs_dir = match rootfs {
            RootfsSource::Path(p) => {
                if !p.is_dir() {
                    return Err(CreateError::InvalidRootfs {
                        path: p,
                        problem: "not a directory".into(),
                    });
                }
                p
            }
            RootfsSource::Block {
                source,
                fstype,
                options,
                readonly,
            } => {
                let target = self.state_dir.join("rootfs");
                rootfs::mount_block(&Linux, &source, &fstype, &options, readonly, &target)?;
                self.rootfs_mount = Some(target.clone());
                target
            }
            RootfsSource::Layered(l) => {
                let target = self.state_dir.join("rootfs");
                let held = cfg.layers.mount(&Linux, &self.id, &l, &target)?;
                self.layered = Some((cfg.layers.clone(), held));
                self.rootfs_mount = Some(target.clone());
                target
            }
        };
        let rootfs_dir = rootfs_dir
            .canonicalize()
            .map_err(|e| CreateError::InvalidRootfs {
                path: rootfs_dir.clone(),
                problem: e.to_string(),
            })?;
        if let Some(root) = &cfg.cgroup_root {
            self.cgroup = Some(
                Cgroup::create(root, sandbox_id, &self.id, resources)
                    .map_err(CreateError::Cgroup)?,
            );
        }

        let config = InitConfig {
            spec,
            rootfs: rootfs_dir,
            seccomp: self.seccomp.clone(),
            terminal: io.terminal,
        };
        let mut helper = Helper::start(
            &self.agent_exe,
            Verb::Init,
            io,
            self.cgroup.as_ref(),
            &config,
        )?;
        let mut ready = false;
        loop {
            let msg = helper.next().map_err(CreateError::Channel)?;
            match msg {
                Some(Msg::Pid { pid }) => {
                    self.init_pid = Pid::from_raw(pid);
                    match pidfd_open(self.init_pid) {
                        Ok(fd) => self.init_pidfd = Some(fd),
                        // Already exited and reaped (its report, an error, is still in the
                        // pipe): read on.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(source) => {
                            return Err(CreateError::Pidfd {
                                pid: self.init_pid,
                                source,
                            })
                        }
                    }
                    if ready && self.init_pidfd.is_some() {
                        break;
                    }
                }
                // The helper reports the pid and the init reports readiness: two processes
                // writing to one pipe, so Ready may come first when the init is scheduled
                // before its parent. Setup is done once both are in.
                Some(Msg::Ready) => {
                    ready = true;
                    if self.init_pidfd.is_some() {
                        break;
                    }
                }
                Some(Msg::Error(e)) => return Err(CreateError::Setup(e)),
                Some(Msg::ExecFailed { program, message }) => {
                    return Err(CreateError::Setup(channel::ChildError::new(
                        format!("exec {program:?}"),
                        message,
                    )))
                }
                None => {
                    let (who, status) = match (&self.init_pidfd, self.init_pid.as_raw()) {
                        (Some(fd), _) => ("init", exit_status(fd, helper.deadline())),
                        // Reported, then gone before we could watch it.
                        (None, p) if p != 0 => ("init", None),
                        (None, _) => ("init helper", helper.exit_status()),
                    };
                    if self.oom_kills().unwrap_or(0) > 0 {
                        let limit = self
                            .cgroup_path()
                            .and_then(|p| fs::read_to_string(p.join("memory.max")).ok())
                            .map(|m| match m.trim() {
                                "max" => "none".to_string(),
                                bytes => format!("{bytes} bytes"),
                            })
                            .unwrap_or_else(|| "unknown".into());
                        return Err(CreateError::OomAtSetup { who, limit });
                    }
                    return Err(CreateError::Exited { who, status });
                }
            }
        }
        let (status, start) = helper.finish();
        self.status_rx = Some(status);
        self.start_tx = start;
        if own_pid_ns {
            self.pid_ns = fs::read_link(format!("/proc/{}/ns/pid", self.init_pid))
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
        }
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init's pid as seen by the agent.
    pub fn init_pid(&self) -> Pid {
        self.init_pid
    }

    /// Lets the init process execve the user program. An execve failure (e.g. no such file) is an
    /// error naming the program (learnt through a CLOEXEC pipe; the init process then exits 127).
    pub fn start(&mut self) -> Result<(), StartError> {
        if self.destroyed {
            return Err(StartError::Destroyed);
        }
        let mut tx = self.start_tx.take().ok_or(StartError::AlreadyStarted)?;
        if tx.write_all(b"S").is_err() {
            return Err(StartError::InitGone);
        }
        drop(tx);
        let Some(mut status) = self.status_rx.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + SETUP_TIMEOUT;
        loop {
            match status
                .next(deadline, SETUP_TIMEOUT)
                .map_err(StartError::Channel)?
            {
                None => return Ok(()),
                Some(Msg::ExecFailed { program, message }) => {
                    return Err(StartError::Exec { program, message })
                }
                Some(Msg::Error(e)) => return Err(StartError::Setup(e)),
                Some(_) => {}
            }
        }
    }

    /// Runs another process inside the running container (setns into its mnt/pid/uts/ipc/net/cgroup
    /// namespaces, its cgroup, its own user/env/cwd/caps/rlimits from `process`, the
    /// container's seccomp filter). Returns its pid (agent's view) once it has exec'd.
    pub fn exec(&self, process: &Process, io: ProcessIo) -> Result<Pid, ExecError> {
        spec::validate_process("process", process)?;
        if self.destroyed || !self.init_alive() {
            return Err(ExecError::NotRunning);
        }
        let config = ExecConfig {
            process: process.clone(),
            init_pid: self.init_pid.as_raw(),
            seccomp: self.seccomp.clone(),
            terminal: io.terminal,
        };
        let mut helper = Helper::start(
            &self.agent_exe,
            Verb::Exec,
            io,
            self.cgroup.as_ref(),
            &config,
        )?;
        let mut pid = None;
        loop {
            let msg = helper.next().map_err(|e| {
                if let Some(p) = pid {
                    let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
                }
                ExecError::Channel(e)
            })?;
            match msg {
                Some(Msg::Pid { pid: p }) => pid = Some(Pid::from_raw(p)),
                Some(Msg::Error(e)) => return Err(ExecError::Setup(e)),
                Some(Msg::ExecFailed { program, message }) => {
                    return Err(ExecError::Exec { program, message })
                }
                Some(Msg::Ready) => {}
                None => break,
            }
        }
        let pid = pid.ok_or(ExecError::Exited)?;
        helper.finish();
        Ok(pid)
    }

    /// Whether the container has a PID namespace of its own. One that shares a namespace
    /// keeps processes its init forked after the init exits, unless they are killed.
    pub fn owns_pid_namespace(&self) -> bool {
        self.own_pid_ns
    }

    /// Whether the init process still runs (not yet exited; it may be unreaped).
    fn init_alive(&self) -> bool {
        match &self.init_pidfd {
            Some(fd) => !wait_exited(fd, Instant::now()),
            None => false,
        }
    }

    /// The container's processes, agent's view: the cgroup's, or those in the init's pid
    /// namespace, or just the init.
    pub fn pids(&self) -> Result<Vec<Pid>, ContainerError> {
        if self.destroyed {
            return Err(ContainerError::Destroyed);
        }
        if let Some(cg) = &self.cgroup {
            return Ok(cg.procs()?);
        }
        if let Some(ns) = &self.pid_ns {
            let mut out = Vec::new();
            for e in fs::read_dir("/proc")
                .map_err(ContainerError::Proc)?
                .flatten()
            {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let link = fs::read_link(format!("/proc/{pid}/ns/pid"));
                if link.is_ok_and(|l| l.to_string_lossy() == ns.as_str()) {
                    out.push(Pid::from_raw(pid));
                }
            }
            return Ok(out);
        }
        Ok(if self.init_alive() {
            vec![self.init_pid]
        } else {
            Vec::new()
        })
    }

    /// Signals every process of the container (SIGKILL via cgroup.kill when there is a cgroup).
    pub fn signal_all(&self, sig: Signal) -> Result<(), ContainerError> {
        if self.destroyed {
            return Err(ContainerError::Destroyed);
        }
        if let (Some(cg), Signal::SIGKILL) = (&self.cgroup, sig) {
            return Ok(cg.kill_all()?);
        }
        for pid in self.pids()? {
            let r = if pid == self.init_pid {
                match &self.init_pidfd {
                    Some(fd) => pidfd_signal(fd, sig)
                        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))),
                    None => Ok(()),
                }
            } else {
                nix::sys::signal::kill(pid, sig)
            };
            match r {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(source) => {
                    return Err(ContainerError::Signal {
                        signal: sig,
                        pid,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn cg(&self) -> Result<&Cgroup, CgroupError> {
        self.cgroup.as_ref().ok_or(CgroupError::NoCgroup)
    }

    /// Applies new resource limits.
    pub fn update(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let files = cgroup::resources_to_files(res)?;
        self.cg()?.apply(&files)
    }

    /// cpu.stat, memory.current/max/stat/events, swap, pids.current/max, io.stat.
    pub fn stats(&self) -> Result<cgroup::Stats, CgroupError> {
        self.cg()?.stats()
    }

    /// Freezes the container (cgroup.freeze).
    pub fn pause(&self) -> Result<(), CgroupError> {
        self.cg()?.freeze(true)
    }

    pub fn resume(&self) -> Result<(), CgroupError> {
        self.cg()?.freeze(false)
    }

    /// The memory.events oom_kill counter (0 without a memory controller or cgroup).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        match &self.cgroup {
            Some(cg) => cg.oom_kills(),
            None => Ok(0),
        }
    }

    /// The container's cgroup directory, if any (the service watches memory.events for OOM events).
    pub fn cgroup_path(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(Cgroup::path)
    }

    /// Kills every remaining process (SIGKILL), waits (bounded) until the cgroup / pid namespace is empty,
    /// unmounts the rootfs, removes cgroup and state dir. Idempotent; also called on a failed create.
    /// On error the steps not done are retried by the next call.
    pub fn destroy(&mut self) -> Result<(), DestroyError> {
        if self.destroyed {
            return Ok(());
        }
        // An init still waiting for start exits when the start pipe closes.
        self.start_tx = None;
        self.status_rx = None;
        if let Some(cg) = &self.cgroup {
            cg.kill_all().map_err(DestroyError::Kill)?;
        }
        if let Some(fd) = &self.init_pidfd {
            // SIGKILL to a pid namespace's init kills the whole namespace.
            let _ = pidfd_signal(fd, Signal::SIGKILL);
            if !wait_exited(fd, Instant::now() + KILL_TIMEOUT) {
                return Err(DestroyError::InitAlive {
                    pid: self.init_pid,
                    timeout: KILL_TIMEOUT,
                });
            }
        }
        if let Some(cg) = &self.cgroup {
            // rmdir succeeds only once the last process is gone.
            cg.remove(KILL_TIMEOUT).map_err(DestroyError::Cgroup)?;
        }
        if let Some(m) = &self.rootfs_mount {
            rootfs::unmount(&Linux, m)?;
            self.rootfs_mount = None;
        }
        if let Some((store, held)) = self.layered.take() {
            store.release(&Linux, &held)?;
        }
        // Only rmdir: never recurse into what might still be a mounted rootfs.
        for dir in [self.state_dir.join("rootfs"), self.state_dir.clone()] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DestroyError::StateDir { path: dir, source }),
            }
        }
        self.init_pidfd = None;
        self.destroyed = true;
        tracing::debug!(container = %self.id, "container destroyed");
        Ok(())
    }
}
