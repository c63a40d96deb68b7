//! `husk`: the command-line tool of the husk runtime.

mod agent_cmd;
mod doctor;
mod install;
mod monitor;
mod run;
mod template_cmd;
mod vmm_cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "husk", version, about = "husk: containers in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Talk to a husk agent directly (debugging).
    Agent(agent_cmd::AgentArgs),
    /// Run a container in a fresh microVM and return its exit status.
    Run(run::RunArgs),
    /// Talk to a running husk-vmm through its control socket (debugging).
    Vmm(vmm_cmd::VmmArgs),
    /// Check whether this host can run husk pods: one line per check, each problem with its
    /// fix; exits 0 only when a pod can start.
    Doctor(doctor::DoctorArgs),
    /// Serve per-pod metrics in Prometheus's text format (GET /metrics), gathered from the
    /// pods' shims, VMMs and agents at each scrape.
    Monitor(monitor::MonitorArgs),
    /// Install the containerd shim and register the runtimes `husk` and `untrusted`.
    Install(install::InstallArgs),
    /// Undo `husk install`.
    Uninstall(install::UninstallArgs),
    /// The VM templates pods start from: list them, make one ahead of time, remove them.
    Template(template_cmd::TemplateArgs),
    /// Remove the layer cache's entries whose source (a containerd snapshot, an OCI blob)
    /// is gone, or all of them.
    Gc {
        /// Remove every entry (running pods keep the layers they hold).
        #[arg(long)]
        all: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                // ttrpc logs an error for every request future dropped on purpose (e.g.
                // a wait cut short by Ctrl-C); HUSK_LOG=debug shows it.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,ttrpc::asynchronous::client=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("husk: starting the async runtime: {e}");
            std::process::exit(125);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Agent(a) => agent_cmd::run(a).await,
            Cmd::Run(a) => run::run(a).await,
            Cmd::Vmm(a) => vmm_cmd::run(a),
            Cmd::Doctor(a) => doctor::doctor(a),
            Cmd::Install(a) => install::install(a),
            Cmd::Monitor(a) => monitor::monitor(a).await,
            Cmd::Uninstall(a) => install::uninstall(a),
            Cmd::Template(a) => template_cmd::run(a).await,
            Cmd::Gc { all } => gc(all),
        }
    });
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // The whole chain, once.
            eprintln!("husk: {e:#}");
            std::process::exit(125);
        }
    }
}

fn gc(all: bool) -> anyhow::Result<i32> {
    let cache = husk::config::Config::load()?.layer_cache();
    let r = cache.gc(all)?;
    println!(
        "layer cache {}: {} entries removed ({} MiB freed), {} kept",
        cache.dir().display(),
        r.removed,
        r.bytes_freed >> 20,
        r.kept
    );
    Ok(0)
}
