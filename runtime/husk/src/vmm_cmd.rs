//! `husk vmm`: talk to a running husk-vmm through its control socket (debugging, tests).
//! One JSON line out, one JSON line back; an `error` in the answer is an error here.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};

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
    let answer = request(&a.api, &req)?;
    if let Some(e) = answer.get("error") {
        bail!("the VMM refused: {}", e.as_str().unwrap_or(&e.to_string()));
    }
    println!("{answer}");
    Ok(0)
}

fn request(api: &PathBuf, req: &serde_json::Value) -> Result<serde_json::Value> {
    let s = UnixStream::connect(api)
        .with_context(|| format!("connecting to the VMM control socket {}", api.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&s).write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the VMM's answer")?;
    serde_json::from_str(&line).with_context(|| format!("the VMM's answer {line:?}"))
}
