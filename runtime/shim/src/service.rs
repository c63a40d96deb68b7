//! The task service of one pod's shim.
//!
//! This first version carries the pod itself: the sandbox task boots the microVM (Create),
//! runs while the VM runs (Start, State, Pids, Wait, Connect), and powers it off (Kill,
//! Delete). Tasks for the pod's containers are refused with a clear error until the shim
//! learns to move their rootfs into the guest.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use containerd_shim::{
    api::{
        ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
        DeleteResponse, Empty, KillRequest, PidsRequest, PidsResponse, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, Status, WaitRequest,
        WaitResponse,
    },
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    protos::{
        events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart},
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        topics::{
            TASK_CREATE_EVENT_TOPIC, TASK_DELETE_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
        },
        ttrpc::{self, r#async::TtrpcContext},
        types::task::ProcessInfo,
    },
    Context, Task, TtrpcResult,
};
use husk::vm::{default_image, Vm, VmSize};
use husk_client::{pb, AgentClient};
use tokio::sync::watch;

/// How long the guest may take to answer (nested virtualization is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

fn err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// How a task ended.
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
}

pub struct TaskService {
    namespace: String,
    exit_signal: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    pod: Arc<Mutex<Option<Pod>>>,
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
            pod: Arc::new(Mutex::new(None)),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    fn pod<T>(&self, id: &str, f: impl FnOnce(&mut Pod) -> T) -> TtrpcResult<T> {
        let mut g = self.pod.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(p) if p.id == id => Ok(f(p)),
            _ => Err(err(
                ttrpc::Code::NOT_FOUND,
                format!("no task {id} in this pod"),
            )),
        }
    }
}

async fn publish(publisher: &RemotePublisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher
        .publish(Context::default(), topic, ns, event)
        .await
    {
        log::warn!("publishing {topic}: {e}");
    }
}

/// The VM's size: the CRI sandbox annotations when present, else 1 vCPU and 256 MiB, plus
/// a fixed overhead for the guest kernel and agent.
fn vm_size(annotations: &serde_json::Value) -> VmSize {
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
        _ => 1,
    };
    let mem_mib = num("io.kubernetes.cri.sandbox-memory")
        .map(|b| (b >> 20) as u32 + 64)
        .unwrap_or(256)
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
        let annotations = &spec["annotations"];
        let kind = annotations["io.kubernetes.cri.container-type"]
            .as_str()
            .unwrap_or("sandbox");
        if kind != "sandbox" {
            return Err(err(
                ttrpc::Code::UNIMPLEMENTED,
                format!(
                    "husk runs pods but not yet their containers (task {}, container-type {kind})",
                    req.id
                ),
            ));
        }
        if self.pod.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                "this shim already runs a pod",
            ));
        }

        let size = vm_size(annotations);
        let dir = PathBuf::from("/run/husk/shim")
            .join(&self.namespace)
            .join(&req.id);
        let mut vm = Vm::start(&default_image(), &size, &[], &dir).map_err(|e| {
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
        agent.create_sandbox(r).await.map_err(|e| {
            err(
                ttrpc::Code::INTERNAL,
                format!("creating the sandbox in the guest: {e}"),
            )
        })?;
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
            let mut e = TaskExit::new();
            e.container_id = id.clone();
            e.id = id;
            e.pid = vmm_pid;
            e.exit_status = exit.status;
            e.exited_at = Some(exit.at.clone()).into();
            let _ = tx.send(Some(exit));
            drop(vm); // removes the VM's directory
            publish(&publisher, &ns, TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
        });

        *self.pod.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pod {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            vmm_pid,
            agent,
            started: false,
            exit: rx,
        });
        let mut e = TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.pid = vmm_pid;
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(e)).await;
        let mut resp = CreateTaskResponse::new();
        resp.pid = vmm_pid;
        Ok(resp)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.pod(&req.id, |p| {
            p.started = true;
            p.vmm_pid
        })?;
        let mut e = TaskStart::new();
        e.container_id = req.id;
        e.pid = pid;
        self.publish(TASK_START_EVENT_TOPIC, Box::new(e)).await;
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.pod(&req.id, |p| {
            let mut r = StateResponse::new();
            r.id = p.id.clone();
            r.bundle = p.bundle.clone();
            r.pid = p.vmm_pid;
            let exit = p.exit.borrow().clone();
            r.status = match (&exit, p.started) {
                (Some(_), _) => Status::STOPPED,
                (None, true) => Status::RUNNING,
                (None, false) => Status::CREATED,
            }
            .into();
            if let Some(e) = exit {
                r.exit_status = e.status;
                r.exited_at = Some(e.at).into();
            }
            r
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pid = self.pod(&req.id, |p| p.vmm_pid)?;
        let mut info = ProcessInfo::new();
        info.pid = pid;
        let mut r = PidsResponse::new();
        r.processes.push(info);
        Ok(r)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let (agent, pid, exited) = self.pod(&req.id, |p| {
            (p.agent.clone(), p.vmm_pid, p.exit.borrow().is_some())
        })?;
        if exited {
            return Ok(Empty::new());
        }
        // Power the guest off; if it does not answer, the VMM goes.
        let mut r = pb::DestroySandboxRequest::new();
        r.sandbox_id = req.id.clone();
        let asked = tokio::time::timeout(Duration::from_secs(10), agent.destroy_sandbox(r)).await;
        if !matches!(asked, Ok(Ok(_))) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut rx = self.pod(&req.id, |p| p.exit.clone())?;
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

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (pid, exit) = self.pod(&req.id, |p| (p.vmm_pid, p.exit.borrow().clone()))?;
        let Some(exit) = exit else {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("task {} is still running: kill it first", req.id),
            ));
        };
        *self.pod.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut e = TaskDelete::new();
        e.container_id = req.id.clone();
        e.id = req.id.clone();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(exit.at.clone()).into();
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(e)).await;
        let mut r = DeleteResponse::new();
        r.pid = pid;
        r.exit_status = exit.status;
        r.exited_at = Some(exit.at).into();
        Ok(r)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pid = self.pod(&req.id, |p| p.vmm_pid).unwrap_or_default();
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = pid;
        Ok(r)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.pod.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            self.exit_signal.signal();
        }
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
        let s = vm_size(&a);
        assert_eq!((s.vcpus, s.mem_mib), (2, 512 + 64));
        let s = vm_size(&serde_json::json!({}));
        assert_eq!((s.vcpus, s.mem_mib), (1, 256));
        let s = vm_size(&serde_json::json!({"io.kubernetes.cri.sandbox-memory": "0"}));
        assert_eq!(s.mem_mib, 256);
    }
}
