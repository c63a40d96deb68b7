//! The task service of one pod's shim: each verb resolves its task to the sandbox (the VM, in
//! [`crate::sandbox`]) or a container (in [`crate::task`]) and delegates; errors become ttrpc
//! codes in one place ([`crate::error`]).
//!
//! The sandbox task boots the microVM (Create), runs while the VM runs (Start, State, Pids,
//! Wait, Connect), and powers it off (Kill, Delete). Every other task is a container in that
//! VM: its rootfs goes in as a block image through an empty drive slot, the agent runs its
//! processes, and their stdio is copied between containerd's FIFOs and the agent's streams.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use containerd_shim::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        Status, UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    protos::{
        events::task::{TaskCreate, TaskExecAdded, TaskPaused, TaskResumed, TaskStart},
        topics::{
            TASK_CREATE_EVENT_TOPIC, TASK_EXEC_ADDED_EVENT_TOPIC, TASK_PAUSED_EVENT_TOPIC,
            TASK_RESUMED_EVENT_TOPIC, TASK_START_EVENT_TOPIC,
        },
        ttrpc::r#async::TtrpcContext,
        types::task::ProcessInfo,
    },
    Task, TtrpcResult,
};
use husk::pod::Pod;
use husk_client::pb;

use crate::{
    error::{Result, ShimError},
    events::{Events, Exit},
    metrics::{self, Metrics},
    sandbox::{self, Sandbox},
    stdio::Fifos,
    task::{Container, Proc},
};

/// Everything the shim knows about its pod.
#[derive(Default)]
pub struct State {
    pub sandbox: Option<Sandbox>,
    pub containers: HashMap<String, Container>,
    /// A sandbox Create in flight (the VM booting).
    pub creating: bool,
}

impl State {
    /// Nothing to serve: no pod, no container, no pod being created.
    fn idle(&self) -> bool {
        self.sandbox.is_none() && self.containers.is_empty() && !self.creating
    }
}

/// How long a shim with nothing to serve waits for containerd before it exits on its own.
///
/// containerd creates the sandbox task right after it starts the shim, and shuts the shim down
/// right after it deleted the last task, or after a Create failed. Only a containerd that died
/// in between leaves a shim idle for long: killed while the sandbox's VM booted, the containerd
/// that comes back finds no task in the shim yet (CRI then takes the pod for not ready and
/// removes it without deleting the task), and the boot, its network gone, fails with nobody
/// to tell. Such a shim would stay for good.
pub const IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Marks a sandbox Create in flight for as long as it lives (the Create's future may be
/// dropped halfway).
struct Creating(Shared);

impl Creating {
    /// The pod's Create begins, unless the shim already runs or creates one.
    fn begin(state: &Shared) -> Result<Self> {
        let mut st = lock(state);
        if st.sandbox.is_some() || st.creating {
            return Err(ShimError::AlreadyExists(
                "this shim already runs a pod".into(),
            ));
        }
        st.creating = true;
        Ok(Creating(state.clone()))
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        lock(&self.0).creating = false;
    }
}

/// Signals `exit` once the shim has had nothing to serve for `idle` (checked every `idle` / 12).
pub async fn exit_when_idle(state: Shared, exit: Arc<ExitSignal>, idle: std::time::Duration) {
    let mut since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(idle / 12).await;
        if !lock(&state).idle() {
            since = None;
            continue;
        }
        let start = *since.get_or_insert_with(std::time::Instant::now);
        if start.elapsed() >= idle {
            log::warn!(
                "this shim has had no pod, no container and no Create for {idle:?}: \
                 containerd died while it started the pod and forgot it; exiting"
            );
            exit.signal();
            return;
        }
    }
}

pub type Shared = Arc<Mutex<State>>;

pub fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shim's state and its line to containerd, shared with the tasks it spawns.
#[derive(Clone)]
pub struct Shim {
    pub state: Shared,
    pub events: Events,
}

/// What a task id names.
enum Target {
    Sandbox,
    Container,
}

impl Shim {
    /// Whether `id` is the sandbox task or a container (checked again by whoever uses it,
    /// under the lock).
    fn target(&self, id: &str) -> Result<Target> {
        let st = lock(&self.state);
        if st.sandbox.as_ref().is_some_and(|s| s.id == id) {
            Ok(Target::Sandbox)
        } else if st.containers.contains_key(id) {
            Ok(Target::Container)
        } else {
            Err(ShimError::not_found(id, ""))
        }
    }

