//! The sandbox: the pod's containers and their processes, and the operations on them.
//!
//! Locking: the container map is locked only to look up, reserve or remove an id, never
//! across blocking work. Each container's engine object has its own lock, taken inside
//! `spawn_blocking` for engine calls. Processes keep their state in watch channels.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use husk_proto::agent as pb;
use nix::{sys::signal::Signal, unistd::Pid};
use oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::{
    container::{self, Container, EngineConfig, LayerSpec, Layered, RootfsSource},
    error::AgentError,
    oom::{self, MemoryEvents, OomEvents},
    reaper::{ExitWatch, Reaper},
    stdio::{self, StreamRegistry, Streams},
};

type Result<T> = std::result::Result<T, AgentError>;

/// One process of a container: its init or an exec'd one.
#[derive(Debug)]
pub struct ProcessEntry {
    pub pid: Pid,
    exit: ExitWatch,
    streams: Streams,
}

impl ProcessEntry {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[derive(Debug, Default)]
struct Flags {
    started: bool,
    paused: bool,
}

/// A container of the sandbox.
#[derive(Debug)]
pub struct ContainerEntry {
    id: String,
    engine: Arc<Mutex<Container>>,
    flags: Mutex<Flags>,
    init: Arc<ProcessEntry>,
    execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
    /// memory.events of the container's cgroup, for OOM events.
    memory_events: Option<MemoryEvents>,
}

impl ContainerEntry {
    fn process(&self, exec_id: &str) -> Result<Arc<ProcessEntry>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            AgentError::NotFound(format!(
                "container {:?} has no process {exec_id:?}",
                self.id
            ))
        })
    }

    fn running(&self) -> bool {
        lock(&self.flags).started && !self.init.exited()
    }

    /// Runs `f` on the engine object in a blocking thread, under the container's lock.
    async fn with_engine<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Container) -> T + Send + 'static,
    ) -> Result<T> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&engine)))
            .await
            .map_err(|e| AgentError::Internal(format!("engine task failed: {e}")))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Slot {
    /// Being created: the id is taken, the container not yet usable.
    Creating,
    Ready(Arc<ContainerEntry>),
}

/// The agent's state: one sandbox and its containers.
pub struct Sandbox {
    engine_cfg: EngineConfig,
    reaper: Arc<Reaper>,
    streams: Arc<StreamRegistry>,
    sandbox_id: Mutex<Option<String>>,
    containers: Mutex<HashMap<String, Slot>>,
    oom: OomEvents,
    /// The pod's shared PID namespace, for the containers that ask for it.
    pod_pid: container::pod_pid::PodPidNamespace,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

/// Checks an id that names a container or process: it ends up in paths and stream headers.
fn check_id(field: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{field}: {id:?} is not a valid id (1-128 of [A-Za-z0-9._-], not starting with '.')"
        )))
    }
}

impl Sandbox {
    pub fn new(
        engine_cfg: EngineConfig,
        reaper: Arc<Reaper>,
        streams: Arc<StreamRegistry>,
    ) -> Arc<Self> {
        let (oom_tx, oom) = oom::channel();
        let sb = Arc::new(Sandbox {
            engine_cfg,
            reaper,
            streams,
            sandbox_id: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            oom,
            pod_pid: Default::default(),
        });
        tokio::spawn(oom::watch(Arc::downgrade(&sb), oom_tx));
        sb
    }

    fn sandbox_id(&self) -> String {
        lock(&self.sandbox_id)
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }

    /// Creates the sandbox. `owns_kernel`: the agent is the guest's PID 1, so the hostname
    /// and `sysctls` are set in its kernel (as a host process for tests, a sandbox with
    /// sysctls is refused rather than touching the host's).
    pub fn create_sandbox(
        &self,
        id: &str,
        hostname: &str,
        sysctls: &std::collections::HashMap<String, String>,
        shared_fs_tag: &str,
        owns_kernel: bool,
    ) -> Result<()> {
        check_id("sandbox_id", id)?;
        let mut cur = lock(&self.sandbox_id);
        if let Some(existing) = cur.as_ref() {
            return Err(AgentError::AlreadyExists(format!(
                "this agent already runs sandbox {existing:?}"
            )));
        }
        if owns_kernel && !hostname.is_empty() {
            nix::unistd::sethostname(hostname)
                .map_err(|e| AgentError::internal("setting the hostname", &e))?;
        }
        if !sysctls.is_empty() {
            if !owns_kernel {
                return Err(AgentError::FailedPrecondition(
                    "sysctls: this agent is a host process, not a guest's init".into(),
                ));
            }
            crate::sysctl::apply(Path::new("/proc/sys"), sysctls)
                .map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
        }
        if !shared_fs_tag.is_empty() {
            if !owns_kernel {
                return Err(AgentError::FailedPrecondition(
                    "a shared directory: this agent is a host process, not a guest's init".into(),
                ));
            }
            mount_shared_dir(shared_fs_tag)?;
        }
        *cur = Some(id.to_string());
        Ok(())
    }

