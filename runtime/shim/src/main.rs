//! `containerd-shim-husk-v2`: containerd's task API v2 for husk. One shim process and one
//! microVM per pod: containerd starts a shim for the pod's sandbox (pause) task, and every
//! later task of the pod (grouped by the `io.kubernetes.cri.sandbox-id` annotation) reuses it.
//!
//! The sandbox task stands for the VM: `Create` boots it and connects to the agent, `Kill`
//! powers it off, and its exit is the VMM's. A VMM that dies on its own (crash, SIGKILL) is
//! reported as the sandbox task's exit.

mod error;
mod events;
mod metrics;
mod rootfs;
mod sandbox;
mod service;
mod stdio;
mod task;

use containerd_shim::{
    asynchronous::{publisher::RemotePublisher, run, spawn, ExitSignal, Shim},
    protos::shim::shim::DeleteResponse,
    Config, Flags, StartOpts,
};
use std::sync::Arc;

pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

struct HuskShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

/// The pod a task belongs to: the sandbox id annotation of its bundle, or its own id (the
/// sandbox task itself, or a task started outside of CRI).
fn grouping(id: &str) -> String {
    std::fs::read("config.json")
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["annotations"]["io.kubernetes.cri.sandbox-id"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| id.to_string())
}

#[async_trait::async_trait]
impl Shim for HuskShim {
    type T = service::TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HuskShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let group = grouping(&opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd runs this (in the task's bundle) after a shim died. Its VMM died with it
        // (PR_SET_PDEATHSIG); what may be left is the pod's run directory (sockets, container
        // images) and a container rootfs the shim had mounted while packing it.
        log::info!("delete_shim {} in {}", self.id, self.namespace);
        rootfs::unmount(std::path::Path::new("rootfs"));
        // A sandbox task's pod network: the tc filters and qdiscs stay when the shim dies
        // (the tap went with the VMM).
        let spec = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(spec) = spec.as_ref().filter(|s| sandbox::is_sandbox(s)) {
            // The VMM's cgroup, once its VMM (killed with the shim) is gone.
            let cgroup = sandbox::vmm_cgroup(spec, &self.namespace, &self.id);
            let r = tokio::task::spawn_blocking(move || husk::cgroup::remove(&cgroup)).await;
            if let Ok(Err(e)) = r {
                log::warn!("removing the VMM's cgroup: {e:#}");
            }
            // Its user's lease, once nobody holds it (the shim's and the VMM's descriptors
            // went with them; the file stays until swept).
            let _ = tokio::task::spawn_blocking(husk::uid_lease::sweep).await;
        }
        if let Some(spec) = spec {
            if let (true, Ok(Some(netns))) = (sandbox::is_sandbox(&spec), sandbox::pod_netns(&spec))
            {
                let r = tokio::task::spawn_blocking(move || {
                    husk::net::teardown(&netns, sandbox::TAP_NAME)
                })
                .await;
                if let Ok(Err(e)) = r {
                    log::warn!("taking the pod's network apart: {e}");
                }
            }
        }
        let dir = sandbox::pod_dir(&self.namespace, &self.id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("removing {}: {e}", dir.display());
            }
        }
        let mut r = DeleteResponse::new();
        r.exit_status = 128 + libc::SIGKILL as u32;
        r.exited_at = Some(events::now()).into();
        Ok(r)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::TaskService::new(self.namespace.clone(), self.exit.clone(), publisher)
    }
}

#[tokio::main]
async fn main() {
    // Every child of the shim (the VMM, mkfs.ext4, debugfs) is waited for by whoever started
    // it: the crate's reaper (waitpid(-1) on SIGCHLD) would take their exit statuses away
    // (ECHILD). It has to be off from the start: the crate installs it before Shim::new. No
    // subreaper either: nothing of ours leaves orphans to collect.
    let config = Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    run::<HuskShim>(RUNTIME_ID, Some(config)).await;
}