    /// Runs `f` on the sandbox task.
    fn sandbox<T>(&self, id: &str, f: impl FnOnce(&mut Sandbox) -> T) -> Result<T> {
        match lock(&self.state).sandbox.as_mut() {
            Some(s) if s.id == id => Ok(f(s)),
            _ => Err(ShimError::not_found(id, "")),
        }
    }

    /// Runs `f` on container `id`.
    pub fn container<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> Result<T>) -> Result<T> {
        match lock(&self.state).containers.get_mut(id) {
            Some(c) => f(c),
            None => Err(ShimError::not_found(id, "")),
        }
    }

    /// The pod, while its VM runs.
    pub fn pod(&self) -> Result<Pod> {
        match lock(&self.state).sandbox.as_ref() {
            Some(s) => s.running(),
            None => Err(ShimError::FailedPrecondition(
                "this shim has no pod (create the sandbox task first)".into(),
            )),
        }
    }

    async fn create(&self, req: &CreateTaskRequest) -> Result<u32> {
        let spec_path = PathBuf::from(&req.bundle).join("config.json");
        let spec: serde_json::Value = std::fs::read(&spec_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                ShimError::InvalidArgument(format!(
                    "{} is missing or not JSON",
                    spec_path.display()
                ))
            })?;
        if !sandbox::is_sandbox(&spec) {
            return self.create_container(req, &spec_path).await;
        }
        let _creating = Creating::begin(&self.state)?;
        let sandbox = Sandbox::create(req, &spec, &self.events, &self.state).await?;
        let pid = sandbox.pod.vmm_pid();
        lock(&self.state).sandbox = Some(sandbox);
        Ok(pid)
    }

    async fn start(&self, req: &StartRequest) -> Result<u32> {
        if let Ok(pid) = self.sandbox(&req.id, |s| {
            s.started = true;
            s.pod.vmm_pid()
        }) {
            let mut e = TaskStart::new();
            e.container_id = req.id.clone();
            e.pid = pid;
            self.events
                .publish(TASK_START_EVENT_TOPIC, Box::new(e))
                .await;
            return Ok(pid);
        }
        self.start_process(&req.id, &req.exec_id).await
    }

    async fn state(&self, req: &StateRequest) -> Result<StateResponse> {
        let mut r = StateResponse::new();
        r.id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        let exit = match self.target(&req.id)? {
            Target::Sandbox => self.sandbox(&req.id, |s| {
                r.bundle = s.bundle.clone();
                r.pid = s.pod.vmm_pid();
                let exit = s.exit.borrow().clone();
                r.status = match (&exit, s.started) {
                    (Some(_), _) => Status::STOPPED,
                    (None, true) => Status::RUNNING,
                    (None, false) => Status::CREATED,
                }
                .into();
                exit
            })?,
            Target::Container => self.container(&req.id, |c| {
                r.bundle = c.bundle.clone();
                let paused = c.paused;
                let p = c.proc(&req.id, &req.exec_id)?;
                r.pid = p.pid;
                r.status = p.status(paused).into();
                r.stdin = p.fifos.stdin.clone();
                r.stdout = p.fifos.stdout.clone();
                r.stderr = p.fifos.stderr.clone();
                r.terminal = p.fifos.terminal;
                let exit = p.exit.borrow().clone();
                Ok(exit)
            })?,
        };
        if let Some(e) = exit {
            r.exit_status = e.status;
            r.exited_at = Some(e.at).into();
        }
        Ok(r)
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        if let Target::Sandbox = self.target(id)? {
            return self.sandbox(id, |s| vec![s.pod.vmm_pid()]);
        }
        let mut q = pb::ListProcessesRequest::new();
        q.container_id = id.to_string();
        let pids = self
            .pod()?
            .agent()
            .list_processes(q)
            .await
            .map_err(ShimError::agent("listing the container's processes"))?;
        Ok(pids.pids)
    }

    /// Pauses (freezes the guest cgroup of) or resumes container `id`.
    async fn freeze(&self, id: String, pause: bool) -> Result<()> {
        self.container(&id, |_| Ok(()))?;
        let pod = self.pod()?;
        let done = if pause {
            let mut q = pb::PauseContainerRequest::new();
            q.container_id = id.clone();
            pod.agent().pause_container(q).await
        } else {
            let mut q = pb::ResumeContainerRequest::new();
            q.container_id = id.clone();
            pod.agent().resume_container(q).await
        };
        done.map_err(ShimError::agent(if pause { "pausing" } else { "resuming" }))?;
        self.container(&id, |c| {
            c.paused = pause;
            Ok(())
        })?;
        if pause {
            let mut e = TaskPaused::new();
            e.container_id = id;
            self.events
                .publish(TASK_PAUSED_EVENT_TOPIC, Box::new(e))
                .await;
        } else {
            let mut e = TaskResumed::new();
            e.container_id = id;
            self.events
                .publish(TASK_RESUMED_EVENT_TOPIC, Box::new(e))
                .await;
        }
        Ok(())
    }

    async fn kill(&self, req: &KillRequest) -> Result<()> {
        if let Target::Sandbox = self.target(&req.id)? {
            let (pod, exited) =
                self.sandbox(&req.id, |s| (s.pod.clone(), s.exit.borrow().is_some()))?;
            if !exited {
                sandbox::kill(&pod).await;
            }
            return Ok(());
        }
        let exited = self.container(&req.id, |c| {
            Ok(c.proc(&req.id, &req.exec_id)?.exit.borrow().is_some())
        })?;
        if exited && !req.all {
            return Err(ShimError::Finished {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        let mut q = pb::SignalProcessRequest::new();
        q.container_id = req.id.clone();
        q.exec_id = req.exec_id.clone();
        q.signal = req.signal;
        q.all = req.all;
        self.pod()?
            .agent()
            .signal_process(q)
            .await
            .map_err(ShimError::agent("signalling the process"))?;
        Ok(())
    }

    async fn exec(&self, req: &ExecProcessRequest) -> Result<()> {
        self.pod()?;
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::Process>(&process_json).is_err() {
            return Err(ShimError::InvalidArgument(format!(
                "exec {}: spec is not an OCI process (JSON)",
                req.exec_id
            )));
        }
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.container(&req.id, |c| {
            if c.init.exit.borrow().is_some() {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not running",
                    req.id
                )));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {} already exists in {}",
                    req.exec_id, req.id
                )));
            }
            c.execs
                .insert(req.exec_id.clone(), Proc::new(fifos, process_json));
            Ok(())
        })?;
        let mut e = TaskExecAdded::new();
        e.container_id = req.id.clone();
        e.exec_id = req.exec_id.clone();
        self.events
            .publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e))
            .await;
        Ok(())
    }

    async fn resize_pty(&self, req: &ResizePtyRequest) -> Result<()> {
        self.container(&req.id, |c| c.proc(&req.id, &req.exec_id).map(|_| ()))?;
        let mut q = pb::ResizeTerminalRequest::new();
        q.container_id = req.id.clone();
        q.exec_id = req.exec_id.clone();
        q.rows = req.height;
        q.cols = req.width;
        self.pod()?
            .agent()
            .resize_terminal(q)
            .await
            .map_err(ShimError::agent("resizing the terminal"))?;
        Ok(())
    }

    async fn update(&self, req: &UpdateTaskRequest) -> Result<()> {
        if let Target::Sandbox = self.target(&req.id)? {
            // The VM's size is fixed at boot; the containers carry the limits.
            return Ok(());
        }
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).is_err() {
            return Err(ShimError::InvalidArgument(
                "update: resources are not OCI LinuxResources (JSON)".into(),
            ));
        }
        let mut q = pb::UpdateContainerRequest::new();
        q.container_id = req.id.clone();
        q.resources_json = resources;
        self.pod()?
            .agent()
            .update_container(q)
            .await
            .map_err(ShimError::agent("updating the container's resources"))?;
        Ok(())
    }

    async fn wait(&self, req: &WaitRequest) -> Result<Exit> {
        let mut rx = match self.target(&req.id)? {
            Target::Sandbox => self.sandbox(&req.id, |s| s.exit.clone())?,
            Target::Container => {
                self.container(&req.id, |c| Ok(c.proc(&req.id, &req.exec_id)?.exit.clone()))?
            }
        };
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.clone().expect("waited for Some"),
            Err(_) => Exit::now(255),
        };
        Ok(exit)
    }

    async fn stats(&self, id: &str) -> Result<Metrics> {
        if let Target::Sandbox = self.target(id)? {
            // The VM has no cgroup of its own that containerd could use.
            return Ok(Metrics::new());
        }
        let mut q = pb::ContainerStatsRequest::new();
        q.container_id = id.to_string();
        let s = self
            .pod()?
            .agent()
            .container_stats(q)
            .await
            .map_err(ShimError::agent("reading the container's statistics"))?;
        Ok(metrics::from_agent(&s))
    }

    async fn delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        if let Target::Sandbox = self.target(&req.id)? {
            let (pid, exit) =
                self.sandbox(&req.id, |s| (s.pod.vmm_pid(), s.exit.borrow().clone()))?;
            let Some(exit) = exit else {
                return Err(ShimError::FailedPrecondition(format!(
                    "task {} is still running: kill it first",
                    req.id
                )));
            };
            lock(&self.state).sandbox = None;
            return Ok(self.events.deleted(&req.id, pid, exit).await);
        }
        if req.exec_id.is_empty() {
            self.delete_container(&req.id).await
        } else {
            self.delete_exec(&req.id, &req.exec_id).await
        }
    }
}

