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
    net::{PodNetwork, PortForward},
    pod::{GuestNetwork, Pod, PodConfig, PodError},
    podinfo::PodInfo,
    vm::{describe_exit, error_chain, image_from, NetDevice, Vm, VmSize},
};
use husk_client::pb;
use husk_vmm_api::MacAddr;
use tokio::sync::watch;

use crate::{
    error::{Result, ShimError},
    events::{Events, Exit, ExitRx, ExitTx},
    service::Shared,
};

/// How long the guest may take to answer (nested virtualization is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The status of a sandbox task whose VM was powered off because we asked (the pause task
/// was killed): 128 + SIGKILL, as runc reports a killed pause process.
const KILLED: u32 = 128 + libc::SIGKILL as u32;

/// The pod's tap, in the pod's network namespace beside its CNI interface.
pub const TAP_NAME: &str = "husk-tap0";

/// Whether the OCI spec `spec` is a pod's sandbox task (what CRI marks so, or a task CRI did
/// not make) rather than one of its containers.
pub fn is_sandbox(spec: &serde_json::Value) -> bool {
    spec["annotations"]["io.kubernetes.cri.container-type"]
        .as_str()
        .is_none_or(|k| k == "sandbox")
}

/// The network namespace CNI set up for the pod (the path of the sandbox spec's network
/// namespace), None for a pod without one (not a CRI pod: its VM has no NIC). A pod without a
/// network namespace of its own (hostNetwork) cannot be a VM: refused.
pub fn pod_netns(spec: &serde_json::Value) -> Result<Option<PathBuf>> {
    let host = || {
        ShimError::InvalidArgument(
            "a husk pod cannot use the host's network (hostNetwork): a VM cannot share the host's network namespace; run it with runc".into(),
        )
    };
    let namespaces = spec["linux"]["namespaces"].as_array();
    let Some(ns) = namespaces
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network")
    else {
        return Err(host());
    };
    let Some(path) = ns["path"].as_str().filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    match husk::net::is_host_netns(&path) {
        Ok(true) => Err(host()),
        Ok(false) => Ok(Some(path)),
        Err(e) => Err(ShimError::InvalidArgument(format!(
            "the pod's network namespace {}: {e}",
            path.display()
        ))),
    }
}

/// Wires the pod's network namespace to a tap for its VM (see `husk::net`).
async fn wire_network(netns: PathBuf) -> Result<(PodNetwork, GuestNetwork)> {
    let (net, info, fd) = tokio::task::spawn_blocking(move || PodNetwork::setup(&netns, TAP_NAME))
        .await
        .map_err(|e| ShimError::Internal(e.to_string()))?
        .map_err(|e| {
            ShimError::FailedPrecondition(format!("the pod's network: {}", error_chain(&e)))
        })?;
    let device = NetDevice::Fd {
        fd,
        mac: MacAddr(info.mac.0),
        mtu: info.mtu.min(u16::MAX as u32) as u16,
    };
    Ok((
        net,
        GuestNetwork {
            device,
            config: Some(info),
        },
    ))
}

/// How many times a pod's VM is booted before a boot that hangs fails the pod.
const BOOT_ATTEMPTS: u32 = 2;

/// Wires the pod's network (if it has a network namespace) and boots its VM. A boot that
/// hangs (the VMM runs, the agent never answers: seen now and then in the nested testbed,
/// cause not yet known) is logged with what the VMM and the guest console said, taken apart
/// and tried once more from the start, as a kubelet would retry the pod; any other failure
/// fails the pod at once. Nothing of a failed attempt is left.
async fn boot_pod(
    cfg: &PodConfig,
    netns: Option<PathBuf>,
) -> Result<(Pod, Vm, Option<PodNetwork>)> {
    let t0 = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (network, guest) = match netns.clone() {
            Some(netns) => {
                let (n, g) = wire_network(netns).await?;
                log::info!(
                    "pod {}: network wired in {} ms: {}",
                    cfg.id,
                    t0.elapsed().as_millis(),
                    g.config
                        .as_ref()
                        .map(|i| serde_json::to_string(i).unwrap_or_default())
                        .unwrap_or_default()
                );
                (Some(n), Some(g))
            }
            None => (None, None),
        };
        match Pod::boot(cfg, guest).await {
            Ok((pod, vm)) => return Ok((pod, vm, network)),
            Err(e) => {
                if let Some(n) = network {
                    unwire_network(n).await;
                }
                match e {
                    PodError::Boot(why) if attempt < BOOT_ATTEMPTS => log::warn!(
                        "pod {}: boot attempt {attempt} hung, booting the VM again: {why}",
                        cfg.id
                    ),
                    e => return Err(e.into()),
                }
            }
        }
    }
}

