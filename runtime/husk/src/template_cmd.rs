//! `husk template`: the VM template cache (see [`husk::template`]): list it, make a template
//! ahead of time, remove one or all.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use husk::{
    config::Config,
    template::{Got, Shape, TemplateCache},
    vm::{image_from, VmSize},
};

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    cmd: TemplateCmd,
}

#[derive(Debug, Subcommand)]
enum TemplateCmd {
    /// Each template: its id, size, devices and whether it is sound.
    List,
    /// Make the template pods of this size and these devices start from (the configured
    /// pod size, a NIC and a shared directory, as a containerd pod has, unless told).
    Make {
        #[arg(long)]
        vcpus: Option<u8>,
        #[arg(long)]
        mem_mib: Option<u32>,
        /// Without a NIC (pods with no network, `husk run` without --net).
        #[arg(long)]
        no_net: bool,
        /// Without the shared directory (`husk run`'s pods have none).
        #[arg(long)]
        no_shared: bool,
    },
    /// Remove the template ID, or every template (VMs restored from one keep running).
    Remove {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

pub async fn run(a: TemplateArgs) -> Result<i32> {
    let cfg = Config::load()?;
    let image = image_from(cfg.clone());
    let cache = TemplateCache::new(cfg.storage_dir.join("templates"));
    match a.cmd {
        TemplateCmd::List => {
            for (id, m) in cache.list() {
                match m {
                    Ok(m) => println!(
                        "{id}  {} vCPU  {} MiB  net={} shared={}  made in {} ms",
                        m.key.vcpus, m.key.mem_mib, m.key.shape.net, m.key.shape.fs, m.made_in_ms
                    ),
                    Err(why) => println!("{id}  unsound: {why}"),
                }
            }
        }
        TemplateCmd::Make {
            vcpus,
            mem_mib,
            no_net,
            no_shared,
        } => {
            husk::vm::check_kvm()?;
            let size = VmSize {
                vcpus: vcpus.unwrap_or(cfg.pod.vcpus),
                mem_mib: mem_mib.unwrap_or(cfg.pod.memory_mib),
            };
            let shape = Shape {
                net: !no_net,
                fs: !no_shared,
            };
            let cgroup = format!("/husk/template-{}", std::process::id());
            let t = cache
                .get_or_make(&image, &size, shape, &cgroup, Duration::from_secs(60))
                .await?;
            match t {
                Got::Cached(t) | Got::Made(t) => println!("{}  {}", t.id, t.file.display()),
                Got::Busy => bail!("another process is making that template"),
            }
        }
        TemplateCmd::Remove { id, all } => match (id, all) {
            (Some(id), false) => cache.remove(&id)?,
            (None, true) => {
                for (id, _) in cache.list() {
                    cache.remove(&id)?;
                }
            }
            _ => bail!("give a template id, or --all"),
        },
    }
    Ok(0)
}
