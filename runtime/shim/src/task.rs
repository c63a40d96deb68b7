//! The container tasks of the pod and their processes (the init and its execs): the state
//! State and Wait read, create (rootfs image, the guest, stdio), start, the waiters that
//! report exits, and delete.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use containerd_shim::{
    api::{CreateTaskRequest, DeleteResponse, Status},
    protos::{
        events::task::{TaskExecStarted, TaskOOM, TaskStart},
        topics::{TASK_EXEC_STARTED_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC, TASK_START_EVENT_TOPIC},
    },
};
use husk::pod::{NewContainer, Pod};
use husk_client::pb;
use tokio::sync::{oneshot, watch};

use crate::{
    error::{Result, ShimError},
    events::{delete_response, timestamp, Exit, ExitRx, ExitTx},
    rootfs,
    service::{lock, Shim},
    stdio::{self, Fifos},
};

/// A process of a container: its init process or an exec.
pub struct Proc {
    pub pid: u32,
    pub fifos: Fifos,
    /// For an exec: its OCI process (JSON), used at start.
    process_json: Vec<u8>,
    pub started: bool,
    pub exit: ExitRx,
    exit_tx: Option<ExitTx>,
    /// Attached output copies, until the waiter takes them.
    copies: Option<stdio::Copies>,
    pub close_stdin: Option<oneshot::Sender<()>>,
}

