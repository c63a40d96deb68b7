//! The pod engine: one microVM, its agent, its drive slots and the containers in it. `husk
//! run` and the shim both drive a pod through this module; neither talks to the VMM's control
//! socket or builds an agent request for the pod's life cycle by itself.
//!
//! A pod's VM boots with `slots` empty drives (`slot0`.. = `/dev/vda`..). A container's root
//! filesystem is a block image the caller prepares; [`Pod::create_container`] puts it into
//! the slot [`Pod::reserve_slot`] gave out and creates the container in the guest on it, and
//! [`Pod::remove_container`] takes it out again.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use husk_client::{pb, AgentClient, ClientError};
use husk_vmm_api::drives;
use oci_spec::runtime::Spec;

use crate::{
    net::{IpPrefix, NetInfo, RouteScope},
    vm::{error_chain, Drive, NetDevice, Vm, VmImage, VmSize},
};

/// How long the VMM may take to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What a pod's VM is made of.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// The sandbox id the guest knows the pod by.
    pub id: String,
    pub hostname: String,
    pub image: VmImage,
    pub size: VmSize,
    /// The VM's run directory (sockets, logs, the containers' images); removed with the VM.
    pub dir: PathBuf,
    /// Empty drive slots: how many containers the pod can hold at once.
    pub slots: usize,
    /// How long the guest may take until its agent answers.
    pub boot_timeout: Duration,
}

/// Why the pod engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The VMM did not start (a missing kernel, a VMM binary that does not run).
    #[error("starting the pod's microVM: {0}")]
    Start(String),
    /// The VM started but its agent never answered (or the VM died first).
    #[error("the pod's microVM: {0}")]
    Boot(String),
    /// The agent refused or failed a request; what was being done.
    #[error("{what}: {source}")]
    Agent {
        what: &'static str,
        source: ClientError,
    },
    #[error("the pod's microVM has no free drive slot ({0} containers at once)")]
    NoFreeSlot(usize),
    #[error("the VMM refused to update drive {slot}: {reason}")]
    DriveRefused { slot: String, reason: String },
    #[error("updating drive {slot} of the VM: {reason}")]
    DriveUnreachable { slot: String, reason: String },
    #[error("the container's OCI spec: {0}")]
    Spec(String),
}

impl PodError {
    fn agent(what: &'static str) -> impl FnOnce(ClientError) -> PodError {
        move |source| PodError::Agent { what, source }
    }
}

/// A booted pod: cheap to clone, every clone drives the same VM.
#[derive(Debug, Clone)]
pub struct Pod(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    id: String,
    agent: AgentClient,
    vmm_pid: u32,
    dir: PathBuf,
    control: husk_vmm_api::Client,
    slots: SlotTable,
}

/// Which container holds each drive slot.
#[derive(Debug)]
struct SlotTable(Mutex<Vec<Option<String>>>);

impl SlotTable {
    fn new(n: usize) -> Self {
        Self(Mutex::new(vec![None; n]))
    }

    fn reserve(&self, id: &str) -> Result<usize, PodError> {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.len();
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PodError::NoFreeSlot(n))?;
        slots[slot] = Some(id.to_string());
        Ok(slot)
    }

    fn release(&self, slot: usize) {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(slot) {
            *s = None;
        }
    }
}

/// The pod's network as its VM gets it: the NIC, and what the guest configures on it (the
/// MAC, MTU, addresses and routes of the pod's interface on the host).
#[derive(Debug)]
pub struct GuestNetwork {
    pub device: NetDevice,
    pub config: Option<NetInfo>,
}

