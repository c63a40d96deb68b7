//! `husk run`: one container in a fresh microVM, from a rootfs directory or an OCI image
//! layout, with its stdio streamed and its exit status returned as husk's own.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use husk_client::pb;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Spec,
};

use husk::{
    image,
    net::{IpPrefix, NetInfo, Route, RouteScope},
    pod::{GuestNetwork, NewContainer, Pod, PodConfig, PodLayer},
    vm::{check_kvm, image_from, NetDevice, VmSize},
};

use crate::agent_cmd::{attach, terminal_size, AttachOpts};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A rootfs directory, or an OCI image layout (directory or tarball).
    pub image: PathBuf,
    /// The command (default: the image's entrypoint and cmd).
    #[arg(trailing_var_arg = true)]
    pub command: Vec<String>,
    /// Give the container a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Keep stdin open and stream it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// vCPUs of the microVM.
    #[arg(long, default_value = "1")]
    pub cpus: u8,
    /// Memory of the microVM in MiB.
    #[arg(long, default_value = "256")]
    pub memory: u32,
    /// Memory limit of the container in MiB (cgroup memory.max).
    #[arg(long)]
    pub container_memory: Option<u64>,
    /// CPU limit of the container in cores, e.g. 0.5 (cgroup cpu.max).
    #[arg(long)]
    pub container_cpus: Option<f64>,
    /// Environment variables KEY=VALUE for the container.
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Guest kernel (default: guest.kernel of /etc/husk/config.toml, else
    /// $HUSK_CACHE/current/vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: guest.initramfs of /etc/husk/config.toml, else
    /// $HUSK_CACHE/current/initramfs.cpio.gz).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// The VMM binary (default: husk-vmm next to husk).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// How long to wait for the guest agent (nested virtualization is slow).
    #[arg(long, default_value = "60")]
    pub boot_timeout: u64,
    /// Print boot timings to stderr.
    #[arg(long)]
    pub timings: bool,
    /// Boot the guest's kernel, not a VM template's clone (where `[pod] templates` is on, as
    /// by default; see the README's "VM templates").
    #[arg(long)]
    pub no_template: bool,
    /// Extra guest kernel command line, e.g. "loglevel=7" to see the kernel boot.
    #[arg(long, default_value = "")]
    pub kernel_args: String,
    /// Keep the guest's serial console in this file (default: discarded with the VM).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Give the VM a network interface on an existing tap device: tap:NAME.
    #[arg(long)]
    pub net: Option<String>,
    /// The guest's address on --net, ADDR/PREFIX (e.g. 10.0.0.2/24).
    #[arg(long, requires = "net")]
    pub ip: Option<IpPrefix>,
    /// The guest's default gateway on --net.
    #[arg(long, requires = "ip")]
    pub gateway: Option<std::net::IpAddr>,
    /// The MTU of the guest's interface on --net.
    #[arg(long, requires = "net", default_value = "1500")]
    pub mtu: u16,
}

