//! The pod engine: one microVM, its agent, its drives and the containers in it. `husk run`
//! and the shim both drive a pod through this module; neither talks to the VMM's control
//! socket or builds an agent request for the pod's life cycle by itself.
//!
//! A pod's VM boots with two drives: the layered drive (`/dev/vda`), which holds every image
//! layer its containers stack, each at its own byte range, added when the first container
//! that needs it is created and removed when the last one that held it is removed; and the
//! scratch drive (`/dev/vdb`), an empty sparse ext4 image made at boot, where each container
//! gets its writable upper directory. The scratch file is unlinked as soon as the VMM holds
//! it: its space goes with the VMM, however that ends. A container's layers are files (the
//! layer cache's images, or one the caller made for it alone); creating it costs the same
//! whatever the size of its image.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use husk_client::{pb, AgentClient, ClientError};
use husk_vmm_api::drives;
use oci_spec::runtime::Spec;

use crate::{
    net::{IpPrefix, NetInfo, RouteScope},
    share::{SharedDir, Volume},
    vm::{error_chain, BootError, Drive, NetDevice, Vm, VmImage, VmSize},
};

/// How long the VMM may take to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a VM template's clone may take until its agent answers (it answers in well
/// under a second where a boot takes seconds): one that does not is killed, and the pod
/// boots cold.
const CLONE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pod's VM is made of.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// The sandbox id the guest knows the pod by.
    pub id: String,
    pub hostname: String,
    pub image: VmImage,
    pub size: VmSize,
    /// The VM's run directory (sockets, logs); removed with the VM.
    pub dir: PathBuf,
    /// Where the scratch drive is made (a directory on a disk, not a tmpfs: the file is
    /// sparse and grows with what the containers write), and its size.
    pub scratch_dir: PathBuf,
    pub scratch_bytes: u64,
    /// Sysctls set in the guest's kernel (the pod's own: the VM has a kernel of its own).
    pub sysctls: std::collections::HashMap<String, String>,
    /// How long the guest may take until its agent answers.
    pub boot_timeout: Duration,
    /// The VMM's cgroup, relative to the cgroup v2 root (see [`crate::cgroup`]).
    pub cgroup: String,
    /// The pod's shared directory on the host (virtio-fs; mounted in the guest at
    /// [`husk_proto::SHARED_DIR`]), if it has one.
    pub shared_dir: Option<PathBuf>,
}

/// Why the pod engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The VMM did not start (a missing kernel, a VMM binary that does not run).
    #[error("starting the pod's microVM: {0}")]
    Start(String),
    /// The VM started and runs, but its agent never answered: the guest is stuck in its boot.
    #[error("the pod's microVM: {0}")]
    Boot(String),
    /// The VMM ended before its agent answered (killed, or the guest panicked or crashed).
    #[error("the pod's microVM: {0}")]
    Ended(String),
    /// The VMM could not restore the pod's VM from its template (the pod then boots cold:
    /// this reaches a caller only from [`Pod::start_vm`]).
    #[error("the pod's microVM: {0}")]
    TemplateRefused(String),
    /// The agent refused or failed a request; what was being done.
    #[error("{what}: {source}")]
    Agent {
        what: &'static str,
        source: ClientError,
    },
    #[error("making the pod's scratch drive {path}: {why}")]
    Scratch { path: PathBuf, why: String },
    #[error("the VMM refused the layer {image}: {reason}")]
    LayerRefused { image: PathBuf, reason: String },
    #[error("giving the VM the layer {image}: {reason}")]
    LayerUnreachable { image: PathBuf, reason: String },
    #[error("the container's OCI spec: {0}")]
    Spec(String),
    /// Its volumes could not be shared with the guest.
    #[error("sharing the container's volumes with the guest: {0}")]
    Share(String),
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
    vmm: Option<crate::vmm_process::VmmKiller>,
    dir: PathBuf,
    control: husk_vmm_api::Client,
    layers: tokio::sync::Mutex<LayerTable>,
    /// The pod's shared directory (its containers' volumes), if the VM has one.
    share: Option<Arc<SharedDir>>,
}

/// The id of the layered drive, and of the scratch drive.
pub const LAYERS_DRIVE: &str = "layers";
pub const SCRATCH_DRIVE: &str = "scratch";

/// The layers on the layered drive, and who holds them.
#[derive(Debug, Default)]
struct LayerTable {
    placed: HashMap<String, Placed>,
    /// Each container's layers (keys, bottom first).
    held: HashMap<String, Vec<String>>,
}

#[derive(Debug)]
struct Placed {
    start: u64,
    length: u64,
    refs: usize,
}

