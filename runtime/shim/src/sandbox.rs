//! The sandbox task: the pod's microVM. Create boots it through the pod engine, Start and
//! State report the VMM, Kill powers the guest off, and the VM's end, whoever causes it, is
//! the task's exit. OOM kills in the guest become containerd events here.

use std::{path::PathBuf, time::Duration};

use containerd_shim::{
    api::CreateTaskRequest,
    protos::{events::task::TaskOOM, topics::TASK_OOM_EVENT_TOPIC},
};
use husk::{
    config::{Config, PodDefaults},
    pod::{Pod, PodConfig},
    vm::{image_from, Vm, VmSize},
};
use husk_client::pb;
use tokio::sync::watch;

use crate::{
    error::{Result, ShimError},
    events::{Events, Exit, ExitRx, ExitTx},
    service::Shared,
};

/// How long the guest may take to answer (nested virtualization is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Empty drive slots of a pod's VM, one per container that can run at once.
const SLOTS: usize = 8;

/// The status of a sandbox task whose VM was powered off because we asked (the pause task
/// was killed): 128 + SIGKILL, as runc reports a killed pause process.
const KILLED: u32 = 128 + libc::SIGKILL as u32;

/// The run directory of pod `id` in containerd namespace `ns`: the VM's sockets and logs and
/// its containers' rootfs images.
pub fn pod_dir(ns: &str, id: &str) -> PathBuf {
    PathBuf::from("/run/husk/shim").join(ns).join(id)
}

/// The sandbox task.
pub struct Sandbox {
    pub id: String,
    pub bundle: String,
    pub pod: Pod,
    pub started: bool,
    pub exit: ExitRx,
}

impl Sandbox {
    /// Boots the pod's VM for task `req` (whose OCI spec is `spec`) and starts watching it.
    pub async fn create(
        req: &CreateTaskRequest,
        spec: &serde_json::Value,
        events: &Events,
        state: &Shared,
    ) -> Result<Sandbox> {
        let cfg = Config::load()
            .map_err(|e| ShimError::FailedPrecondition(format!("husk's configuration: {e:#}")))?;
        let size = vm_size(&spec["annotations"], &cfg.pod);
        let cfg = PodConfig {
            id: req.id.clone(),
            hostname: spec["hostname"].as_str().unwrap_or_default().to_string(),
            image: image_from(cfg),
            size,
            dir: pod_dir(events.namespace(), &req.id),
            slots: SLOTS,
            boot_timeout: BOOT_TIMEOUT,
        };
        let (pod, vm) = Pod::boot(&cfg).await?;
        let (tx, exit) = watch::channel(None);
        tokio::spawn(watch_vm(
            vm,
            events.clone(),
            tx,
            req.id.clone(),
            pod.vmm_pid(),
        ));
        tokio::spawn(watch_ooms(pod.clone(), events.clone(), state.clone()));
        Ok(Sandbox {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            pod,
            started: false,
            exit,
        })
    }

    /// The pod, while its VM runs.
    pub fn running(&self) -> Result<Pod> {
        if self.exit.borrow().is_some() {
            return Err(ShimError::FailedPrecondition(
                "the pod's microVM has stopped".into(),
            ));
        }
        Ok(self.pod.clone())
    }
}

/// Powers the pod's guest off; if it does not answer, the VMM goes.
pub async fn kill(pod: &Pod) {
    if !pod.power_off(Duration::from_secs(10)).await {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pod.vmm_pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits for the VM to end and reports that as the sandbox task's exit.
async fn watch_vm(mut vm: Vm, events: Events, tx: ExitTx, id: String, vmm_pid: u32) {
    let status = match vm.wait().await {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            // A guest that powered off because we asked.
            (Some(0), _) => KILLED,
            (Some(c), _) => c as u32,
            (None, Some(sig)) => 128 + sig as u32,
            _ => 255,
        },
        Err(_) => 255,
    };
    // Anything but the power-off we asked for: keep the VM's last words in the log before its
    // directory goes.
    if status != KILLED {
        log::warn!(
            "pod {id}: the VM ended with status {status}\n{}",
            vm.logs_tail()
        );
    }
    drop(vm); // removes the VM's directory with the containers' images
    events
        .exited(&tx, &id, "", vmm_pid, Exit::now(status))
        .await;
}

/// OOM kills in any container, as containerd events, until the VM is gone.
async fn watch_ooms(pod: Pod, events: Events, state: Shared) {
    while let Ok(o) = pod
        .agent()
        .get_oom_event(pb::GetOomEventRequest::new())
        .await
    {
        // A kill of the init process that its exit already reported is not repeated.
        if !crate::task::oom_to_report(&state, &o.container_id, false) {
            continue;
        }
        let mut e = TaskOOM::new();
        e.container_id = o.container_id;
        events.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
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
}
