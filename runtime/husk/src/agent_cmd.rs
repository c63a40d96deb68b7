//! `husk agent ...`: send any request to an agent, for debugging.

use std::{
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use husk::stdio::{attach_outputs, Observer, Sink};
use husk_client::{pb, AgentAddr, AgentClient, StdioStream};
use tokio::io::AsyncWriteExt;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The agent: unix:PATH, hvsock:VMM_VSOCK_SOCKET or vsock:CID.
    #[arg(long, env = "HUSK_AGENT_ADDR")]
    addr: String,
    /// How long to wait for the connection.
    #[arg(long, default_value = "10")]
    timeout_secs: u64,
    /// Retry until the agent answers a health check (a VM that is still booting).
    #[arg(long)]
    wait: bool,
    #[command(subcommand)]
    cmd: AgentCmd,
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// Health check.
    Check,
    /// Agent and API version.
    Version,
    /// CreateSandbox.
    CreateSandbox {
        id: String,
        #[arg(long, default_value = "")]
        hostname: String,
    },
    /// DestroySandbox (in a VM, this powers it off).
    DestroySandbox { id: String },
    /// PrepareTemplate: the VM is about to be snapshotted (its agent then waits for Restored).
    PrepareTemplate,
    /// Restored: the VM is a template's clone (its RNG reseeded from this host's entropy, its
    /// clock set to this host's); prints how far its clock was behind.
    Restored,
    /// CreateContainer from an OCI bundle (config.json; rootfs from --rootfs, --block or the bundle).
    Create {
        id: String,
        /// Directory holding config.json.
        #[arg(long)]
        bundle: PathBuf,
        /// Root filesystem directory (default: the spec's root.path, relative to the bundle).
        #[arg(long, conflicts_with = "block")]
        rootfs: Option<String>,
        /// Root filesystem block device in the guest, as DEVICE:FSTYPE[:ro] (e.g. /dev/vdb:ext4).
        #[arg(long)]
        block: Option<String>,
        /// Open a stdin stream.
        #[arg(long)]
        stdin: bool,
    },
    /// StartContainer.
    Start { id: String },
    /// Attach this terminal's stdin/stdout/stderr to a process and wait for it; exits with its status.
    Attach {
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
        /// Also attach stdin.
        #[arg(short, long)]
        interactive: bool,
        /// The process has a terminal (one output stream).
        #[arg(short, long)]
        tty: bool,
    },
    /// ExecProcess, attach and wait; exits with the process's status.
    Exec {
        id: String,
        exec_id: String,
        #[arg(short, long)]
        interactive: bool,
        #[arg(short, long)]
        tty: bool,
        /// UID[:GID] to run as.
        #[arg(short, long, default_value = "0:0")]
        user: String,
        /// Extra environment variables KEY=VALUE.
        #[arg(short, long)]
        env: Vec<String>,
        /// Working directory in the container.
        #[arg(long, default_value = "/")]
        cwd: String,
        #[arg(required = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// ResizeTerminal.
    Resize {
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
        rows: u32,
        cols: u32,
    },
    /// RemoveProcess: forget an exec'd process that has exited.
    RmExec { id: String, exec_id: String },
    /// CloseStdin (the process reads end of file).
    CloseStdin {
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
    },
    /// SignalProcess.
    Kill {
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
        #[arg(long, default_value = "15")]
        signal: u32,
        #[arg(long)]
        all: bool,
    },
    /// WaitProcess.
    Wait {
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
    },
    /// ListProcesses.
    Ps { id: String },
    /// ContainerStats, as JSON.
    Stats { id: String },
    /// UpdateContainer with OCI LinuxResources JSON from a file.
    Update { id: String, resources: PathBuf },
    /// PauseContainer.
    Pause { id: String },
    /// ResumeContainer.
    Resume { id: String },
    /// RemoveContainer.
    Rm { id: String },
    /// Waits for the next OOM event and prints the container id.
    OomEvent,
}

pub async fn run(a: AgentArgs) -> Result<i32> {
    let addr: AgentAddr = a.addr.parse()?;
    let timeout = Duration::from_secs(a.timeout_secs);
    let c = if a.wait {
        AgentClient::connect_when_ready(&addr, timeout).await?
    } else {
        AgentClient::connect(&addr, timeout).await?
    };
    match a.cmd {
        AgentCmd::Check => {
            let r = c.check().await?;
            println!("{:?}", r.status.enum_value_or_default());
        }
        AgentCmd::Version => {
            let r = c.version().await?;
            println!("agent {} api {}", r.agent_version, r.api_version);
        }
        AgentCmd::CreateSandbox { id, hostname } => {
            let mut r = pb::CreateSandboxRequest::new();
            r.sandbox_id = id;
            r.hostname = hostname;
            c.create_sandbox(r).await?;
        }
        AgentCmd::PrepareTemplate => {
            c.prepare_template(pb::Empty::new()).await?;
        }
        AgentCmd::Restored => {
            let offset = c.tell_restored().await?;
            println!("the guest's clock was {:.3} s behind", offset as f64 / 1e9);
        }
        AgentCmd::DestroySandbox { id } => {
            let mut r = pb::DestroySandboxRequest::new();
            r.sandbox_id = id;
            c.destroy_sandbox(r).await?;
        }
        AgentCmd::Create {
            id,
            bundle,
            rootfs,
            block,
            stdin,
        } => {
            let config = bundle.join("config.json");
            let json =
                std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
            let mut r = pb::CreateContainerRequest::new();
            r.container_id = id;
            r.stdin = stdin;
            let mut root = pb::Rootfs::new();
            if let Some(b) = block {
                let mut parts = b.split(':');
                let (Some(dev), Some(fstype)) = (parts.next(), parts.next()) else {
                    bail!("--block wants DEVICE:FSTYPE[:ro], e.g. /dev/vdb:ext4");
                };
                let mut bd = pb::BlockDevice::new();
                bd.source = dev.into();
                bd.fstype = fstype.into();
                match parts.next() {
                    None => {}
                    Some("ro") => bd.readonly = true,
                    Some(other) => bail!("--block {b:?}: {other:?} is not \"ro\""),
                }
                root.set_block(bd);
            } else {
                let path = match rootfs {
                    Some(p) => p,
                    None => {
                        let v: serde_json::Value = serde_json::from_slice(&json)
                            .with_context(|| format!("{} is not JSON", config.display()))?;
                        let p = v["root"]["path"]
                            .as_str()
                            .context("config.json has no root.path; pass --rootfs")?;
                        bundle.join(p).display().to_string()
                    }
                };
                root.set_path(path);
            }
            r.rootfs = Some(root).into();
            r.oci_spec_json = json;
            let resp = c.create_container(r).await?;
            println!("{}", resp.pid);
        }
        AgentCmd::Start { id } => {
            let mut r = pb::StartContainerRequest::new();
            r.container_id = id;
            println!("{}", c.start_container(r).await?.pid);
        }
        AgentCmd::Attach {
            id,
            exec_id,
            interactive,
            tty,
        } => {
            let o = AttachOpts {
                interactive,
                tty,
                ..Default::default()
            };
            return attach(&c, &id, &exec_id, o).await;
        }
        AgentCmd::Exec {
            id,
            exec_id,
            interactive,
            tty,
            user,
            env,
            cwd,
            args,
        } => {
            let (uid, gid) = match user.split_once(':') {
                Some((u, g)) => (u.parse::<u32>().ok(), g.parse::<u32>().ok()),
                None => (user.parse::<u32>().ok(), Some(0)),
            };
            let (Some(uid), Some(gid)) = (uid, gid) else {
                bail!("--user wants UID[:GID] (numbers), got {user:?}");
            };
            let mut envs = vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                "TERM=xterm".to_string(),
            ];
            envs.extend(env);
            let mut process = serde_json::json!({
                "terminal": tty,
                "user": {"uid": uid, "gid": gid},
                "args": args,
                "env": envs,
                "cwd": cwd,
            });
            if let Some((rows, cols)) = terminal_size().filter(|_| tty) {
                process["consoleSize"] = serde_json::json!({"height": rows, "width": cols});
            }
            let mut r = pb::ExecProcessRequest::new();
            r.container_id = id.clone();
            r.exec_id = exec_id.clone();
            r.stdin = interactive;
            r.process_json = serde_json::to_vec(&process)?;
            c.exec_process(r).await?;
            let o = AttachOpts {
                interactive,
                tty,
                ..Default::default()
            };
            return attach(&c, &id, &exec_id, o).await;
        }
        AgentCmd::Resize {
            id,
            exec_id,
            rows,
            cols,
        } => {
            let mut r = pb::ResizeTerminalRequest::new();
            r.container_id = id;
            r.exec_id = exec_id;
            r.rows = rows;
            r.cols = cols;
            c.resize_terminal(r).await?;
        }
        AgentCmd::RmExec { id, exec_id } => {
            let mut r = pb::RemoveProcessRequest::new();
            r.container_id = id;
            r.exec_id = exec_id;
            c.remove_process(r).await?;
        }
        AgentCmd::CloseStdin { id, exec_id } => {
            let mut r = pb::CloseStdinRequest::new();
            r.container_id = id;
            r.exec_id = exec_id;
            c.close_stdin(r).await?;
        }
        AgentCmd::Kill {
            id,
            exec_id,
            signal,
            all,
        } => {
            let mut r = pb::SignalProcessRequest::new();
            r.container_id = id;
            r.exec_id = exec_id;
            r.signal = signal;
            r.all = all;
            c.signal_process(r).await?;
        }
        AgentCmd::Wait { id, exec_id } => {
            let mut r = pb::WaitProcessRequest::new();
            r.container_id = id;
            r.exec_id = exec_id;
            let w = c.wait_process(r).await?;
            println!("exit_status {} oom_killed {}", w.exit_status, w.oom_killed);
            return Ok(w.exit_status);
        }
        AgentCmd::Ps { id } => {
            let mut r = pb::ListProcessesRequest::new();
            r.container_id = id;
            for p in c.list_processes(r).await?.pids {
                println!("{p}");
            }
        }
        AgentCmd::Stats { id } => {
            let mut r = pb::ContainerStatsRequest::new();
            r.container_id = id;
            let s = c.container_stats(r).await?;
            println!("{}", protobuf_json(&s));
        }
        AgentCmd::Update { id, resources } => {
            let mut r = pb::UpdateContainerRequest::new();
            r.container_id = id;
            r.resources_json = std::fs::read(&resources)
                .with_context(|| format!("reading {}", resources.display()))?;
            c.update_container(r).await?;
        }
        AgentCmd::Pause { id } => {
            let mut r = pb::PauseContainerRequest::new();
            r.container_id = id;
            c.pause_container(r).await?;
        }
        AgentCmd::Resume { id } => {
            let mut r = pb::ResumeContainerRequest::new();
            r.container_id = id;
            c.resume_container(r).await?;
        }
        AgentCmd::Rm { id } => {
            let mut r = pb::RemoveContainerRequest::new();
            r.container_id = id;
            c.remove_container(r).await?;
        }
        AgentCmd::OomEvent => {
            let e = c.get_oom_event(pb::GetOomEventRequest::new()).await?;
            println!("{}", e.container_id);
        }
    }
    Ok(0)
}

