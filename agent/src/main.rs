//! husk-agent: PID 1 of a husk microVM, or a host process for tests.
//!
//! `husk-agent` as the guest's init listens on vsock; `husk-agent --listen unix:/path` serves
//! the same API on a Unix socket (stdio streams on `/path.stdio`).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use husk_agent::{
    container::EngineConfig,
    pid1,
    reaper::Reaper,
    sandbox::Sandbox,
    server::ListenAddr,
    service::{AgentService, OnDestroy},
    stdio::StreamRegistry,
};
use husk_proto::{agent_ttrpc, health_ttrpc};

#[derive(Debug, Parser)]
#[command(name = "husk-agent", version = agent_version(), about = "The husk in-guest agent")]
struct Args {
    /// Where to serve: `vsock` (ports 1024 and 1025) or `unix:PATH` (stdio on PATH.stdio).
    /// Default: vsock as PID 1, required otherwise.
    #[arg(long)]
    listen: Option<ListenAddr>,
    /// The cgroup v2 directory for sandboxes, or `none`. Default: /sys/fs/cgroup as PID 1;
    /// as a host process, `husk` under the first cgroup2 mount found.
    #[arg(long)]
    cgroup_root: Option<String>,
    /// Where per-container state (block rootfs mounts) lives.
    #[arg(long, default_value = "/run/husk-agent")]
    state_dir: PathBuf,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `husk_agent=debug`.
    #[arg(long, env = "HUSK_AGENT_LOG", default_value = "info")]
    log: String,
}

/// `--version`: the workspace version and [`husk_proto::AGENT_MARK`], which `husk doctor`
/// looks for in a guest image (printing it keeps it in the binary).
fn agent_version() -> &'static str {
    husk_proto::AGENT_MARK.trim_end_matches('\0')
}

fn main() {
    // Re-exec'd helpers of the container engine run here and never return.
    husk_agent::container::maybe_run_child();
    let pid1 = std::process::id() == 1;
    // As init, argv holds whatever kernel parameters the kernel did not know: ignore them.
    let args = if pid1 {
        Args::parse_from(["husk-agent"])
    } else {
        Args::parse()
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_target(false)
        // Plain text: in a VM this is the serial console, kept as a file on the host and
        // quoted into the shim's error messages.
        .with_ansi(false)
        .init();
    if let Err(e) = run(args, pid1) {
        tracing::error!("{e:#}");
        if pid1 {
            // An init that exits panics the kernel; power off cleanly instead.
            pid1::power_off();
        }
        std::process::exit(1);
    }
}

fn is_cgroup2(path: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

fn cgroup_root(arg: Option<&str>, pid1: bool) -> Option<PathBuf> {
    match arg {
        Some("none") => None,
        Some(p) => Some(p.into()),
        None if pid1 => Some("/sys/fs/cgroup".into()),
        None => ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| is_cgroup2(p))
            .map(|p| p.join("husk")),
    }
}

fn run(args: Args, pid1: bool) -> anyhow::Result<()> {
    if pid1 {
        pid1::leave_initramfs().context("moving off the initramfs")?;
        pid1::mount_basics().context("setting up the guest")?;
        if let Err(e) = pid1::loopback_up() {
            tracing::warn!("bringing up lo: {e}");
        }
    } else {
        // Orphaned container processes must come back to us to be reaped.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("PR_SET_CHILD_SUBREAPER");
        }
    }
    let listen = match (args.listen, pid1) {
        (Some(l), _) => l,
        (None, true) => ListenAddr::Vsock,
        (None, false) => anyhow::bail!("--listen unix:PATH is required when not PID 1"),
    };
    let cgroup_root = cgroup_root(args.cgroup_root.as_deref(), pid1);
    let engine = EngineConfig {
        cgroup_root,
        layers: std::sync::Arc::new(husk_agent::container::LayerStore::new(
            args.state_dir.join(".layers"),
            "/sys/class/block",
            "/dev/.husk-layers",
        )),
        state_dir: args.state_dir,
        agent_exe: "/proc/self/exe".into(),
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), ?listen, cgroup_root = ?engine.cgroup_root, "husk-agent starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let res = rt.block_on(serve(listen.clone(), engine, pid1));
    listen.cleanup();
    res
}

async fn serve(listen: ListenAddr, engine: EngineConfig, pid1: bool) -> anyhow::Result<()> {
    let reaper = Reaper::start().context("watching SIGCHLD")?;
    let streams = Arc::new(StreamRegistry::default());
    let sandbox = Sandbox::new(engine, reaper, streams.clone());
    let service = Arc::new(AgentService {
        sandbox: sandbox.clone(),
        on_destroy: if pid1 {
            OnDestroy::PowerOff
        } else {
            OnDestroy::KeepRunning
        },
        template: Default::default(),
    });
    let mut services = agent_ttrpc::create_agent(service.clone());
    services.extend(health_ttrpc::create_health(service));
    let listener = listen
        .bind_api()
        .with_context(|| format!("listening on {listen:?}"))?;
    listen
        .serve_stdio(streams)
        .with_context(|| format!("listening for stdio on {listen:?}"))?;
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!("ready");
    if pid1 {
        pid1::signal_ready();
        // PID 1 never exits; DestroySandbox powers the VM off.
        std::future::pending::<()>().await;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    sandbox.remove_all().await;
    let _ = server.shutdown().await;
    Ok(())
}