/// Listens for port forwarding in the pod's network namespace (see `husk::net::PortForward`).
/// A pod whose forwarding cannot be set up (no iptables) runs without it, with a warning.
async fn listen_for_forwards(netns: Option<PathBuf>) -> Option<PortForward> {
    let netns = netns?;
    let path = netns.clone();
    match tokio::task::spawn_blocking(move || PortForward::setup(&path)).await {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            log::warn!("the pod runs without port forwarding: {}", error_chain(&e));
            None
        }
        Err(e) => {
            log::warn!("the pod runs without port forwarding: {e}");
            None
        }
    }
}

/// Takes the tc filters, qdiscs and tap of the pod's network away (the tap goes with the
/// VMM's fd anyway).
async fn unwire_network(net: PodNetwork) {
    let r = tokio::task::spawn_blocking(move || net.teardown()).await;
    match r {
        Ok(Err(e)) => log::warn!("taking the pod's network apart: {}", error_chain(&e)),
        Err(e) => log::warn!("taking the pod's network apart: {e}"),
        Ok(Ok(())) => {}
    }
}

/// The VMM's cgroup: the sandbox's cgroup path (where runc would put the pause process, in
/// the pod's cgroup), else `/husk/NS/ID`.
pub fn vmm_cgroup(spec: &serde_json::Value, ns: &str, id: &str) -> String {
    match spec["linux"]["cgroupsPath"].as_str() {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => format!("/husk/{ns}/{id}"),
    }
}

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
    /// What `pod.json` in `dir` says of the pod (see [`PodInfo`]).
    pub info: PodInfo,
    pub dir: PathBuf,
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
            image: image_from(cfg.clone()),
            size,
            dir: pod_dir(events.namespace(), &req.id),
            scratch_dir: cfg.scratch_dir(),
            scratch_bytes: u64::from(cfg.pod.scratch_gib) << 30,
            sysctls: pod_sysctls(spec)?,
            boot_timeout: BOOT_TIMEOUT,
            cgroup: vmm_cgroup(spec, events.namespace(), &req.id),
            // Its volumes, shared live with the guest (virtio-fs).
            shared_dir: Some(pod_dir(events.namespace(), &req.id).join("shared")),
        };
        let netns = pod_netns(spec)?;
        let t0 = std::time::Instant::now();
        // Port forwarding's listener is made while the VM boots.
        let (booted, forward) =
            tokio::join!(boot_pod(&cfg, netns.clone()), listen_for_forwards(netns));
        let (pod, vm, network) = booted?;
        log::info!(
            vmm_pid = vm.pid().unwrap_or(0),
            console:% = vm.console().display();
            "pod {}: the VM is up; its guest console (kernel and agent log) is {}",
            cfg.id,
            vm.console().display()
        );
        let forwarding = forward.map(|f| {
            let agent = pod.clone();
            tokio::spawn(f.serve(move |port| {
                let pod = agent.clone();
                async move { pod.agent().open_forward(port).await }
            }))
            .abort_handle()
        });
        let annotation = |k: &str| {
            spec["annotations"][k]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let info = PodInfo {
            sandbox_id: req.id.clone(),
            containerd_namespace: events.namespace().to_string(),
            name: annotation("io.kubernetes.cri.sandbox-name"),
            namespace: annotation("io.kubernetes.cri.sandbox-namespace"),
            shim_pid: std::process::id(),
            vmm_pid: pod.vmm_pid(),
            api_socket: Vm::api_path(pod.dir()),
            vsock_socket: Vm::vsock_path(pod.dir()),
            vcpus: cfg.size.vcpus,
            memory_mib: cfg.size.mem_mib,
            boot_ms: t0.elapsed().as_millis() as u64,
            containers: Vec::new(),
        };
        if let Err(e) = info.write(&cfg.dir) {
            log::warn!("writing the pod's {}: {e}", husk::podinfo::FILE);
        }
        let (tx, exit) = watch::channel(None);
        let watch = watch_vm(
            vm,
            network,
            forwarding,
            events.clone(),
            tx,
            req.id.clone(),
            pod.vmm_pid(),
        );
        tokio::spawn(watch);
        tokio::spawn(watch_ooms(pod.clone(), events.clone(), state.clone()));
        Ok(Sandbox {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            pod,
            started: false,
            exit,
            info,
            dir: cfg.dir.clone(),
        })
    }

    /// `pod.json` again, with the pod's containers now `containers`.
    pub fn containers_changed<'a>(&mut self, containers: impl Iterator<Item = &'a String>) {
        let mut ids: Vec<String> = containers.cloned().collect();
        ids.sort();
        self.info.containers = ids;
        if let Err(e) = self.info.write(&self.dir) {
            log::warn!("writing the pod's {}: {e}", husk::podinfo::FILE);
        }
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

/// The sysctls CRI put on the sandbox's spec (the pod's security context): the guest sets
/// them in its kernel.
fn pod_sysctls(spec: &serde_json::Value) -> Result<std::collections::HashMap<String, String>> {
    let Some(map) = spec["linux"]["sysctl"].as_object() else {
        return Ok(Default::default());
    };
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(v) => Ok((k.clone(), v.to_string())),
            None => Err(ShimError::InvalidArgument(format!(
                "linux.sysctl.{k}: {v} is not a string"
            ))),
        })
        .collect()
}