impl Proc {
    pub fn new(fifos: Fifos, process_json: Vec<u8>) -> Proc {
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

    pub fn status(&self, paused: bool) -> Status {
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
pub struct Container {
    pub bundle: String,
    pub paused: bool,
    /// OOM events published for this container.
    ooms_reported: u32,
    pub init: Proc,
    pub execs: HashMap<String, Proc>,
}

impl Container {
    /// Process `exec_id` (empty: the init) of this container, `id`.
    pub fn proc(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| ShimError::not_found(id, exec_id))
        }
    }
}

/// Whether an OOM kill in container `id` still needs its event, counting it if so. The
/// agent's OOM events and the init process's exit status both report OOM kills: the init's
/// exit (`at_exit`) reports one only if no event did yet, and an event that comes after the
/// init's exit reported one is not repeated. The event always precedes the exit it explains.
pub fn oom_to_report(state: &crate::service::Shared, id: &str, at_exit: bool) -> bool {
    let mut st = lock(state);
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

impl Shim {
    /// Creates container task `req` in the pod: its layers (from the layer cache, and one of
    /// its own) onto the pod's layered drive, the container in the guest, its stdio attached.
    /// The init's pid.
    pub async fn create_container(&self, req: &CreateTaskRequest, spec_path: &Path) -> Result<u32> {
        let pod = self.pod()?;
        if lock(&self.state).containers.contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!(
                "task {} already exists",
                req.id
            )));
        }
        let mut spec = oci_spec::runtime::Spec::load(spec_path)
            .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", spec_path.display())))?;
        let volumes = rootfs::guest_spec(&mut spec, &req.id)
            .map_err(|e| ShimError::InvalidArgument(format!("{e:#}")))?;
        let cache = husk::config::Config::load()
            .map_err(|e| ShimError::FailedPrecondition(format!("husk's configuration: {e:#}")))?
            .layer_cache();
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let t0 = std::time::Instant::now();
        let made = rootfs::layers(
            cache,
            req.rootfs.clone(),
            PathBuf::from(&req.bundle).join("rootfs"),
            pod.dir().join("layers"),
            req.id.clone(),
        )
        .await
        .map_err(|e| ShimError::Internal(format!("{e:#}")))?;
        let created = async {
            let new = NewContainer {
                id: &req.id,
                spec: &spec,
                layers: &made.layers,
                stdin: !fifos.stdin.is_empty(),
                volumes: &volumes,
            };
            let pid = pod.create_container(&new).await;
            // The engine unlinks the container's own layers once the VM holds them; not on
            // every failure path.
            for l in made.layers.iter().filter(|l| l.unlink) {
                let _ = std::fs::remove_file(&l.image);
            }
            let pid = pid?;
            log::info!(
                container = req.id.as_str();
                "container {}: {} image layers ({} from the cache, {} converted) and {} of its own in {} ms, created in the guest after {} ms",
                req.id,
                made.cached + made.converted,
                made.cached,
                made.converted,
                made.own,
                made.took.as_millis(),
                t0.elapsed().as_millis()
            );
            match stdio::attach(pod.agent(), &req.id, "", &fifos).await {
                Ok(copies) => Ok((pid, copies)),
                Err(e) => {
                    let _ = pod.remove_container(&req.id).await;
                    Err(ShimError::Internal(e))
                }
            }
        }
        .await;
        let (pid, copies) = created?;
        let mut init = Proc::new(fifos, Vec::new());
        init.pid = pid;
        init.attached(copies);
        {
            let mut st = lock(&self.state);
            st.containers.insert(
                req.id.clone(),
                Container {
                    bundle: req.bundle.clone(),
                    paused: false,
                    ooms_reported: 0,
                    init,
                    execs: HashMap::new(),
                },
            );
            let st = &mut *st;
            if let Some(s) = st.sandbox.as_mut() {
                s.containers_changed(st.containers.keys());
            }
        }
        Ok(pid)
    }

    /// Starts process `exec_id` (empty: the init) of container `id`; its pid.
    pub async fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let pod = self.pod()?;
        let (process_json, fifos) = self.container(id, |c| {
            let p = c.proc(id, exec_id)?;
            if p.started {
                return Err(ShimError::FailedPrecondition(format!(
                    "{id} {exec_id} was already started"
                )));
            }
            p.started = true;
            Ok((p.process_json.clone(), p.fifos.clone()))
        })?;
        let agent = pod.agent();
        let started = if exec_id.is_empty() {
            let mut r = pb::StartContainerRequest::new();
            r.container_id = id.to_string();
            agent
                .start_container(r)
                .await
                .map(|r| (r.pid, None))
                .map_err(ShimError::agent("starting the container"))
        } else {
            let mut r = pb::ExecProcessRequest::new();
            r.container_id = id.to_string();
            r.exec_id = exec_id.to_string();
            r.process_json = process_json;
            r.stdin = !fifos.stdin.is_empty();
            match agent.exec_process(r).await {
                Ok(r) => stdio::attach(agent, id, exec_id, &fifos)
                    .await
                    .map(|c| (r.pid, Some(c)))
                    .map_err(ShimError::Internal),
                Err(e) => Err(ShimError::agent("starting the exec process")(e)),
            }
        };
        let (pid, copies) = match started {
            Ok(s) => s,
            Err(e) => {
                // The process never ran: it has exited (128, as runc reports a failed start),
                // so that containerd sees it stopped and can delete it.
                let (tx, pid) = self
                    .container(id, |c| {
                        let p = c.proc(id, exec_id)?;
                        Ok((p.exit_tx.take(), p.pid))
                    })
                    .unwrap_or((None, 0));
                if let Some(tx) = tx {
                    self.events
                        .exited(&tx, id, exec_id, pid, Exit::now(128))
                        .await;
                }
                return Err(e);
            }
        };
        self.container(id, |c| {
            let p = c.proc(id, exec_id)?;
            p.pid = pid;
            if let Some(copies) = copies {
                p.attached(copies);
            }
            Ok(())
        })?;
        if exec_id.is_empty() {
            let mut e = TaskStart::new();
            e.container_id = id.to_string();
            e.pid = pid;
            self.events
                .publish(TASK_START_EVENT_TOPIC, Box::new(e))
                .await;
        } else {
            let mut e = TaskExecStarted::new();
            e.container_id = id.to_string();
            e.exec_id = exec_id.to_string();
            e.pid = pid;
            self.events
                .publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
                .await;
        }
        self.spawn_waiter(pod, id, exec_id);
        Ok(pid)
    }

    /// Starts the waiter of a started process: it reports the exit once the process ended
    /// and its output reached containerd.
    fn spawn_waiter(&self, pod: Pod, id: &str, exec_id: &str) {
        let Ok((tx, copies, pid)) = self.container(id, |c| {
            let p = c.proc(id, exec_id)?;
            Ok((p.exit_tx.take(), p.copies.take(), p.pid))
        }) else {
            return;
        };
        let Some(tx) = tx else { return };
        let (shim, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let mut r = pb::WaitProcessRequest::new();
            r.container_id = id.clone();
            r.exec_id = exec_id.clone();
            let (exit, oom) = match pod.agent().wait_process(r).await {
                Ok(w) => (
                    Exit {
                        status: w.exit_status as u32,
                        at: timestamp(w.exited_at_ns),
                    },
                    w.oom_killed,
                ),
                Err(e) => {
                    log::warn!(container = id.as_str(), exec = exec_id.as_str(); "waiting for {id}/{exec_id}: {e} (the VM is gone?)");
                    (Exit::now(255), false)
                }
            };
            if let Some(mut c) = copies {
                c.drained().await;
            }
            if oom && exec_id.is_empty() && oom_to_report(&shim.state, &id, true) {
                let mut e = TaskOOM::new();
                e.container_id = id.clone();
                shim.events.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
            }
            shim.events.exited(&tx, &id, &exec_id, pid, exit).await;
        });
    }

    /// Deletes container `id` (stopped or never started): from the guest, and its layers
    /// that no other container of the pod holds from the VM.
    pub async fn delete_container(&self, id: &str) -> Result<DeleteResponse> {
        let (c, exit) = {
            let mut st = lock(&self.state);
            let c = st
                .containers
                .get(id)
                .ok_or_else(|| ShimError::not_found(id, ""))?;
            let exit = c.init.exit.borrow().clone();
            if exit.is_none() && c.init.started {
                return Err(ShimError::FailedPrecondition(format!(
                    "task {id} is still running: kill it first"
                )));
            }
            let c = st.containers.remove(id).expect("just seen");
            let st = &mut *st;
            if let Some(s) = st.sandbox.as_mut() {
                s.containers_changed(st.containers.keys());
            }
            (c, exit)
        };
        // A VM that is gone has nothing to remove.
        if let Ok(pod) = self.pod() {
            if let Err(e) = pod.remove_container(id).await {
                log::warn!(container = id; "removing {id} from the guest: {e}");
            }
        }
        let exit = exit.unwrap_or(Exit::now(128 + libc::SIGKILL as u32));
        Ok(self.events.deleted(id, c.init.pid, exit).await)
    }

    /// Deletes exec `exec_id` of container `id` once it ended (or never started).
    pub async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<DeleteResponse> {
        let (pid, exit, in_agent) = self.container(id, |c| {
            let p = c.proc(id, exec_id)?;
            let exit = p.exit.borrow().clone();
            if exit.is_none() && p.started {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            // Only a started exec exists in the agent.
            let (pid, in_agent) = (p.pid, p.started);
            c.execs.remove(exec_id);
            Ok((pid, exit, in_agent))
        })?;
        // The agent keeps an exec's status until told: forget it there too (the VM may be
        // gone already, which is fine).
        if in_agent {
            if let Ok(pod) = self.pod() {
                let mut r = pb::RemoveProcessRequest::new();
                r.container_id = id.to_string();
                r.exec_id = exec_id.to_string();
                if let Err(e) = pod.agent().remove_process(r).await {
                    log::warn!(container = id, exec = exec_id; "removing exec {id}/{exec_id} in the guest: {e}");
                }
            }
        }
        Ok(delete_response(pid, exit.unwrap_or(Exit::now(0))))
    }
}
