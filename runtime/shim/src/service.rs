//! The task service of one pod's shim.
//!
//! The sandbox task boots the microVM (Create), runs while the VM runs (Start, State, Pids,
//! Wait, Connect), and powers it off (Kill, Delete). Every other task is a container in that
//! VM: its rootfs goes in as a block image through an empty drive slot, the agent runs its
//! processes, and their stdio is copied between containerd's FIFOs and the agent's streams.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
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
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
            TaskResumed, TaskStart,
        },
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        topics::{
            TASK_CREATE_EVENT_TOPIC, TASK_DELETE_EVENT_TOPIC, TASK_EXEC_ADDED_EVENT_TOPIC,
            TASK_EXEC_STARTED_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC,
            TASK_PAUSED_EVENT_TOPIC, TASK_RESUMED_EVENT_TOPIC, TASK_START_EVENT_TOPIC,
        },
        ttrpc::{self, r#async::TtrpcContext},
        types::task::ProcessInfo,
    },
    Context, Task, TtrpcResult,
};
use husk::{
    config::{Config, PodDefaults},
    vm::{error_chain, image_from, Drive, Vm, VmSize},
};
use husk_client::{pb, AgentClient, ClientError};
use husk_vmm_api::{drives, files::VmDir};
use tokio::sync::{oneshot, watch};

use crate::{
    container,
    metrics::{self, Metrics},
    stdio::{self, Fifos},
};

/// How long the guest may take to answer (nested virtualization is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Empty drive slots of a pod's VM, one per container that can run at once. They are
/// /dev/vda.. in the guest, in this order.
const SLOTS: usize = 8;

/// The run directory of pod `id` in containerd namespace `ns`: the VM's sockets and logs and
/// its containers' rootfs images.
pub fn pod_dir(ns: &str, id: &str) -> PathBuf {
    PathBuf::from("/run/husk/shim").join(ns).join(id)
}

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp(d.as_nanos() as i64)
}

fn timestamp(ns: i64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = ns.div_euclid(1_000_000_000);
    t.nanos = ns.rem_euclid(1_000_000_000) as i32;
    t
}

fn err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An agent error passed on to containerd with its code.
fn agent_err(what: &str, e: ClientError) -> ttrpc::Error {
    err(e.code(), format!("{what}: {e}"))
}

fn not_found(id: &str, exec_id: &str) -> ttrpc::Error {
    let what = if exec_id.is_empty() {
        format!("no task {id} in this pod")
    } else {
        format!("no process {exec_id} in task {id}")
    };
    err(ttrpc::Code::NOT_FOUND, what)
}

/// How a process ended.
#[derive(Clone, Debug)]
struct Exit {
    status: u32,
    at: Timestamp,
}

/// The sandbox task: the VM.
struct Pod {
    id: String,
    bundle: String,
    vmm_pid: u32,
    agent: AgentClient,
    started: bool,
    exit: watch::Receiver<Option<Exit>>,
    /// The VM's directory (control socket, container images).
    dir: PathBuf,
    /// Which container holds each drive slot.
    slots: Vec<Option<String>>,
}

/// A process of a container: its init process or an exec.
struct Proc {
    pid: u32,
    fifos: Fifos,
    /// For an exec: its OCI process (JSON), used at start.
    process_json: Vec<u8>,
    started: bool,
    exit: watch::Receiver<Option<Exit>>,
    exit_tx: Option<watch::Sender<Option<Exit>>>,
    /// Attached output copies, until the waiter takes them.
    copies: Option<stdio::Copies>,
    close_stdin: Option<oneshot::Sender<()>>,
}

impl Proc {
    fn new(fifos: Fifos, process_json: Vec<u8>) -> Proc {
        let (tx, rx) = watch::channel(None);
        Proc {
            pid: 0,
            fifos,
            process_json,
            started: false,
            exit: rx,
            exit_tx: Some(tx),
            copies: None,
            close_stdin: None,
        }
    }

    fn status(&self, paused: bool) -> Status {
        match (self.exit.borrow().is_some(), self.started, paused) {
            (true, _, _) => Status::STOPPED,
            (false, true, true) => Status::PAUSED,
            (false, true, false) => Status::RUNNING,
            (false, false, _) => Status::CREATED,
        }
    }