fn protobuf_json(s: &pb::ContainerStatsResponse) -> String {
    serde_json::json!({
        "cpu_usage_usec": s.cpu_usage_usec,
        "cpu_user_usec": s.cpu_user_usec,
        "cpu_system_usec": s.cpu_system_usec,
        "cpu_nr_periods": s.cpu_nr_periods,
        "cpu_nr_throttled": s.cpu_nr_throttled,
        "cpu_throttled_usec": s.cpu_throttled_usec,
        "memory_current": s.memory_current,
        "memory_max": s.memory_max,
        "memory_swap_current": s.memory_swap_current,
        "memory_events": s.memory_events,
        "pids_current": s.pids_current,
        "pids_max": s.pids_max,
        "io_read_bytes": s.io_read_bytes,
        "io_write_bytes": s.io_write_bytes,
    })
    .to_string()
}

/// How [`attach`] connects this process's stdio to a process in the agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachOpts {
    /// Stream this process's stdin to the process.
    pub interactive: bool,
    /// The process has a terminal: one output stream; with `interactive` the local terminal
    /// goes raw, and its size changes (SIGWINCH) are passed on.
    pub tty: bool,
    /// Print "husk: first output after N ms" on stderr when the first byte of output arrives,
    /// N counted from this instant.
    pub first_output_since: Option<Instant>,
}