/// The agent request that gives the guest the network `info` describes.
pub fn network_request(info: &NetInfo) -> pb::ConfigureNetworkRequest {
    let prefix = |p: &IpPrefix| {
        let mut q = pb::IpPrefix::new();
        q.address = p.address.to_string();
        q.prefix_len = p.prefix_len.into();
        q
    };
    let mut r = pb::ConfigureNetworkRequest::new();
    r.mac = info.mac.to_string();
    r.mtu = info.mtu;
    r.addresses = info.addresses.iter().map(prefix).collect();
    r.routes = info
        .routes
        .iter()
        .map(|rt| {
            let mut q = pb::Route::new();
            q.destination = Some(prefix(&rt.destination)).into();
            q.gateway = rt.gateway.map(|g| g.to_string()).unwrap_or_default();
            q.source = rt.source.map(|g| g.to_string()).unwrap_or_default();
            q.metric = rt.metric.unwrap_or(0);
            q.mtu = rt.mtu.unwrap_or(0);
            q.scope = match rt.scope {
                RouteScope::Link => "link",
                RouteScope::Host => "host",
                RouteScope::Site => "site",
                _ => "universe",
            }
            .into();
            q
        })
        .collect();
    r
}

/// A container to create in a pod.
#[derive(Debug)]
pub struct NewContainer<'a> {
    pub id: &'a str,
    /// The guest's view of the container (its paths are inside the VM).
    pub spec: &'a Spec,
    /// The block image with the container's root filesystem (ext4).
    pub image: &'a Path,
    /// The slot [`Pod::reserve_slot`] gave out for it.
    pub slot: usize,
    /// Whether the container's init reads stdin (the agent keeps it open for a stream).
    pub stdin: bool,
}