/// Runs the container; returns its exit status.
pub async fn run(a: RunArgs) -> Result<i32> {
    let t0 = Instant::now();
    // From here on SIGINT (Ctrl-C) and SIGTERM do not kill husk: they end the container
    // and the VM, and everything is cleaned up (exit status 130 or 143).
    let mut stop = Interrupts::new()?;
    let network = guest_network(&a)?;
    check_kvm()?;
    let config = husk::config::Config::load()?;
    let mut img = image_from(config.clone());
    if let Some(k) = a.kernel.clone() {
        img.kernel = k;
    }
    if let Some(i) = a.initramfs.clone() {
        img.initramfs = i;
    }
    if let Some(v) = a.vmm.clone() {
        img.vmm = v;
    }
    if !a.kernel_args.is_empty() {
        img.kernel_args = format!("{} {}", img.kernel_args, a.kernel_args)
            .trim()
            .to_string();
    }
    img.console_log = a.console_log.clone();
    if a.no_template {
        img.templates = None;
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/husk".into());
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a run directory in {}", base.display()))?;

    // An OCI image: its layers from the layer cache (unpacked on their first use). A plain
    // directory: one layer of its own (the VM reads it; writes go to the scratch drive).
    let (layers, image_config) =
        match image::layout_layers(&a.image, &work.path().join("image"), &config.layer_cache()) {
            Ok(l) => (l.layers.into_iter().map(PodLayer::from).collect(), l.config),
            Err(image::ImageError::NotLayout(dir)) => {
                let own = work.path().join("rootfs.layer");
                husk::layers::make_layer_image(&dir, &own).map_err(|why| {
                    anyhow::anyhow!("packing the rootfs {} into a layer: {why}", dir.display())
                })?;
                let layer = PodLayer {
                    key: "husk-run-rootfs".into(),
                    image: own,
                    unlink: true,
                };
                (vec![layer], image::ImageConfig::default())
            }
            Err(e) => return Err(e.into()),
        };
    let spec = build_spec(&a, &image_config)?;
    if let Some(code) = stop.pending() {
        return Ok(code);
    }

    let cfg = PodConfig {
        id: "husk-run".into(),
        hostname: "husk".into(),
        image: img,
        size: VmSize {
            vcpus: a.cpus,
            mem_mib: a.memory,
        },
        dir: work.path().join("vm"),
        scratch_dir: config.scratch_dir(),
        scratch_bytes: u64::from(config.pod.scratch_gib) << 30,
        sysctls: Default::default(),
        boot_timeout: Duration::from_secs(a.boot_timeout),
        cgroup: format!("/husk/run-{}", std::process::id()),
        shared_dir: None,
    };
    let (pod, mut vm) = tokio::select! {
        r = Pod::boot(&cfg, network) => r?,
        // Dropping the Vm kills the VMM and removes its directory.
        code = stop.next() => return Ok(code),
    };
    let t_ready = t0.elapsed();

    let run = tokio::select! {
        r = run_in_pod(&pod, &layers, &spec, a.tty, a.interactive, t0, a.timings) => r,
        code = stop.next() => Ok(code),
    };
    // Power the VM off whatever happened; the Vm's drop kills it if that fails.
    pod.power_off(Duration::from_secs(10)).await;
    let exit = vm.wait_exit(Duration::from_secs(20)).await;
    // A run that failed (the agent connection lost, an RPC refused) says how the VM ended
    // and what the VMM and the guest said last: the VM directory goes with `vm` below.
    let run = run.map_err(|e| {
        let ended = match &exit {
            Ok(Some(status)) => format!("the VMM {}", husk::vm::describe_exit(status)),
            Ok(None) => "the VMM had exited".to_string(),
            Err(err) => format!("{err:#}"),
        };
        anyhow::anyhow!("{e:#}\n{ended}\n{}", vm.logs_tail())
    });
    if a.timings {
        eprintln!(
            "husk: agent ready {:.0} ms after start, total {:.0} ms",
            t_ready.as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0
        );
        for l in vm
            .vmm_log()
            .lines()
            .filter(|l| l.contains(" ms") || l.contains("MiB"))
        {
            eprintln!("husk-vmm: {l}");
        }
    }
    drop(vm);
    let code = run?;
    // The container's status is the answer; a VM that did not power off cleanly (it is
    // killed with the Vm above) is worth a warning, not a different status.
    if let Err(e) = exit {
        eprintln!("husk: warning: the VM did not end cleanly: {e:#}");
    }
    Ok(code)
}

/// The VM's network from `--net tap:NAME`, `--ip` and `--gateway`: a NIC on that tap with a
/// random locally administered MAC, configured in the guest when an address is given.
fn guest_network(a: &RunArgs) -> Result<Option<GuestNetwork>> {
    let Some(net) = &a.net else {
        return Ok(None);
    };
    let Some(name) = net.strip_prefix("tap:").filter(|n| !n.is_empty()) else {
        bail!("--net {net:?}: only tap:NAME (an existing tap device) is supported");
    };
    let mac = husk::vm::random_mac()?;
    let config = match a.ip {
        None => None,
        Some(address) => {
            if let Some(gw) = a
                .gateway
                .filter(|g| g.is_ipv4() != address.address.is_ipv4())
            {
                bail!("--gateway {gw} and --ip {address} are not of one address family");
            }
            let routes = a
                .gateway
                .map(|gateway| Route {
                    destination: IpPrefix::any(gateway),
                    gateway: Some(gateway),
                    device: "eth0".into(),
                    source: None,
                    metric: None,
                    mtu: None,
                    scope: RouteScope::Universe,
                })
                .into_iter()
                .collect();
            Some(NetInfo {
                iface: "eth0".into(),
                mac: husk::net::MacAddr(mac.0),
                mtu: a.mtu.into(),
                addresses: vec![address],
                routes,
            })
        }
    };
    Ok(Some(GuestNetwork {
        device: NetDevice::Tap {
            name: name.to_string(),
            mac: Some(mac),
            mtu: Some(a.mtu),
        },
        config,
    }))
}

/// SIGINT and SIGTERM, caught for the whole run so that husk always cleans up.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    /// Waits for a signal; returns husk's exit status for it (128 + signal number).
    async fn next(&mut self) -> i32 {
        let code = tokio::select! {
            _ = self.int.recv() => 130,
            _ = self.term.recv() => 143,
        };
        eprintln!("husk: interrupted: stopping the container and the VM");
        code
    }

    /// A signal that came while husk was busy with something else.
    fn pending(&mut self) -> Option<i32> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let code = if self.int.poll_recv(&mut cx).is_ready() {
            130
        } else if self.term.poll_recv(&mut cx).is_ready() {
            143
        } else {
            return None;
        };
        eprintln!("husk: interrupted");
        Some(code)
    }
}