    fn attached(&mut self, mut copies: stdio::Copies) {
        self.close_stdin = copies.close_stdin.take();
        self.copies = Some(copies);
    }
}

/// A container of the pod.
struct Container {
    bundle: String,
    slot: usize,
    image: PathBuf,
    paused: bool,
    /// OOM events published for this container.
    ooms_reported: u32,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&mut self, id: &str, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| not_found(id, exec_id))
        }
    }
}

#[derive(Default)]
struct State {
    pod: Option<Pod>,
    containers: HashMap<String, Container>,
}

pub struct TaskService {
    namespace: String,
    exit_signal: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    state: Arc<Mutex<State>>,
}

impl TaskService {
    pub fn new(
        namespace: String,
        exit_signal: Arc<ExitSignal>,
        publisher: RemotePublisher,
    ) -> Self {
        TaskService {
            namespace,
            exit_signal,
            publisher: Arc::new(publisher),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the sandbox task `id`, if that is what `id` names.
    fn pod<T>(&self, id: &str, f: impl FnOnce(&mut Pod) -> T) -> Option<T> {
        match self.lock().pod.as_mut() {
            Some(p) if p.id == id => Some(f(p)),
            _ => None,
        }
    }

    /// Runs `f` on container `id`.
    fn container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        match self.lock().containers.get_mut(id) {
            Some(c) => f(c),
            None => Err(not_found(id, "")),
        }
    }

    /// The agent of a pod whose VM still runs.
    fn agent(&self) -> TtrpcResult<AgentClient> {
        let st = self.lock();
        match st.pod.as_ref() {
            Some(p) if p.exit.borrow().is_none() => Ok(p.agent.clone()),
            Some(_) => Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                "the pod's microVM has stopped",
            )),
            None => Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                "this shim has no pod (create the sandbox task first)",
            )),
        }
    }

    async fn create_sandbox(
        &self,
        req: &CreateTaskRequest,
        spec: &serde_json::Value,
    ) -> TtrpcResult<u32> {
        if self.lock().pod.is_some() {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                "this shim already runs a pod",
            ));
        }
        let bad_config = |e: anyhow::Error| {
            err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("husk's configuration: {e:#}"),
            )
        };
        let cfg = Config::load().map_err(bad_config)?;
        let size = vm_size(&spec["annotations"], &cfg.pod);
        let image = image_from(cfg);
        let dir = pod_dir(&self.namespace, &req.id);
        let slots: Vec<Drive> = (0..SLOTS)
            .map(|i| Drive {
                id: drives::slot_id(i),
                path: PathBuf::new(),
                read_only: false,
            })
            .collect();
        let mut vm = Vm::start(&image, &size, &slots, &dir).map_err(|e| {
            err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("starting the pod's microVM: {e:#}"),
            )
        })?;
        let agent = vm.connect_agent(BOOT_TIMEOUT).await.map_err(|e| {
            err(
                ttrpc::Code::DEADLINE_EXCEEDED,
                format!("the pod's microVM: {e:#}"),
            )
        })?;
        let mut r = pb::CreateSandboxRequest::new();
        r.sandbox_id = req.id.clone();
        r.hostname = spec["hostname"].as_str().unwrap_or_default().to_string();
        agent
            .create_sandbox(r)
            .await
            .map_err(|e| agent_err("creating the sandbox in the guest", e))?;
        let vmm_pid = vm.pid().unwrap_or_default();

        // The VM's end is the sandbox task's exit, whoever causes it.
        let (tx, rx) = watch::channel(None);
        let (publisher, ns, id) = (
            self.publisher.clone(),
            self.namespace.clone(),
            req.id.clone(),
        );
        tokio::spawn(async move {
            let status = match vm.wait().await {
                Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    // A guest that powered off because we asked: the pause task was killed.
                    (Some(0), _) => 128 + libc::SIGKILL as u32,
                    (Some(c), _) => c as u32,
                    (None, Some(sig)) => 128 + sig as u32,
                    _ => 255,
                },
                Err(_) => 255,
            };
            let exit = Exit { status, at: now() };
            // Anything but the power-off we asked for: keep the VM's last words in the log
            // before its directory goes.
            if status != 128 + libc::SIGKILL as u32 {
                log::warn!(
                    "pod {id}: the VM ended with status {status}\n{}",
                    vm.logs_tail()
                );
            }
            drop(vm); // removes the VM's directory with the containers' images
            report_exit(&publisher, &ns, &tx, &id, "", vmm_pid, exit).await;
        });
        // OOM kills in any container, as containerd events.
        let (publisher, ns, oom_agent, state) = (
            self.publisher.clone(),
            self.namespace.clone(),
            agent.clone(),
            self.state.clone(),
        );
        tokio::spawn(async move {
            while let Ok(o) = oom_agent.get_oom_event(pb::GetOomEventRequest::new()).await {
                // A kill of the init process that its exit already reported is not repeated.
                if !oom_to_report(&state, &o.container_id, false) {
                    continue;
                }
                let mut e = TaskOOM::new();
                e.container_id = o.container_id;
                publish(&publisher, &ns, TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
            }
        });

        self.lock().pod = Some(Pod {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            vmm_pid,
            agent,
            started: false,
            exit: rx,
            dir,
            slots: vec![None; SLOTS],
        });
        Ok(vmm_pid)
    }

    async fn create_container(
        &self,
        req: &CreateTaskRequest,
        spec_path: &std::path::Path,
    ) -> TtrpcResult<u32> {
        let agent = self.agent()?;
        if self.lock().containers.contains_key(&req.id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let mut spec = oci_spec::runtime::Spec::load(spec_path).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("{}: {e}", spec_path.display()),
            )
        })?;
        let copies = container::guest_spec(&mut spec)
            .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, format!("{e:#}")))?;

        // A drive slot, reserved under the lock.
        let (slot, dir) = {
            let mut st = self.lock();
            let pod = st.pod.as_mut().expect("agent() saw the pod");
            let Some(slot) = pod.slots.iter().position(Option::is_none) else {
                return Err(err(
                    ttrpc::Code::RESOURCE_EXHAUSTED,
                    format!(
                        "the pod's microVM has no free drive slot ({SLOTS} containers at once)"
                    ),
                ));
            };
            pod.slots[slot] = Some(req.id.clone());
            (slot, pod.dir.clone())
        };
        let release = |this: &Self| {
            if let Some(p) = this.lock().pod.as_mut() {
                p.slots[slot] = None;
            }
        };
        let image = dir.join(format!("{}.ext4", req.id));
        let t0 = std::time::Instant::now();
        let size = match self.prepare_rootfs(req, &copies, &image, &dir, slot).await {
            Ok(size) => size,
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                release(self);
                return Err(e);
            }
        };
        let packed = t0.elapsed();

        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = async {
            let mut r = pb::CreateContainerRequest::new();
            r.container_id = req.id.clone();
            r.oci_spec_json =
                serde_json::to_vec(&spec).map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
            r.stdin = !fifos.stdin.is_empty();
            let mut bd = pb::BlockDevice::new();
            bd.source = drives::guest_device(slot);
            bd.fstype = "ext4".into();
            let mut root = pb::Rootfs::new();
            root.set_block(bd);
            r.rootfs = Some(root).into();
            let pid = agent
                .create_container(r)
                .await
                .map_err(|e| agent_err("creating the container in the guest", e))?
                .pid;
            let copies = stdio::attach(&agent, &req.id, "", &fifos)
                .await
                .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
            Ok::<_, ttrpc::Error>((pid, copies))
        }
        .await;
        log::info!(
            "container {}: rootfs image of {} MiB ready in slot {slot} after {} ms, created in the guest after {} ms",
            req.id,
            size >> 20,
            packed.as_millis(),
            t0.elapsed().as_millis()
        );
        let (pid, copies) = match created {
            Ok(c) => c,
            Err(e) => {
                let mut r = pb::RemoveContainerRequest::new();
                r.container_id = req.id.clone();
                let _ = agent.remove_container(r).await;
                eject(&dir, slot).await;
                let _ = std::fs::remove_file(&image);
                release(self);
                return Err(e);
            }
        };
        let mut init = Proc::new(fifos, Vec::new());
        init.pid = pid;
        init.attached(copies);
        self.lock().containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                slot,
                image,
                paused: false,
                ooms_reported: 0,
                init,
                execs: HashMap::new(),
            },
        );
        Ok(pid)
    }

    /// Mounts the container's snapshot, packs it into `image`, unmounts it, and gives the image
    /// to the VM's drive `slot`; the image's size.
    async fn prepare_rootfs(
        &self,
        req: &CreateTaskRequest,
        copies: &[container::Copy],
        image: &std::path::Path,
        dir: &std::path::Path,
        slot: usize,
    ) -> TtrpcResult<u64> {
        let target = PathBuf::from(&req.bundle).join("rootfs");
        let mounts = req.rootfs.clone();
        let (copies, image2) = (copies.to_vec(), image.to_path_buf());
        let packed = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&target)?;
            let mounted = !mounts.is_empty();
            if mounted {
                container::mount_rootfs(&mounts, &target)?;
            }
            let r = container::make_image(&target, &copies, &image2);
            if mounted {
                container::unmount(&target);
            }
            r
        })
        .await
        .map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
        let size = packed.map_err(|e| err(ttrpc::Code::INTERNAL, format!("{e:#}")))?;
        update_drive(dir, slot, image).await?;
        Ok(size)
    }

    /// Starts the waiter of a started process: it reports the exit once the process ended
    /// and its output reached containerd.
    fn spawn_waiter(&self, agent: AgentClient, id: &str, exec_id: &str) {
        let (tx, copies, pid) = {
            let mut st = self.lock();
            let Some(c) = st.containers.get_mut(id) else {
                return;
            };
            let Ok(p) = c.proc(id, exec_id) else {
                return;
            };
            (p.exit_tx.take(), p.copies.take(), p.pid)
        };
        let Some(tx) = tx else { return };
        let state = self.state.clone();
        let (publisher, ns, id, exec_id) = (
            self.publisher.clone(),
            self.namespace.clone(),
            id.to_string(),
            exec_id.to_string(),
        );
        tokio::spawn(async move {
            let mut r = pb::WaitProcessRequest::new();
            r.container_id = id.clone();
            r.exec_id = exec_id.clone();
            let (exit, oom) = match agent.wait_process(r).await {
                Ok(w) => (
                    Exit {
                        status: w.exit_status as u32,
                        at: timestamp(w.exited_at_ns),
                    },
                    w.oom_killed,
                ),
                Err(e) => {
                    log::warn!("waiting for {id}/{exec_id}: {e} (the VM is gone?)");
                    (
                        Exit {
                            status: 255,
                            at: now(),
                        },
                        false,
                    )
                }
            };
            if let Some(mut c) = copies {
                c.drained().await;
            }
            if oom && exec_id.is_empty() && oom_to_report(&state, &id, true) {
                let mut e = TaskOOM::new();
                e.container_id = id.clone();
                publish(&publisher, &ns, TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
            }
            report_exit(&publisher, &ns, &tx, &id, &exec_id, pid, exit).await;
        });
    }

    async fn delete_container(&self, id: &str) -> TtrpcResult<DeleteResponse> {
        let (c, exit) = {
            let mut st = self.lock();
            let c = st.containers.get(id).ok_or_else(|| not_found(id, ""))?;
            let exit = c.init.exit.borrow().clone();
            if exit.is_none() && c.init.started {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("task {id} is still running: kill it first"),
                ));
            }
            let c = st.containers.remove(id).expect("just seen");
            (c, exit)
        };
        if let Ok(agent) = self.agent() {
            let mut r = pb::RemoveContainerRequest::new();
            r.container_id = id.to_string();
            match agent.remove_container(r).await {
                Ok(_) | Err(ClientError::NotFound(_)) => {}
                Err(e) => log::warn!("removing {id} in the guest: {e}"),
            }
        }
        let dir = {
            let mut st = self.lock();
            st.pod.as_mut().map(|p| {
                p.slots[c.slot] = None;
                p.dir.clone()
            })
        };
        if let Some(dir) = dir {
            eject(&dir, c.slot).await;
        }
        let _ = std::fs::remove_file(&c.image);
        container::unmount(&PathBuf::from(&c.bundle).join("rootfs"));
        let exit = exit.unwrap_or(Exit {
            status: 128 + libc::SIGKILL as u32,
            at: now(),
        });
        Ok(self.task_deleted(id, c.init.pid, exit).await)
    }

    /// Tells containerd task `id` is gone; the answer to its Delete.
    async fn task_deleted(&self, id: &str, pid: u32, exit: Exit) -> DeleteResponse {
        let mut e = TaskDelete::new();
        e.container_id = id.to_string();
        e.id = id.to_string();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(exit.at.clone()).into();
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(e)).await;
        delete_response(pid, exit)
    }

    /// Pauses (freezes the guest cgroup of) or resumes container `id`.
    async fn freeze(&self, id: String, pause: bool) -> TtrpcResult<Empty> {
        self.container(&id, |_| Ok(()))?;
        let agent = self.agent()?;
        let done = if pause {
            let mut q = pb::PauseContainerRequest::new();
            q.container_id = id.clone();
            agent.pause_container(q).await
        } else {
            let mut q = pb::ResumeContainerRequest::new();
            q.container_id = id.clone();
            agent.resume_container(q).await
        };
        done.map_err(|e| agent_err(if pause { "pausing" } else { "resuming" }, e))?;
        self.container(&id, |c| {
            c.paused = pause;
            Ok(())
        })?;
        if pause {
            let mut e = TaskPaused::new();
            e.container_id = id;
            self.publish(TASK_PAUSED_EVENT_TOPIC, Box::new(e)).await;
        } else {
            let mut e = TaskResumed::new();
            e.container_id = id;
            self.publish(TASK_RESUMED_EVENT_TOPIC, Box::new(e)).await;
        }
        Ok(Empty::new())
    }

    /// Ends the shim once it has nothing left to serve.
    fn exit_if_idle(&self) {
        let st = self.lock();
        if st.pod.is_none() && st.containers.is_empty() {
            self.exit_signal.signal();
        }
    }
}