impl Pod {
    /// Boots the VM, waits for its agent and creates the sandbox in the guest. The [`Vm`] is
    /// the VMM process: whoever holds it decides how long the VM lives (dropping it kills the
    /// VMM and removes the run directory).
    pub async fn boot(cfg: &PodConfig, net: Option<GuestNetwork>) -> Result<(Pod, Vm), PodError> {
        let empty: Vec<Drive> = (0..cfg.slots)
            .map(|i| Drive {
                id: drives::slot_id(i),
                path: PathBuf::new(),
                read_only: false,
            })
            .collect();
        let (device, net_config) = match net {
            Some(n) => (Some(n.device), n.config),
            None => (None, None),
        };
        let mut vm = Vm::start(&cfg.image, &cfg.size, &empty, device, &cfg.dir)
            .map_err(|e| PodError::Start(format!("{e:#}")))?;
        let agent = vm
            .connect_agent(cfg.boot_timeout)
            .await
            .map_err(|e| PodError::Boot(format!("{e:#}")))?;
        let mut r = pb::CreateSandboxRequest::new();
        r.sandbox_id = cfg.id.clone();
        r.hostname = cfg.hostname.clone();
        agent
            .create_sandbox(r)
            .await
            .map_err(PodError::agent("creating the sandbox in the guest"))?;
        if let Some(info) = &net_config {
            agent
                .configure_network(network_request(info))
                .await
                .map_err(PodError::agent("configuring the guest's network"))?;
        }
        let pod = Pod(Arc::new(Inner {
            id: cfg.id.clone(),
            agent,
            vmm_pid: vm.pid().unwrap_or_default(),
            dir: cfg.dir.clone(),
            control: vm.control(CONTROL_TIMEOUT),
            slots: SlotTable::new(cfg.slots),
        }));
        Ok((pod, vm))
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The pod's agent, for the requests the engine does not wrap (processes, stdio, stats).
    pub fn agent(&self) -> &AgentClient {
        &self.0.agent
    }

    /// The VMM's process id (0 if it was gone by the time the pod was booted).
    pub fn vmm_pid(&self) -> u32 {
        self.0.vmm_pid
    }

    /// The VM's run directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Reserves a free drive slot for container `id`.
    pub fn reserve_slot(&self, id: &str) -> Result<usize, PodError> {
        self.0.slots.reserve(id)
    }

    /// Frees drive slot `slot` (it must be empty in the VM: see [`Pod::eject`]).
    pub fn release_slot(&self, slot: usize) {
        self.0.slots.release(slot)
    }

    /// Gives drive slot `slot` the backing file `image` (empty: none).
    async fn update_drive(&self, slot: usize, image: &Path) -> Result<(), PodError> {
        let slot = drives::slot_id(slot);
        let (control, id, image) = (self.0.control.clone(), slot.clone(), image.to_path_buf());
        let done = tokio::task::spawn_blocking(move || control.update_drive(&id, &image))
            .await
            .map_err(|e| PodError::DriveUnreachable {
                slot: slot.clone(),
                reason: e.to_string(),
            })?;
        done.map_err(|e| match e {
            husk_vmm_api::ClientError::Refused(reason) => PodError::DriveRefused { slot, reason },
            e => PodError::DriveUnreachable {
                slot,
                reason: error_chain(&e),
            },
        })
    }

    /// Empties drive slot `slot` in the VM (the guest sees a disk of size 0). Best effort: a
    /// VM that is gone has nothing to empty.
    pub async fn eject(&self, slot: usize) {
        if let Err(e) = self.update_drive(slot, Path::new("")).await {
            tracing::debug!("emptying drive slot {slot}: {e}");
        }
    }

    /// Puts the container's image into its slot and creates the container in the guest on
    /// it; the pid of its init process (not started yet). On failure the slot is empty again
    /// (but still reserved) and the guest holds nothing of the container.
    pub async fn create_container(&self, c: &NewContainer<'_>) -> Result<u32, PodError> {
        self.update_drive(c.slot, c.image).await?;
        let created = async {
            let mut r = pb::CreateContainerRequest::new();
            r.container_id = c.id.to_string();
            r.oci_spec_json =
                serde_json::to_vec(c.spec).map_err(|e| PodError::Spec(e.to_string()))?;
            r.stdin = c.stdin;
            let mut bd = pb::BlockDevice::new();
            bd.source = drives::guest_device(c.slot);
            bd.fstype = "ext4".into();
            let mut root = pb::Rootfs::new();
            root.set_block(bd);
            r.rootfs = Some(root).into();
            let resp = self
                .agent()
                .create_container(r)
                .await
                .map_err(PodError::agent("creating the container in the guest"))?;
            Ok(resp.pid)
        }
        .await;
        if created.is_err() {
            let _ = self.forget_container(c.id).await;
            self.eject(c.slot).await;
        }
        created
    }

    /// Removes container `id` from the guest (one it never had is fine).
    async fn forget_container(&self, id: &str) -> Result<(), ClientError> {
        let mut r = pb::RemoveContainerRequest::new();
        r.container_id = id.to_string();
        match self.agent().remove_container(r).await {
            Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes container `id` from the guest and empties its drive slot, which stays reserved
    /// until [`Pod::release_slot`]. The guest's refusal is returned after the slot was
    /// emptied.
    pub async fn remove_container(&self, id: &str, slot: usize) -> Result<(), PodError> {
        let removed = self.forget_container(id).await;
        self.eject(slot).await;
        removed.map_err(PodError::agent("removing the container in the guest"))
    }

    /// Asks the guest to power off (its containers are killed); whether it said yes within
    /// `timeout`. The VMM exits once the guest is off.
    pub async fn power_off(&self, timeout: Duration) -> bool {
        let mut r = pb::DestroySandboxRequest::new();
        r.sandbox_id = self.0.id.clone();
        matches!(
            tokio::time::timeout(timeout, self.agent().destroy_sandbox(r)).await,
            Ok(Ok(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_handed_out_once_and_reused_after_release() {
        let t = SlotTable::new(2);
        assert_eq!(t.reserve("a").unwrap(), 0);
        assert_eq!(t.reserve("b").unwrap(), 1);
        let e = t.reserve("c").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pod's microVM has no free drive slot (2 containers at once)"
        );
        t.release(0);
        assert_eq!(t.reserve("c").unwrap(), 0);
        t.release(7); // out of range: nothing to free
        assert_eq!(t.reserve("d").unwrap_err().to_string(), e.to_string());
    }
}