async fn run_in_pod(
    pod: &Pod,
    layers: &[PodLayer],
    spec: &Spec,
    tty: bool,
    interactive: bool,
    t0: Instant,
    timings: bool,
) -> Result<i32> {
    pod.create_container(&NewContainer {
        id: "main",
        spec,
        layers,
        stdin: interactive,
        volumes: &[],
    })
    .await?;
    let agent = pod.agent();

    // The terminal's initial size is in the spec (process.consoleSize).
    let mut req = pb::StartContainerRequest::new();
    req.container_id = "main".into();
    let agent2 = agent.clone();
    let start = tokio::spawn(async move { agent2.start_container(req).await });
    if timings {
        eprintln!(
            "husk: container starting {:.0} ms after husk run began",
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
    let o = AttachOpts {
        interactive,
        tty,
        first_output_since: timings.then_some(t0),
    };
    let code = attach(agent, "main", "", o);
    tokio::pin!(code);
    // Attach before the start completes so no output can be missed; a failed start ends it.
    match start.await? {
        Ok(_) => {}
        Err(e) => bail!("starting the container: {e}"),
    }
    code.await
}

/// The OCI spec of the container: runc's defaults minus the network namespace (the
/// container shares the VM's), with the command, env and limits of the command line.
fn build_spec(a: &RunArgs, cfg: &image::ImageConfig) -> Result<Spec> {
    let mut spec = Spec::default();
    let mut args: Vec<String> = a.command.clone();
    if args.is_empty() {
        args = cfg
            .entrypoint
            .iter()
            .chain(cfg.cmd.iter())
            .cloned()
            .collect();
    }
    if args.is_empty() {
        bail!("no command given and the image has no entrypoint or cmd");
    }
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(cfg.env.iter().cloned());
    if a.tty {
        env.push("TERM=xterm".into());
    }
    env.extend(a.env.iter().cloned());
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(args));
    p.set_env(Some(env));
    p.set_terminal(Some(a.tty));
    if a.tty {
        if let Some((rows, cols)) = terminal_size() {
            p.set_console_size(Some(
                oci_spec::runtime::BoxBuilder::default()
                    .height(rows)
                    .width(cols)
                    .build()?,
            ));
        }
    }
    if let Some(wd) = &cfg.working_dir {
        p.set_cwd(wd.into());
    }
    spec.set_process(Some(p));
    spec.set_hostname(Some("husk".into()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let linux = spec
        .linux_mut()
        .as_mut()
        .context("default spec has no linux section")?;
    if let Some(ns) = linux.namespaces().clone() {
        linux.set_namespaces(Some(
            ns.into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect(),
        ));
    }
    let mut res = LinuxResourcesBuilder::default();
    if let Some(m) = a.container_memory {
        res = res.memory(
            LinuxMemoryBuilder::default()
                .limit((m * 1024 * 1024) as i64)
                .swap((m * 1024 * 1024) as i64)
                .build()?,
        );
    }
    if let Some(c) = a.container_cpus {
        if c <= 0.0 {
            bail!("--container-cpus must be positive, got {c}");
        }
        let period: u64 = 100_000;
        res = res.cpu(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((c * period as f64) as i64)
                .build()?,
        );
    }
    linux.set_resources(Some(res.build()?));
    Ok(spec)
}