/// Whether an OOM kill in container `id` still needs its event, counting it if so. The
/// agent's OOM events and the init process's exit status both report OOM kills: the init's
/// exit (`at_exit`) reports one only if no event did yet, and an event that comes after the
/// init's exit reported one is not repeated. The event always precedes the exit it explains.
fn oom_to_report(state: &Mutex<State>, id: &str, at_exit: bool) -> bool {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = st.containers.get_mut(id) else {
        return !at_exit;
    };
    let exited = c.init.exit.borrow().is_some();
    let report = if at_exit {
        c.ooms_reported == 0
    } else {
        !(exited && c.ooms_reported > 0)
    };
    if report {
        c.ooms_reported += 1;
    }
    report
}

/// Gives drive slot `slot` of the VM in `dir` the backing file `path` (empty: no file, the
/// guest sees a disk of size 0), through the VMM's control socket.
async fn update_drive(
    dir: &std::path::Path,
    slot: usize,
    path: &std::path::Path,
) -> TtrpcResult<()> {
    let api = husk_vmm_api::Client::new(VmDir::new(dir).api_sock(), Duration::from_secs(5));
    let (id, path) = (drives::slot_id(slot), path.to_path_buf());
    let done = tokio::task::spawn_blocking(move || api.update_drive(&id, &path))
        .await
        .map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
    match done {
        Ok(()) => Ok(()),
        Err(husk_vmm_api::ClientError::Refused(e)) => Err(err(
            ttrpc::Code::INTERNAL,
            format!("the VMM refused to update drive slot{slot}: {e}"),
        )),
        Err(e) => Err(err(
            ttrpc::Code::UNAVAILABLE,
            format!("updating drive slot{slot} of the VM: {}", error_chain(&e)),
        )),
    }
}