    /// Removes every container.
    pub async fn destroy_sandbox(&self, id: &str) -> Result<()> {
        {
            let cur = lock(&self.sandbox_id);
            match cur.as_deref() {
                Some(s) if s == id => {}
                other => {
                    return Err(AgentError::NotFound(format!(
                        "no sandbox {id:?} (this agent runs {other:?})"
                    )))
                }
            }
        }
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        let mut first_err = None;
        for cid in ids {
            if let Err(e) = self.remove_container(&cid).await {
                tracing::warn!(container = %cid, "removing on sandbox destroy: {e}");
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if let Some(root) = &self.engine_cfg.cgroup_root {
            // The engine removes container cgroups; the sandbox's own is ours.
            let dir = root.join(id);
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir(&dir) {
                    tracing::warn!("removing the sandbox cgroup {}: {e}", dir.display());
                }
            }
        }
        self.pod_pid.stop();
        *lock(&self.sandbox_id) = None;
        Ok(())
    }

    /// A PID namespace at [`husk_proto::POD_PID_NAMESPACE`] in `spec` becomes the pod's
    /// (started on first use).
    fn join_pod_pid_namespace(&self, spec: &mut Spec) -> Result<()> {
        let Some(linux) = spec.linux_mut() else {
            return Ok(());
        };
        let Some(mut namespaces) = linux.namespaces().clone() else {
            return Ok(());
        };
        let wanted = std::path::Path::new(husk_proto::POD_PID_NAMESPACE);
        let mut changed = false;
        for n in namespaces.iter_mut() {
            if n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid
                && n.path().as_deref() == Some(wanted)
            {
                let path = self
                    .pod_pid
                    .path(&self.engine_cfg.agent_exe)
                    .map_err(|e| AgentError::internal("starting the pod's pause process", &e))?;
                n.set_path(Some(path));
                changed = true;
            }
        }
        if changed {
            linux.set_namespaces(Some(namespaces));
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(AgentError::NotFound(format!("container {id:?} not found"))),
        }
    }

    pub async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<u32> {
        check_id("container_id", &req.container_id)?;
        let mut spec: Spec = serde_json::from_slice(&req.oci_spec_json).map_err(|e| {
            AgentError::InvalidArgument(format!("oci_spec_json: not a valid OCI runtime spec: {e}"))
        })?;
        self.join_pod_pid_namespace(&mut spec)?;
        let rootfs = match req.rootfs.into_option().and_then(|r| r.kind) {
            Some(pb::rootfs::Kind::Path(p)) if !p.is_empty() => RootfsSource::Path(p.into()),
            Some(pb::rootfs::Kind::Block(b)) => {
                if b.source.is_empty() || b.fstype.is_empty() {
                    return Err(AgentError::InvalidArgument(
                        "rootfs.block: source and fstype are required".into(),
                    ));
                }
                RootfsSource::Block {
                    source: b.source.into(),
                    fstype: b.fstype,
                    options: b.options,
                    readonly: b.readonly,
                }
            }
            Some(pb::rootfs::Kind::Layered(l)) => RootfsSource::Layered(Layered {
                device: l.device.into(),
                layers: l
                    .layers
                    .into_iter()
                    .map(|x| LayerSpec {
                        key: x.key,
                        start: x.start,
                        length: x.length,
                        fstype: x.fstype,
                    })
                    .collect(),
                scratch: l.scratch.into(),
            }),
            _ => {
                return Err(AgentError::InvalidArgument(
                    "rootfs: a path, a block device or layers are required".into(),
                ))
            }
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let console_size = spec.process().as_ref().and_then(|p| p.console_size());
        {
            let mut map = lock(&self.containers);
            if map.contains_key(&req.container_id) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {:?} already exists",
                    req.container_id
                )));
            }
            map.insert(req.container_id.clone(), Slot::Creating);
        }
        let res = self
            .create_container_inner(
                &req.container_id,
                spec,
                rootfs,
                (terminal, console_size),
                req.stdin,
            )
            .await;
        let mut map = lock(&self.containers);
        match res {
            Ok(entry) => {
                let pid = entry.init.pid.as_raw() as u32;
                map.insert(req.container_id, Slot::Ready(entry));
                Ok(pid)
            }
            Err(e) => {
                map.remove(&req.container_id);
                Err(e)
            }
        }
    }

    async fn create_container_inner(
        &self,
        id: &str,
        spec: Spec,
        rootfs: RootfsSource,
        (terminal, console_size): (bool, Option<oci_spec::runtime::Box>),
        stdin: bool,
    ) -> Result<Arc<ContainerEntry>> {
        let (io, host) = stdio::prepare(terminal, console_size, stdin)
            .map_err(|e| AgentError::internal("making the process's stdio", &e))?;
        let cfg = self.engine_cfg.clone();
        let sandbox_id = self.sandbox_id();
        let cid = id.to_string();
        let container = tokio::task::spawn_blocking(move || {
            Container::create(&cfg, &sandbox_id, &cid, spec, rootfs, io)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("engine task failed: {e}")))?
        .map_err(AgentError::from)?;
        let pid = container.init_pid();
        let exit = self.reaper.watch(pid);
        let memory_events = container.cgroup_path().map(|p| {
            MemoryEvents::new(p.join("memory.events"), container.oom_kills().unwrap_or(0))
        });
        let shared_pid_ns = !container.owns_pid_namespace();
        let engine = Arc::new(Mutex::new(container));
        if shared_pid_ns {
            // As runc does for a container in a shared PID namespace: once its init has
            // exited, what it forked goes too (a private namespace's kernel does this itself).
            // Those processes would otherwise hold its stdio open, and its exit would never
            // be complete.
            let (engine, mut exit, id) = (engine.clone(), exit.clone(), id.to_string());
            tokio::spawn(async move {
                if exit.wait_for(|e| e.is_some()).await.is_err() {
                    return;
                }
                let killed =
                    tokio::task::spawn_blocking(move || lock(&engine).signal_all(Signal::SIGKILL))
                        .await;
                match killed {
                    // Removed meanwhile: nothing of it is left.
                    Ok(Ok(())) | Ok(Err(container::ContainerError::Destroyed)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(container = %id, "killing what its init left: {e}")
                    }
                    Err(e) => tracing::warn!(container = %id, "killing what its init left: {e}"),
                }
            });
        }
        let streams = match host.start(&self.streams, id, "", exit.clone()) {
            Ok(s) => s,
            Err(e) => {
                self.streams.remove_container(id);
                let _ = tokio::task::spawn_blocking(move || lock(&engine).destroy()).await;
                return Err(AgentError::internal("starting stdio", &e));
            }
        };
        Ok(Arc::new(ContainerEntry {
            id: id.to_string(),
            engine,
            flags: Mutex::new(Flags::default()),
            init: Arc::new(ProcessEntry { pid, exit, streams }),
            execs: Mutex::new(HashMap::new()),
            memory_events,
        }))
    }

    pub async fn start_container(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        {
            let mut flags = lock(&c.flags);
            if flags.started {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id:?} was already started"
                )));
            }
            flags.started = true;
        }
        c.with_engine(|e| e.start())
            .await?
            .map_err(|e| AgentError::start(id, &e))?;
        Ok(c.init.pid.as_raw() as u32)
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        self.streams.remove_container(id);
        let res = c.with_engine(|e| e.destroy()).await?;
        if let Err(e) = res {
            return Err(AgentError::internal(
                &format!("removing container {id:?}"),
                &e,
            ));
        }
        lock(&self.containers).remove(id);
        Ok(())
    }

    pub async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<u32> {
        let c = self.get(&req.container_id)?;
        check_id("exec_id", &req.exec_id)?;
        if req.exec_id == "-" {
            return Err(AgentError::InvalidArgument(
                "exec_id: \"-\" is reserved: it names the container's init in stream headers"
                    .into(),
            ));
        }
        let process: Process = serde_json::from_slice(&req.process_json).map_err(|e| {
            AgentError::InvalidArgument(format!("process_json: not a valid OCI process: {e}"))
        })?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(AgentError::InvalidArgument(
                "process_json.args: must not be empty".into(),
            ));
        }
        if !c.running() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} is not running",
                req.container_id
            )));
        }
        if lock(&c.flags).paused {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} is paused",
                req.container_id
            )));
        }
        // Reserve the exec id: a placeholder would need a pid, so check-and-insert after the
        // exec under the same lock, refusing a duplicate up front as well.
        if lock(&c.execs).contains_key(&req.exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {:?} already has a process {:?}",
                req.container_id, req.exec_id
            )));
        }
        let terminal = process.terminal().unwrap_or(false);
        let (io, host) = stdio::prepare(terminal, process.console_size(), req.stdin)
            .map_err(|e| AgentError::internal("making the process's stdio", &e))?;
        let pid = c
            .with_engine(move |e| e.exec(&process, io))
            .await?
            .map_err(AgentError::from)?;
        let exit = self.reaper.watch(pid);
        let streams = host
            .start(&self.streams, &req.container_id, &req.exec_id, exit.clone())
            .map_err(|e| AgentError::internal("starting stdio", &e))?;
        let mut execs = lock(&c.execs);
        if execs.contains_key(&req.exec_id) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            return Err(AgentError::AlreadyExists(format!(
                "container {:?} already has a process {:?}",
                req.container_id, req.exec_id
            )));
        }
        execs.insert(
            req.exec_id.clone(),
            Arc::new(ProcessEntry { pid, exit, streams }),
        );
        Ok(pid.as_raw() as u32)
    }

    pub async fn signal_process(&self, req: pb::SignalProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let sig = i32::try_from(req.signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("signal: {} is not a signal", req.signal))
            })?;
        if req.all {
            return c
                .with_engine(move |e| e.signal_all(sig))
                .await?
                .map_err(|e| AgentError::internal("signalling the container", &e));
        }
        let p = c.process(&req.exec_id)?;
        if p.exited() {
            return Err(AgentError::NotFound(format!(
                "process {:?} of container {:?} has already exited",
                req.exec_id, req.container_id
            )));
        }
        nix::sys::signal::kill(p.pid, sig).map_err(|e| AgentError::internal("kill", &e))
    }

    pub async fn wait_process(
        &self,
        req: pb::WaitProcessRequest,
    ) -> Result<pb::WaitProcessResponse> {
        let c = self.get(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let mut exit = p.exit.clone();
        let exit = match exit.wait_for(|e| e.is_some()).await {
            Ok(e) => e.expect("waited for Some"),
            Err(_) => {
                return Err(AgentError::Internal(
                    "the agent lost track of the process's exit".into(),
                ))
            }
        };
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, status = exit.status, "exited; waiting for its output");
        p.streams.drained().await;
        let mut resp = pb::WaitProcessResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at_ns = exit
            .at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as i64;
        if let Some(m) = &c.memory_events {
            resp.oom_killed = m.oom_killed();
        }
        Ok(resp)
    }

    pub fn resize_terminal(&self, req: &pb::ResizeTerminalRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let rows = u16::try_from(req.rows)
            .map_err(|_| AgentError::InvalidArgument("rows: too large".into()))?;
        let cols = u16::try_from(req.cols)
            .map_err(|_| AgentError::InvalidArgument("cols: too large".into()))?;
        p.streams.resize(rows, cols).map_err(AgentError::from)
    }

    pub fn remove_process(&self, req: &pb::RemoveProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        if req.exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec_id: empty names the init process, which goes with RemoveContainer".into(),
            ));
        }
        let mut execs = lock(&c.execs);
        let p = execs.get(&req.exec_id).ok_or_else(|| {
            AgentError::NotFound(format!(
                "container {:?} has no process {:?}",
                req.container_id, req.exec_id
            ))
        })?;
        if !p.exited() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {:?} of container {:?} is still running",
                req.exec_id, req.container_id
            )));
        }
        execs.remove(&req.exec_id);
        self.streams.remove_process(&req.container_id, &req.exec_id);
        Ok(())
    }

    pub fn close_stdin(&self, req: &pb::CloseStdinRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        c.process(&req.exec_id)?.streams.close_stdin();
        Ok(())
    }

    pub async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let res: LinuxResources = serde_json::from_slice(&req.resources_json).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "resources_json: not valid OCI LinuxResources: {e}"
            ))
        })?;
        c.with_engine(move |e| e.update(&res))
            .await?
            .map_err(|e| AgentError::cgroup("updating resources", e))
    }

    pub async fn pause_container(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.get(id)?;
        if !c.running() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        c.with_engine(move |e| if pause { e.pause() } else { e.resume() })
            .await?
            .map_err(|e| AgentError::cgroup("freezing the container", e))?;
        lock(&c.flags).paused = pause;
        Ok(())
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        let pids = c
            .with_engine(|e| e.pids())
            .await?
            .map_err(|e| AgentError::internal("listing processes", &e))?;
        Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
    }

    pub async fn container_stats(&self, id: &str) -> Result<pb::ContainerStatsResponse> {
        let c = self.get(id)?;
        let s = c
            .with_engine(|e| e.stats())
            .await?
            .map_err(|e| AgentError::cgroup("reading stats", e))?;
        Ok(stats_to_pb(s))
    }

    /// Removes every container, logging failures (on agent shutdown).
    pub async fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for cid in ids {
            if let Err(e) = self.remove_container(&cid).await {
                tracing::warn!(container = %cid, "removing on shutdown: {e}");
            }
        }
        if let Some(root) = &self.engine_cfg.cgroup_root {
            let _ = std::fs::remove_dir(root.join(self.sandbox_id()));
        }
    }

    /// The next OOM kill of any container.
    pub async fn next_oom_event(&self) -> Result<String> {
        self.oom
            .next()
            .await
            .ok_or_else(|| AgentError::Internal("OOM watcher stopped".into()))
    }
}