/// One read-only layer of a container: its key (one placement per key in a pod) and image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLayer {
    pub key: String,
    pub image: PathBuf,
    /// Remove the image file once the VMM holds it (a layer made for one container only).
    pub unlink: bool,
}

impl From<crate::layers::Layer> for PodLayer {
    fn from(l: crate::layers::Layer) -> Self {
        PodLayer {
            key: l.key,
            image: l.image,
            unlink: false,
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
    /// Its root filesystem's layers, bottom first.
    pub layers: &'a [PodLayer],
    /// Whether the container's init reads stdin (the agent keeps it open for a stream).
    pub stdin: bool,
    /// Host files and directories shared with it: each at `SHARED_DIR/ID/NAME` in the
    /// guest, where its spec's mounts take them from.
    pub volumes: &'a [Volume],
}

/// Makes the pod's scratch drive: a sparse ext4 image of `bytes` in `dir`, opened and
/// unlinked (the VMM inherits the open file). Its name, `ID.XXXXXX.scratch`, is made unique
/// with O_EXCL, so pods of the same id (every `husk run`, one per containerd namespace) never
/// meet on one file.
fn make_scratch(dir: &Path, id: &str, bytes: u64) -> Result<fs::File, PodError> {
    let err = |path: PathBuf, why: String| PodError::Scratch { path, why };
    fs::create_dir_all(dir).map_err(|e| {
        err(
            dir.to_path_buf(),
            format!("creating {}: {e}", dir.display()),
        )
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{id}."))
        .suffix(".scratch")
        .tempfile_in(dir)
        .map_err(|e| err(dir.join(format!("{id}.*.scratch")), e.to_string()))?;
    let path = tmp.path().to_path_buf();
    let made = (|| {
        tmp.as_file().set_len(bytes).map_err(|e| e.to_string())?;
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-L", "husk-scratch"])
            .args(["-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"])
            .arg(&path)
            .output()
            .map_err(|e| format!("running mkfs.ext4: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.ext4: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        tmp.as_file().try_clone().map_err(|e| e.to_string())
    })();
    // The name goes now (ours alone: made with O_EXCL); the open file stays.
    drop(tmp);
    made.map_err(|why| err(path, why))
}

impl Pod {
    /// Boots the VM, waits for its agent and creates the sandbox in the guest. The [`Vm`] is
    /// the VMM process: whoever holds it decides how long the VM lives (dropping it kills the
    /// VMM and removes the run directory).
    pub async fn boot(cfg: &PodConfig, net: Option<GuestNetwork>) -> Result<(Pod, Vm), PodError> {
        let scratch = make_scratch(&cfg.scratch_dir, &cfg.id, cfg.scratch_bytes)?;
        let template = Self::template(cfg, net.is_some()).await?;
        let (device, net_config) = match net {
            Some(n) => (Some(n.device), n.config),
            None => (None, None),
        };
        let (vm, agent, template) = match template {
            None => {
                let (vm, agent) =
                    Self::start_vm(cfg, None, device, &scratch, cfg.boot_timeout).await?;
                (vm, agent, None)
            }
            Some(t) => 'vm: {
                // The NIC again, for a cold boot if the clone does not answer.
                let spare = device
                    .as_ref()
                    .map(NetDevice::try_clone)
                    .transpose()
                    .map_err(|e| PodError::Start(format!("duplicating the pod's tap: {e}")))?;
                let wait = cfg.boot_timeout.min(CLONE_TIMEOUT);
                match Self::start_vm(cfg, Some(&t), device, &scratch, wait).await {
                    Ok((vm, agent)) => break 'vm (vm, agent, Some(t)),
                    Err(PodError::Boot(why)) => tracing::warn!(
                        pod = %cfg.id,
                        template = %t.id,
                        "the VM template's clone did not answer within {} s; booting cold: {why}",
                        wait.as_secs()
                    ),
                    // Damaged in a way the checks before use do not see, or not for this
                    // host's KVM: made again by the next pod.
                    Err(PodError::TemplateRefused(why)) => {
                        tracing::warn!(
                            pod = %cfg.id,
                            template = %t.id,
                            "the VMM refused the VM template; removing it and booting cold: {why}"
                        );
                        if let Some(dir) = &cfg.image.templates {
                            if let Err(e) =
                                crate::template::TemplateCache::new(dir).remove_refused(&t)
                            {
                                tracing::warn!(template = %t.id, "removing the refused VM template: {e:#}");
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
                let (vm, agent) =
                    Self::start_vm(cfg, None, spare, &scratch, cfg.boot_timeout).await?;
                (vm, agent, None)
            }
        };
        drop(scratch);
        let mut r = pb::CreateSandboxRequest::new();
        r.sandbox_id = cfg.id.clone();
        r.hostname = cfg.hostname.clone();
        r.sysctls = cfg.sysctls.clone();
        if cfg.shared_dir.is_some() {
            r.shared_fs_tag = husk_proto::SHARED_FS_TAG.into();
        }
        agent
            .create_sandbox(r)
            .await
            .map_err(PodError::agent("creating the sandbox in the guest"))?;
        if let Some(info) = &net_config {
            let mut r = network_request(info);
            // The clone's guest has the template's MAC until told the pod's.
            if let Some(mac) = template.as_ref().and_then(|t| t.mac()) {
                r.device_mac = mac.to_string();
            }
            agent
                .configure_network(r)
                .await
                .map_err(PodError::agent("configuring the guest's network"))?;
        }
        // The guest has mounted the share: its root becomes read-only to it.
        let share = vm
            .shared_dir()
            .and_then(|s| s.map(|s| s.seal().map(|()| Arc::new(s))).transpose())
            .map_err(|e| PodError::Share(format!("{e:#}")))?;
        // A guest that answers neither a request nor the health check its deadline brings is
        // lost: its VMM is
        // killed, and the pod ends as with any VMM's end (its containers exited, the sandbox
        // not ready) instead of hanging every later request.
        // Its VMM's status (each vCPU's exits and a register sample, each device's state) and
        // its console's last lines are logged first, on one line: once the VMM is gone (and
        // its directory with the console), nothing tells a hung guest kernel from a stuck
        // device or a guest too starved to answer.
        let agent = match vm.killer() {
            Some(k) => {
                let id = cfg.id.clone();
                // A VMM that is itself stopped answers nothing: 3 s, then the kill.
                let control = vm.control(Duration::from_secs(3));
                let console = vm.console().to_path_buf();
                agent.on_unresponsive(move || {
                    let status = match control.status() {
                        Ok(s) => serde_json::to_string(&s).expect("a status serializes"),
                        Err(e) => format!("no answer: {e}"),
                    };
                    let text = std::fs::read_to_string(&console).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(10)..].join(" | ");
                    tracing::error!(
                        pod = %id,
                        "the guest's agent answered neither a request nor a health check within {}s: killing its VMM, whose status was {status}; its console's last lines: {tail}",
                        2 * husk_client::RPC_DEADLINE.as_secs()
                    );
                    let _ = k.kill();
                })
            }
            None => agent,
        };
        let pod = Pod(Arc::new(Inner {
            id: cfg.id.clone(),
            agent,
            vmm_pid: vm.pid().unwrap_or_default(),
            vmm: vm.killer(),
            dir: cfg.dir.clone(),
            control: vm.control(CONTROL_TIMEOUT),
            layers: Default::default(),
            share,
        }));
        Ok((pod, vm))
    }

    /// Starts the pod's VM, restored from `template` or booted, and waits up to `wait` for
    /// its agent; a clone is then told it was restored and given its scratch drive.
    async fn start_vm(
        cfg: &PodConfig,
        template: Option<&crate::template::Template>,
        device: Option<NetDevice>,
        scratch: &fs::File,
        wait: Duration,
    ) -> Result<(Vm, AgentClient), PodError> {
        // A template's clone gets its scratch drive once restored: the template has a slot.
        let scratch_drive = match template {
            None => Drive::File {
                id: SCRATCH_DRIVE.into(),
                file: scratch.try_clone().map_err(|e| PodError::Scratch {
                    path: cfg.scratch_dir.clone(),
                    why: e.to_string(),
                })?,
                read_only: false,
            },
            Some(_) => Drive::Empty {
                id: SCRATCH_DRIVE.into(),
                read_only: false,
                max_bytes: cfg.scratch_bytes,
            },
        };
        let drives = [
            Drive::Layered {
                id: LAYERS_DRIVE.into(),
            },
            scratch_drive,
        ];
        let mut vm = Vm::start(
            &cfg.image,
            &cfg.size,
            &drives,
            device,
            &cfg.dir,
            &cfg.cgroup,
            cfg.shared_dir.as_deref(),
            template.map(|t| t.file.as_path()),
        )
        .map_err(|e| PodError::Start(format!("{e:#}")))?;
        // The VMM holds the scratch file now (or gets it below).
        drop(drives);
        let agent = vm.connect_agent(wait).await.map_err(|e| match e {
            BootError::Hung(m) => PodError::Boot(m),
            BootError::Ended(m) => PodError::Ended(m),
            BootError::TemplateRefused(m) => PodError::TemplateRefused(m),
        })?;
        if let Some(t) = template {
            let offset = agent.tell_restored().await.map_err(PodError::agent(
                "telling the template's clone it was restored",
            ))?;
            vm.control(CONTROL_TIMEOUT)
                .update_drive(SCRATCH_DRIVE, scratch)
                .map_err(|e| {
                    PodError::Start(format!(
                        "giving the clone its scratch drive: {}",
                        error_chain(&e)
                    ))
                })?;
            tracing::info!(
                pod = %cfg.id,
                template = %t.id,
                "restored from a VM template; the guest's clock was {:.1} s behind",
                offset as f64 / 1e9
            );
        }
        Ok((vm, agent))
    }

    /// The template to restore the pod's VM from (the cached one, or one made now): none when
    /// the image says to boot cold, or while another process makes it. A template that cannot
    /// be made is logged, and the pod boots cold; a template whose VMM does not start or whose
    /// guest does not boot fails the pod with that error (its own boot would fail the same
    /// way).
    async fn template(
        cfg: &PodConfig,
        net: bool,
    ) -> Result<Option<crate::template::Template>, PodError> {
        let Some(dir) = &cfg.image.templates else {
            return Ok(None);
        };
        let cache = crate::template::TemplateCache::new(dir);
        let shape = crate::template::Shape {
            net,
            fs: cfg.shared_dir.is_some(),
        };
        match cache
            .get_or_make(&cfg.image, &cfg.size, shape, &cfg.cgroup, cfg.boot_timeout)
            .await
        {
            Ok(crate::template::Got::Cached(t) | crate::template::Got::Made(t)) => Ok(Some(t)),
            Ok(crate::template::Got::Busy) => Ok(None),
            Err(crate::template::MakeError::Start(m)) => Err(PodError::Start(m)),
            Err(crate::template::MakeError::Boot(BootError::Hung(m))) => Err(PodError::Boot(m)),
            Err(crate::template::MakeError::Boot(
                BootError::Ended(m) | BootError::TemplateRefused(m),
            )) => Err(PodError::Ended(m)),
            Err(e) => {
                tracing::warn!(pod = %cfg.id, "no VM template ({e}); booting cold");
                Ok(None)
            }
        }
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

    /// SIGKILL to the VMM, through its pidfd: a VMM already gone (and reaped) is not
    /// confused with a process that took its pid.
    pub fn kill_vmm(&self) {
        if let Some(k) = &self.0.vmm {
            let _ = k.kill();
        }
    }

    /// The VM's run directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// How many layers the pod's VM holds.
    pub async fn layer_count(&self) -> usize {
        self.0.layers.lock().await.placed.len()
    }

    /// Puts `image` on the layered drive: opened here, passed to the VMM (which, jailed,
    /// could not open it).
    async fn add_layer(&self, image: &Path) -> Result<husk_vmm_api::Layer, PodError> {
        let (control, path) = (self.0.control.clone(), image.to_path_buf());
        let done = tokio::task::spawn_blocking(move || {
            let file = fs::File::open(&path).map_err(|e| {
                husk_vmm_api::ClientError::Refused(format!("opening {}: {e}", path.display()))
            })?;
            control.add_layer(LAYERS_DRIVE, &file)
        })
        .await
        .map_err(|e| PodError::LayerUnreachable {
            image: image.to_path_buf(),
            reason: e.to_string(),
        })?;
        done.map_err(|e| match e {
            husk_vmm_api::ClientError::Refused(reason) => PodError::LayerRefused {
                image: image.to_path_buf(),
                reason,
            },
            e => PodError::LayerUnreachable {
                image: image.to_path_buf(),
                reason: error_chain(&e),
            },
        })
    }

    /// Gives back `keys` (one reference each); a layer no container holds any more leaves
    /// the VM. Best effort: a VM that is gone has nothing to remove.
    async fn release_layers(&self, t: &mut LayerTable, keys: &[String]) {
        for key in keys {
            let Some(p) = t.placed.get_mut(key) else {
                continue;
            };
            p.refs -= 1;
            if p.refs > 0 {
                continue;
            }
            let p = t.placed.remove(key).expect("just seen");
            let control = self.0.control.clone();
            let r =
                tokio::task::spawn_blocking(move || control.remove_layer(LAYERS_DRIVE, p.start))
                    .await;
            if let Ok(Err(e)) | Err(e) = r
                .map_err(|e| e.to_string())
                .map(|r| r.map_err(|e| error_chain(&e)))
            {
                tracing::debug!("removing layer {key} from the VM: {e}");
            }
        }
    }

    /// Places the layers the container needs on the layered drive (those the pod has are
    /// shared) and creates the container in the guest on them; the pid of its init process
    /// (not started yet). On failure the guest holds nothing of the container and the
    /// layers it took are given back.
    pub async fn create_container(&self, c: &NewContainer<'_>) -> Result<u32, PodError> {
        if !c.volumes.is_empty() {
            let Some(share) = self.0.share.clone() else {
                return Err(PodError::Share(
                    "the pod's VM has no shared directory".into(),
                ));
            };
            let (id, volumes) = (c.id.to_string(), c.volumes.to_vec());
            tokio::task::spawn_blocking(move || share.add(&id, &volumes))
                .await
                .map_err(|e| PodError::Share(e.to_string()))?
                .map_err(|e| PodError::Share(format!("{e:#}")))?;
        }
        let created = self.create_on_layers(c).await;
        if created.is_err() {
            self.unshare_volumes(c.id).await;
        }
        created
    }

    /// Unmounts container `id`'s volumes from the share.
    async fn unshare_volumes(&self, id: &str) {
        if let Some(share) = self.0.share.clone() {
            let id = id.to_string();
            let _ = tokio::task::spawn_blocking(move || share.remove(&id)).await;
        }
    }

    async fn create_on_layers(&self, c: &NewContainer<'_>) -> Result<u32, PodError> {
        let mut specs = Vec::with_capacity(c.layers.len());
        {
            let mut t = self.0.layers.lock().await;
            let mut taken: Vec<String> = Vec::new();
            for l in c.layers {
                let placed = match t.placed.get_mut(&l.key) {
                    Some(p) => {
                        p.refs += 1;
                        (p.start, p.length)
                    }
                    None => match self.add_layer(&l.image).await {
                        Ok(at) => {
                            t.placed.insert(
                                l.key.clone(),
                                Placed {
                                    start: at.start,
                                    length: at.length,
                                    refs: 1,
                                },
                            );
                            (at.start, at.length)
                        }
                        Err(e) => {
                            self.release_layers(&mut t, &taken).await;
                            return Err(e);
                        }
                    },
                };
                if l.unlink {
                    let _ = fs::remove_file(&l.image);
                }
                taken.push(l.key.clone());
                let mut spec = pb::Layer::new();
                spec.key = l.key.clone();
                spec.start = placed.0;
                spec.length = placed.1;
                spec.fstype = "ext4".into();
                specs.push(spec);
            }
            t.held.insert(c.id.to_string(), taken);
        }
        let created = async {
            let mut r = pb::CreateContainerRequest::new();
            r.container_id = c.id.to_string();
            r.oci_spec_json =
                serde_json::to_vec(c.spec).map_err(|e| PodError::Spec(e.to_string()))?;
            r.stdin = c.stdin;
            let mut layered = pb::LayeredRootfs::new();
            layered.device = drives::guest_device(0);
            layered.scratch = drives::guest_device(1);
            layered.layers = specs;
            let mut root = pb::Rootfs::new();
            root.set_layered(layered);
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
            self.drop_layers_of(c.id).await;
        }
        created
    }

    /// Gives back the layers container `id` held.
    async fn drop_layers_of(&self, id: &str) {
        let mut t = self.0.layers.lock().await;
        if let Some(keys) = t.held.remove(id) {
            self.release_layers(&mut t, &keys).await;
        }
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

    /// Removes container `id` from the guest, then gives back its layers (those no other
    /// container holds leave the VM). The guest's refusal is returned after that.
    pub async fn remove_container(&self, id: &str) -> Result<(), PodError> {
        let removed = self.forget_container(id).await;
        self.drop_layers_of(id).await;
        self.unshare_volumes(id).await;
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

    /// Two pods of one id (two `husk run`s at once) each get a scratch drive of their own,
    /// and no name is left in the directory.
    #[test]
    fn scratch_drives_of_one_id_never_meet() {
        let dir = tempfile::tempdir().unwrap();
        let made: Vec<fs::File> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| make_scratch(dir.path(), "husk-run", 16 << 20)))
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap().unwrap())
                .collect()
        });
        let inodes: std::collections::BTreeSet<u64> = made
            .iter()
            .map(|f| std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap()))
            .collect();
        assert_eq!(inodes.len(), 4, "each pod its own file");
        for f in &made {
            assert_eq!(f.metadata().unwrap().len(), 16 << 20);
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "names left");
    }
}