/// Streams this process's stdio to and from a process of the agent, then waits for it.
pub async fn attach(c: &AgentClient, id: &str, exec_id: &str, o: AttachOpts) -> Result<i32> {
    let mut sinks: Vec<(StdioStream, Sink)> =
        vec![(StdioStream::Stdout, Box::new(tokio::io::stdout()))];
    if !o.tty {
        sinks.push((StdioStream::Stderr, Box::new(tokio::io::stderr())));
    }
    let observer = o.first_output_since.map(|since| {
        let seen = AtomicBool::new(false);
        let o: Observer = Arc::new(move |_: &[u8]| {
            if !seen.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "husk: first output {:.0} ms after husk run began",
                    since.elapsed().as_secs_f64() * 1000.0
                );
            }
        });
        o
    });
    let outputs = attach_outputs(c, id, exec_id, sinks, observer).await?;
    // Raw mode only when our keystrokes go to the process; otherwise Ctrl-C stays ours.
    let _raw = (o.tty && o.interactive).then(RawTerminal::enter).flatten();
    if o.interactive {
        let mut input = c.open_stream(id, exec_id, StdioStream::Stdin).await?;
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let _ = tokio::io::copy(&mut stdin, &mut input).await;
            let _ = input.shutdown().await;
        });
    }
    let resizer = o.tty.then(|| {
        let (c, id, exec_id) = (c.clone(), id.to_string(), exec_id.to_string());
        tokio::spawn(async move { forward_resizes(&c, &id, &exec_id).await })
    });
    let mut r = pb::WaitProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec_id.into();
    let w = c.wait_process(r).await;
    if let Some(t) = resizer {
        t.abort();
    }
    let w = w?;
    for t in outputs {
        let _ = t.await;
    }
    if w.oom_killed {
        eprintln!("husk: the container was OOM-killed");
    }
    if w.exit_status < 0 {
        bail!("bad exit status {}", w.exit_status);
    }
    Ok(w.exit_status)
}

async fn forward_resizes(c: &AgentClient, id: &str, exec_id: &str) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        let Some((rows, cols)) = terminal_size() else {
            continue;
        };
        let mut r = pb::ResizeTerminalRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.rows = rows.into();
        r.cols = cols.into();
        if let Err(e) = c.resize_terminal(r).await {
            tracing::debug!("resizing the terminal: {e}");
        }
    }
}

/// The local terminal's size (rows, columns), if stdin is a terminal.
pub fn terminal_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the live local `ws`.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The local terminal in raw mode while an interactive terminal session runs; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw)
            .ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