impl oom::Watched for Sandbox {
    fn memory_events(&self) -> Vec<(String, PathBuf)> {
        lock(&self.containers)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => c
                    .memory_events
                    .as_ref()
                    .map(|m| (c.id.clone(), m.path().to_path_buf())),
                Slot::Creating => None,
            })
            .collect()
    }
}

fn stats_to_pb(s: container::cgroup::Stats) -> pb::ContainerStatsResponse {
    let mut r = pb::ContainerStatsResponse::new();
    r.cpu_usage_usec = s.cpu_usage_usec;
    r.cpu_user_usec = s.cpu_user_usec;
    r.cpu_system_usec = s.cpu_system_usec;
    r.cpu_nr_periods = s.cpu_nr_periods;
    r.cpu_nr_throttled = s.cpu_nr_throttled;
    r.cpu_throttled_usec = s.cpu_throttled_usec;
    r.memory_current = s.memory_current;
    r.memory_max = s.memory_max.unwrap_or(0);
    r.memory_swap_current = s.memory_swap_current;
    r.memory_stat = s.memory_stat.into_iter().collect();
    r.memory_events = s.memory_events.into_iter().collect();
    r.pids_current = s.pids_current;
    r.pids_max = s.pids_max.unwrap_or(0);
    r.io_read_bytes = s.io_read_bytes;
    r.io_write_bytes = s.io_write_bytes;
    r.io_read_ios = s.io_read_ios;
    r.io_write_ios = s.io_write_ios;
    r
}

/// Mounts the pod's shared directory, the virtio-fs `tag`, at [`husk_proto::SHARED_DIR`]
/// (nosuid, nodev: what containers get of it is bind-mounted with their own options).
fn mount_shared_dir(tag: &str) -> Result<()> {
    let dir = Path::new(husk_proto::SHARED_DIR);
    std::fs::create_dir_all(dir)
        .map_err(|e| AgentError::internal("making the shared directory's mount point", &e))?;
    nix::mount::mount(
        Some(tag),
        dir,
        Some("virtiofs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        AgentError::internal(
            &format!("mounting the pod's shared directory (virtio-fs tag {tag:?})"),
            &e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "c-1", "x_y.z", &"a".repeat(128)] {
            assert!(check_id("container_id", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a\n", &"a".repeat(129)] {
            let e = check_id("container_id", bad).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.to_string().starts_with("container_id:"), "{e}");
        }
    }
}
