//! `husk vmm`: talk to a running husk-vmm through its control socket (debugging, tests).
//! One JSON line out, one JSON line back; an `error` in the answer is an error here.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use husk_vmm_api::{Client, Request};

#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// The VMM's control socket (--api-sock of husk-vmm).
    #[arg(long)]
    api: PathBuf,
    #[command(subcommand)]
    cmd: VmmCmd,
}

#[derive(Debug, clap::Subcommand)]
enum VmmCmd {
    /// State, guest readiness, vCPU exits and registers, device driver status (JSON).
    Status,
    /// The same counters without the register samples (the vCPUs are not kicked).
    Metrics,
    /// Give the pre-declared drive ID a new backing file (the guest sees a media change):
    /// opened here, read-only unless --writable (as the drive is), and passed to the VMM,
    /// which, jailed, could not open it.
    UpdateDrive {
        id: String,
        path: PathBuf,
        /// Open the file for writing too: the drive is writable (ro=false).
        #[arg(long)]
        writable: bool,
    },
    /// Empty the drive ID (the guest sees a disk of size 0).
    Eject { id: String },
    /// Stop the VM.
    Stop,
    /// Pause the VM and write it to FILE, a template `husk-vmm --restore FILE` starts a
    /// clone from (created, or replaced); the VMM then exits.
    Snapshot { path: PathBuf },
}

pub fn run(a: VmmArgs) -> Result<i32> {
    let mut file = None;
    let req = match &a.cmd {
        VmmCmd::Status => Request::Status {},
        VmmCmd::Metrics => Request::Metrics {},
        VmmCmd::Stop => Request::Stop {},
        VmmCmd::Eject { id } => Request::eject(id),
        VmmCmd::Snapshot { path } => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .with_context(|| format!("the template file {}", path.display()))?;
            file = Some(f);
            Request::Snapshot {}
        }
        VmmCmd::UpdateDrive { id, path, writable } => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(*writable)
                .open(path)
                .with_context(|| format!("the drive image {}", path.display()))?;
            file = Some(f);
            Request::UpdateDrive {
                id: id.clone(),
                path: None,
            }
        }
    };
    // Long enough for a snapshot to write guest memory under the nested testbed.
    let answer = Client::new(&a.api, Duration::from_secs(120))
        .call_with(&req, file.as_ref())
        .map_err(|e| anyhow::anyhow!(husk::vm::error_chain(&e)))?;
    println!("{}", serde_json::to_string(&answer)?);
    Ok(0)
}
