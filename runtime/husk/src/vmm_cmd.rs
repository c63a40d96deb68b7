//! `husk vmm`: talk to a running husk-vmm through its control socket (debugging, tests).
//! One JSON line out, one JSON line back; an `error` in the answer is an error here.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use husk::vm::vmm_request;

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
    /// Give the pre-declared drive ID a new backing file (the guest sees a media change).
    UpdateDrive { id: String, path: PathBuf },
    /// Stop the VM.
    Stop,
}

pub fn run(a: VmmArgs) -> Result<i32> {
    let req = match &a.cmd {
        VmmCmd::Status => serde_json::json!({"status": {}}),
        VmmCmd::Stop => serde_json::json!({"stop": {}}),
        VmmCmd::UpdateDrive { id, path } => {
            let path = path
                .canonicalize()
                .with_context(|| format!("the drive image {}", path.display()))?;
            serde_json::json!({"update_drive": {"id": id, "path": path}})
        }
    };
    let answer = vmm_request(&a.api, &req, Duration::from_secs(10))?;
    if let Some(e) = answer.get("error") {
        bail!("the VMM refused: {}", e.as_str().unwrap_or(&e.to_string()));
    }
    println!("{answer}");
    Ok(0)
}