/// Powers the pod's guest off; if it does not answer, the VMM goes.
pub async fn kill(pod: &Pod) {
    if !pod.power_off(Duration::from_secs(10)).await {
        pod.kill_vmm();
    }
}

/// Waits for the VM to end and reports that as the sandbox task's exit.
async fn watch_vm(
    mut vm: Vm,
    network: Option<PodNetwork>,
    forwarding: Option<tokio::task::AbortHandle>,
    events: Events,
    tx: ExitTx,
    id: String,
    vmm_pid: u32,
) {
    let (status, how) = match vm.wait().await {
        Ok(s) => (
            match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                // A guest that powered off because we asked.
                (Some(0), _) => KILLED,
                (Some(c), _) => c as u32,
                (None, Some(sig)) => 128 + sig as u32,
                _ => 255,
            },
            describe_exit(&s),
        ),
        Err(e) => (255, format!("could not be waited for: {e:#}")),
    };
    // Anything but the power-off we asked for: keep the VM's last words in the log before its
    // directory goes.
    if status != KILLED {
        log::warn!(
            "pod {id}: the VMM {how}; the sandbox task exits with status {status}\n{}",
            vm.logs_tail()
        );
    }
    if let Some(f) = forwarding {
        f.abort();
    }
    drop(vm); // removes the VM's directory
    if let Some(n) = network {
        unwire_network(n).await;
    }
    collect_layers().await;
    events
        .exited(&tx, &id, "", vmm_pid, Exit::now(status))
        .await;
}

/// Removes the layer cache's entries whose snapshot containerd removed (a pod's end is
/// when a node's images may have gone; `husk gc` does the same by hand).
async fn collect_layers() {
    let Ok(cfg) = Config::load() else { return };
    let cache = cfg.layer_cache();
    match tokio::task::spawn_blocking(move || cache.gc(false)).await {
        Ok(Ok(r)) if r.removed > 0 => log::info!(
            "layer cache: {} entries removed ({} MiB), {} kept",
            r.removed,
            r.bytes_freed >> 20,
            r.kept
        ),
        Ok(Err(e)) => log::warn!("layer cache: {e}"),
        _ => {}
    }
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
        log::info!(container = o.container_id.as_str(); "an OOM kill in container {}", o.container_id);
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
            scratch_gib: 10,
            templates: true,
        };
        let s = vm_size(&serde_json::json!({}), &d);
        assert_eq!((s.vcpus, s.mem_mib), (2, 1024));
        let s = vm_size(&a, &d);
        assert_eq!((s.vcpus, s.mem_mib), (2, 612));
    }

    #[test]
    fn the_pods_network_namespace_from_its_spec() {
        let with = |ns: serde_json::Value| serde_json::json!({"linux": {"namespaces": ns}});
        // No network namespace of its own: hostNetwork, refused.
        for spec in [
            serde_json::json!({}),
            with(serde_json::json!([{"type": "pid"}, {"type": "ipc"}])),
        ] {
            let e = pod_netns(&spec).unwrap_err();
            assert!(
                e.to_string()
                    .contains("cannot share the host's network namespace"),
                "{e}"
            );
        }
        // A new namespace (not a CRI pod): no NIC.
        assert_eq!(
            pod_netns(&with(serde_json::json!([{"type": "network"}]))).unwrap(),
            None
        );
        // The host's own namespace by path: refused too.
        let e = pod_netns(&with(
            serde_json::json!([{"type": "network", "path": "/proc/self/ns/net"}]),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("hostNetwork"), "{e}");
        // A path that is not there.
        let e = pod_netns(&with(
            serde_json::json!([{"type": "network", "path": "/nonexistent/ns"}]),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ns"), "{e}");
        // A namespace of its own: a thread's, made for the test (needs root).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace)"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            tx.send(nix::unistd::gettid()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let path = format!("/proc/self/task/{tid}/ns/net");
        let p = pod_netns(&with(
            serde_json::json!([{"type": "network", "path": path}]),
        ));
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(p.unwrap(), Some(PathBuf::from(path)));
    }
}