/// Empties drive slot `slot` of the VM in `dir` (the guest sees a disk of size 0).
async fn eject(dir: &std::path::Path, slot: usize) {
    if let Err(e) = update_drive(dir, slot, std::path::Path::new("")).await {
        log::debug!("emptying drive slot {slot}: {e}");
    }
}

fn delete_response(pid: u32, exit: Exit) -> DeleteResponse {
    let mut r = DeleteResponse::new();
    r.pid = pid;
    r.exit_status = exit.status;
    r.exited_at = Some(exit.at).into();
    r
}

/// Records how process `exec_id` of task `container_id` ended (empty: its init, or the
/// sandbox task itself) for State and Wait, then tells containerd.
async fn report_exit(
    publisher: &RemotePublisher,
    ns: &str,
    tx: &watch::Sender<Option<Exit>>,
    container_id: &str,
    exec_id: &str,
    pid: u32,
    exit: Exit,
) {
    let mut e = TaskExit::new();
    e.container_id = container_id.to_string();
    e.id = if exec_id.is_empty() {
        container_id
    } else {
        exec_id
    }
    .to_string();
    e.pid = pid;
    e.exit_status = exit.status;
    e.exited_at = Some(exit.at.clone()).into();
    let _ = tx.send(Some(exit));
    publish(publisher, ns, TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
}

async fn publish(publisher: &RemotePublisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher
        .publish(Context::default(), topic, ns, event)
        .await
    {
        log::warn!("publishing {topic}: {e}");
    }
}

/// The VM's size: the CRI sandbox annotations (cpu quota/period, memory plus the overhead
/// for the guest kernel and agent) where present, else husk's configured pod defaults.
fn vm_size(annotations: &serde_json::Value, defaults: &PodDefaults) -> VmSize {
    let num = |k: &str| {
        annotations[k]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    let vcpus = match (
        num("io.kubernetes.cri.sandbox-cpu-quota"),
        num("io.kubernetes.cri.sandbox-cpu-period"),
    ) {
        (Some(q), Some(p)) => q.div_ceil(p).clamp(1, 16) as u8,
        _ => defaults.vcpus,
    };
    let mem_mib = num("io.kubernetes.cri.sandbox-memory")
        .map(|b| (b >> 20) as u32 + defaults.overhead_mib)
        .unwrap_or(defaults.memory_mib)
        .max(128);
    VmSize { vcpus, mem_mib }
}

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let spec_path = PathBuf::from(&req.bundle).join("config.json");
        let spec: serde_json::Value = std::fs::read(&spec_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                err(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("{} is missing or not JSON", spec_path.display()),
                )
            })?;
        let kind = spec["annotations"]["io.kubernetes.cri.container-type"]
            .as_str()
            .unwrap_or("sandbox");
        let pid = if kind == "sandbox" {
            self.create_sandbox(&req, &spec).await?
        } else {
            self.create_container(&req, &spec_path).await?
        };
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
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(e)).await;
        let mut resp = CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        if let Some(pid) = self.pod(&req.id, |p| {
            p.started = true;
            p.vmm_pid
        }) {
            let mut e = TaskStart::new();
            e.container_id = req.id;
            e.pid = pid;
            self.publish(TASK_START_EVENT_TOPIC, Box::new(e)).await;
            let mut resp = StartResponse::new();
            resp.pid = pid;
            return Ok(resp);
        }
        let agent = self.agent()?;
        let (process_json, fifos) = self.container(&req.id, |c| {
            let p = c.proc(&req.id, &req.exec_id)?;
            if p.started {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("{} {} was already started", req.id, req.exec_id),
                ));
            }
            p.started = true;
            Ok((p.process_json.clone(), p.fifos.clone()))
        })?;
        let started = if req.exec_id.is_empty() {
            let mut r = pb::StartContainerRequest::new();
            r.container_id = req.id.clone();
            agent
                .start_container(r)
                .await
                .map(|r| (r.pid, None))
                .map_err(|e| agent_err("starting the container", e))
        } else {
            let mut r = pb::ExecProcessRequest::new();
            r.container_id = req.id.clone();
            r.exec_id = req.exec_id.clone();
            r.process_json = process_json;
            r.stdin = !fifos.stdin.is_empty();
            match agent.exec_process(r).await {
                Ok(r) => stdio::attach(&agent, &req.id, &req.exec_id, &fifos)
                    .await
                    .map(|c| (r.pid, Some(c)))
                    .map_err(|e| err(ttrpc::Code::INTERNAL, e)),
                Err(e) => Err(agent_err("starting the exec process", e)),
            }
        };
        let (pid, copies) = match started {
            Ok(s) => s,
            Err(e) => {
                // The process never ran: it has exited (128, as runc reports a failed start),
                // so that containerd sees it stopped and can delete it.
                let exit = Exit {
                    status: 128,
                    at: now(),
                };
                let (tx, pid) = self
                    .container(&req.id, |c| {
                        let p = c.proc(&req.id, &req.exec_id)?;
                        Ok((p.exit_tx.take(), p.pid))
                    })
                    .unwrap_or((None, 0));
                if let Some(tx) = tx {
                    let (publisher, ns) = (&self.publisher, &self.namespace);
                    report_exit(publisher, ns, &tx, &req.id, &req.exec_id, pid, exit).await;
                }
                return Err(e);
            }
        };
        self.container(&req.id, |c| {
            let p = c.proc(&req.id, &req.exec_id)?;
            p.pid = pid;
            if let Some(copies) = copies {
                p.attached(copies);
            }
            Ok(())
        })?;
        if req.exec_id.is_empty() {
            let mut e = TaskStart::new();
            e.container_id = req.id.clone();
            e.pid = pid;
            self.publish(TASK_START_EVENT_TOPIC, Box::new(e)).await;
        } else {
            let mut e = TaskExecStarted::new();
            e.container_id = req.id.clone();
            e.exec_id = req.exec_id.clone();
            e.pid = pid;
            self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
                .await;
        }
        self.spawn_waiter(agent, &req.id, &req.exec_id);
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let mut r = StateResponse::new();
        r.id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        let pod = self.pod(&req.id, |p| {
            r.bundle = p.bundle.clone();
            r.pid = p.vmm_pid;
            let exit = p.exit.borrow().clone();
            r.status = match (&exit, p.started) {
                (Some(_), _) => Status::STOPPED,
                (None, true) => Status::RUNNING,
                (None, false) => Status::CREATED,
            }
            .into();
            exit
        });
        let exit = match pod {
            Some(exit) => exit,
            None => self.container(&req.id, |c| {
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

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let mut r = PidsResponse::new();
        if let Some(pid) = self.pod(&req.id, |p| p.vmm_pid) {
            let mut info = ProcessInfo::new();
            info.pid = pid;
            r.processes.push(info);
            return Ok(r);
        }
        self.container(&req.id, |_| Ok(()))?;
        let mut q = pb::ListProcessesRequest::new();
        q.container_id = req.id.clone();
        let pids = self
            .agent()?
            .list_processes(q)
            .await
            .map_err(|e| agent_err("listing the container's processes", e))?;
        for pid in pids.pids {
            let mut info = ProcessInfo::new();
            info.pid = pid;
            r.processes.push(info);
        }
        Ok(r)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.freeze(req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.freeze(req.id, false).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        if let Some((agent, pid, exited)) = self.pod(&req.id, |p| {
            (p.agent.clone(), p.vmm_pid, p.exit.borrow().is_some())
        }) {
            if exited {
                return Ok(Empty::new());
            }
            // Power the guest off; if it does not answer, the VMM goes.
            let mut r = pb::DestroySandboxRequest::new();
            r.sandbox_id = req.id.clone();
            let asked =
                tokio::time::timeout(Duration::from_secs(10), agent.destroy_sandbox(r)).await;
            if !matches!(asked, Ok(Ok(_))) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Ok(Empty::new());
        }
        let exited = self.container(&req.id, |c| {
            Ok(c.proc(&req.id, &req.exec_id)?.exit.borrow().is_some())
        })?;
        if exited && !req.all {
            return Err(err(
                ttrpc::Code::NOT_FOUND,
                format!("process {} {} already finished", req.id, req.exec_id),
            ));
        }
        let mut q = pb::SignalProcessRequest::new();
        q.container_id = req.id.clone();
        q.exec_id = req.exec_id.clone();
        q.signal = req.signal;
        q.all = req.all;
        self.agent()?
            .signal_process(q)
            .await
            .map_err(|e| agent_err("signalling the process", e))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.agent()?;
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::Process>(&process_json).is_err() {
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {}: spec is not an OCI process (JSON)", req.exec_id),
            ));
        }
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.container(&req.id, |c| {
            if c.init.exit.borrow().is_some() {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists in {}", req.exec_id, req.id),
                ));
            }
            c.execs
                .insert(req.exec_id.clone(), Proc::new(fifos, process_json));
            Ok(())
        })?;
        let mut e = TaskExecAdded::new();
        e.container_id = req.id;
        e.exec_id = req.exec_id;
        self.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)).await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.container(&req.id, |c| c.proc(&req.id, &req.exec_id).map(|_| ()))?;
        let mut q = pb::ResizeTerminalRequest::new();
        q.container_id = req.id;
        q.exec_id = req.exec_id;
        q.rows = req.height;
        q.cols = req.width;
        self.agent()?
            .resize_terminal(q)
            .await
            .map_err(|e| agent_err("resizing the terminal", e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.container(&req.id, |c| {
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
        if self.pod(&req.id, |_| ()).is_some() {
            // The VM's size is fixed at boot; the containers carry the limits.
            return Ok(Empty::new());
        }
        self.container(&req.id, |_| Ok(()))?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).is_err() {
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                "update: resources are not OCI LinuxResources (JSON)",
            ));
        }
        let mut q = pb::UpdateContainerRequest::new();
        q.container_id = req.id;
        q.resources_json = resources;
        self.agent()?
            .update_container(q)
            .await
            .map_err(|e| agent_err("updating the container's resources", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let rx = match self.pod(&req.id, |p| p.exit.clone()) {
            Some(rx) => rx,
            None => self.container(&req.id, |c| Ok(c.proc(&req.id, &req.exec_id)?.exit.clone()))?,
        };
        let mut rx = rx;
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.clone().expect("waited for Some"),
            Err(_) => Exit {
                status: 255,
                at: now(),
            },
        };
        let mut r = WaitResponse::new();
        r.exit_status = exit.status;
        r.exited_at = Some(exit.at).into();
        Ok(r)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let m = if self.pod(&req.id, |_| ()).is_some() {
            // The VM has no cgroup of its own that containerd could use.
            Metrics::new()
        } else {
            self.container(&req.id, |_| Ok(()))?;
            let mut q = pb::ContainerStatsRequest::new();
            q.container_id = req.id.clone();
            let s = self
                .agent()?
                .container_stats(q)
                .await
                .map_err(|e| agent_err("reading the container's statistics", e))?;
            metrics::from_agent(&s)
        };
        let mut r = StatsResponse::new();
        r.stats = Some(metrics::to_any(&m).map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?)
            .into();
        Ok(r)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        if let Some((pid, exit)) = self.pod(&req.id, |p| (p.vmm_pid, p.exit.borrow().clone())) {
            let Some(exit) = exit else {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("task {} is still running: kill it first", req.id),
                ));
            };
            self.lock().pod = None;
            return Ok(self.task_deleted(&req.id, pid, exit).await);
        }
        if req.exec_id.is_empty() {
            return self.delete_container(&req.id).await;
        }
        let (pid, exit, in_agent) = self.container(&req.id, |c| {
            let p = c.proc(&req.id, &req.exec_id)?;
            let exit = p.exit.borrow().clone();
            if exit.is_none() && p.started {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            // Only a started exec exists in the agent.
            let (pid, in_agent) = (p.pid, p.started);
            c.execs.remove(&req.exec_id);
            Ok((pid, exit, in_agent))
        })?;
        // The agent keeps an exec's status until told: forget it there too (the VM may be
        // gone already, which is fine).
        if in_agent {
            if let Ok(agent) = self.agent() {
                let mut r = husk_client::pb::RemoveProcessRequest::new();
                r.container_id = req.id.clone();
                r.exec_id = req.exec_id.clone();
                if let Err(e) = agent.remove_process(r).await {
                    log::warn!("removing exec {}/{} in the guest: {e}", req.id, req.exec_id);
                }
            }
        }
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: now(),
        });
        Ok(delete_response(pid, exit))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pid = match self.pod(&req.id, |p| p.vmm_pid) {
            Some(pid) => pid,
            None => self
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
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            format!(
                "husk cannot checkpoint task {} (a microVM snapshot is not implemented)",
                req.id
            ),
        ))
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.exit_if_idle();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_size_from_cri_annotations() {
        let a = serde_json::json!({
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": "536870912",
        });
        let d = Config::default().pod;
        let s = vm_size(&a, &d);
        assert_eq!((s.vcpus, s.mem_mib), (2, 512 + 64));
        let s = vm_size(&serde_json::json!({}), &d);
        assert_eq!((s.vcpus, s.mem_mib), (1, 256));
        let s = vm_size(
            &serde_json::json!({"io.kubernetes.cri.sandbox-memory": "0"}),
            &d,
        );
        assert_eq!(s.mem_mib, 256);
        // The configured defaults where CRI says nothing, and its overhead where it does.
        let d = PodDefaults {
            vcpus: 2,
            memory_mib: 1024,
            overhead_mib: 100,
        };
        let s = vm_size(&serde_json::json!({}), &d);
        assert_eq!((s.vcpus, s.mem_mib), (2, 1024));
        let s = vm_size(&a, &d);
        assert_eq!((s.vcpus, s.mem_mib), (2, 612));
    }

    #[test]
    fn timestamps_from_nanoseconds() {
        let t = timestamp(1_700_000_000_123_456_789);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_789));
    }
}