pub struct TaskService {
    shim: Shim,
    exit_signal: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(
        namespace: String,
        exit_signal: Arc<ExitSignal>,
        publisher: RemotePublisher,
    ) -> Self {
        let state = Shared::default();
        tokio::spawn(exit_when_idle(
            state.clone(),
            exit_signal.clone(),
            IDLE_EXIT,
        ));
        TaskService {
            shim: Shim {
                state,
                events: Events::new(publisher, namespace),
            },
            exit_signal,
        }
    }
}

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.shim.create(&req).await?;
        let mut e = TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        e.io = Some({
            let mut io = containerd_shim::protos::events::task::TaskIO::new();
            io.stdin = req.stdin.clone();
            io.stdout = req.stdout.clone();
            io.stderr = req.stderr.clone();
            io.terminal = req.terminal;
            io
        })
        .into();
        e.pid = pid;
        self.shim
            .events
            .publish(TASK_CREATE_EVENT_TOPIC, Box::new(e))
            .await;
        let mut resp = CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let mut resp = StartResponse::new();
        resp.pid = self.shim.start(&req).await?;
        Ok(resp)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.shim.state(&req).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let mut r = PidsResponse::new();
        for pid in self.shim.pids(&req.id).await? {
            let mut info = ProcessInfo::new();
            info.pid = pid;
            r.processes.push(info);
        }
        Ok(r)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.shim.freeze(req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.shim.freeze(req.id, false).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.shim.kill(&req).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.shim.exec(&req).await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.shim.resize_pty(&req).await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.shim.container(&req.id, |c| {
                c.proc(&req.id, &req.exec_id)?
                    .close_stdin
                    .take()
                    .map(|tx| tx.send(()));
                Ok(())
            })?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.shim.update(&req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exit = self.shim.wait(&req).await?;
        let mut r = WaitResponse::new();
        r.exit_status = exit.status;
        r.exited_at = Some(exit.at).into();
        Ok(r)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let m = self.shim.stats(&req.id).await?;
        let mut r = StatsResponse::new();
        r.stats = Some(metrics::to_any(&m).map_err(|e| ShimError::Internal(e.to_string()))?).into();
        Ok(r)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.shim.delete(&req).await?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pid = match self.shim.target(&req.id) {
            Ok(Target::Sandbox) => self.shim.sandbox(&req.id, |s| s.pod.vmm_pid())?,
            _ => self
                .shim
                .container(&req.id, |c| Ok(c.init.pid))
                .unwrap_or_default(),
        };
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = pid;
        Ok(r)
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        // The generated default answers NOT_FOUND, which containerd would take for a missing
        // task.
        Err(ShimError::Unimplemented(format!(
            "husk cannot checkpoint task {} (a microVM snapshot is not implemented)",
            req.id
        ))
        .into())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // Ends the shim once it has nothing left to serve.
        if lock(&self.shim.state).idle() {
            self.exit_signal.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `exit` is signalled within `limit`.
    async fn signalled(exit: &ExitSignal, limit: Duration) -> bool {
        tokio::time::timeout(limit, exit.wait()).await.is_ok()
    }

    #[tokio::test]
    async fn a_shim_exits_only_after_it_had_nothing_to_serve_for_the_idle_time() {
        let idle = Duration::from_millis(600);
        let state = Shared::default();
        let exit = Arc::new(ExitSignal::default());

        // A pod being created (a VM booting for longer than the idle time) keeps it.
        let creating = Creating::begin(&state).unwrap();
        assert!(
            Creating::begin(&state).is_err(),
            "a second Create while one is in flight"
        );
        let watcher = tokio::spawn(exit_when_idle(state.clone(), exit.clone(), idle));
        assert!(
            !signalled(&exit, idle * 3).await,
            "exited while a Create was in flight"
        );

        // The Create ended with nothing (it failed) and nobody shut the shim down.
        drop(creating);
        assert!(
            signalled(&exit, idle * 3).await,
            "still there {:?} after its Create ended with nothing",
            idle * 3
        );
        watcher.await.unwrap();
    }
}
