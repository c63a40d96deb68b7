//! `containerd-shim-husk-v2`: containerd's task API v2 for husk. One shim process and one
//! microVM per pod: containerd starts a shim for the pod's sandbox (pause) task, and every
//! later task of the pod (grouped by the `io.kubernetes.cri.sandbox-id` annotation) reuses it.
//!
//! The sandbox task stands for the VM: `Create` boots it and connects to the agent, `Kill`
//! powers it off, and its exit is the VMM's. A VMM that dies on its own (crash, SIGKILL) is
//! reported as the sandbox task's exit.

mod error;
mod events;
mod metrics;
mod rootfs;
mod sandbox;
mod service;
mod stdio;
mod task;

use containerd_shim::{
    asynchronous::{publisher::RemotePublisher, run, spawn, ExitSignal, Shim},
    logger::FifoLogger,
    protos::shim::shim::DeleteResponse,
    Config, Flags, StartOpts,
};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

struct HuskShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

/// The pod a task belongs to: the sandbox id annotation of its bundle, or its own id (the
/// sandbox task itself, or a task started outside of CRI).
fn grouping(id: &str) -> String {
    std::fs::read("config.json")
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["annotations"]["io.kubernetes.cri.sandbox-id"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| id.to_string())
}

/// How long the shim's daemon waits for a reader on its log FIFO (containerd's).
const LOG_READER_WAIT: Duration = Duration::from_secs(10);

/// The bundle's `log` FIFO opened for writing, waiting at most `wait` for its reader.
///
/// containerd opens it for reading before it runs `shim start`, and the daemon's log goes there.
/// The crate opens it blocking, and an open for writing blocks until there is a reader: after
/// containerd was killed inside runp, before the daemon got there, that is forever. The daemon
/// then never serves, `shim start` waits on it, and the restarted containerd finds a shim it
/// cannot reach, deletes its bundle and forgets it: a shim left on the node for good.
/// Opened without blocking, a FIFO that nobody reads within `wait` means containerd is gone.
fn open_log(path: &Path, wait: Duration) -> io::Result<File> {
    let deadline = Instant::now() + wait;
    loop {
        let r = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        match r {
            Ok(f) => {
                // Writes block as they would have (the reader is containerd's copy loop).
                let flags = OFlag::from_bits_retain(fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)?);
                fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!(
                            "nobody opened the shim's log FIFO {} for reading within {:.0?}: \
                             containerd, which starts the shim, is gone",
                            path.display(),
                            wait
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The shim's logger: the crate's (logfmt lines, `time=… level=… KEY="VALUE"… msg="…"`, on
/// the FIFO containerd copies into its own log), with the pod's sandbox id and containerd
/// namespace as fields of every line (`pod="…" namespace="…"`), before the line's own
/// (`container="…"`, `exec="…"`): one pod's lines are found with one grep, whatever they say.
struct PodLogger {
    inner: FifoLogger,
    fields: [(&'static str, String); 2],
}

/// The pod's fields, then a record's own.
struct WithFields<'a> {
    fields: &'a [(&'static str, String)],
    rest: &'a dyn log::kv::Source,
}

impl log::kv::Source for WithFields<'_> {
    fn visit<'kvs>(
        &'kvs self,
        visitor: &mut dyn log::kv::VisitSource<'kvs>,
    ) -> Result<(), log::kv::Error> {
        for (k, v) in self.fields {
            visitor.visit_pair(log::kv::Key::from_str(k), log::kv::Value::from(v.as_str()))?;
        }
        self.rest.visit(visitor)
    }
}

impl log::Log for PodLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        let kvs = WithFields {
            fields: &self.fields,
            rest: record.key_values(),
        };
        self.inner
            .log(&record.to_builder().key_values(&kvs).build());
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

/// The daemon's logger ([`PodLogger`]) on the bundle's log FIFO ([`open_log`]), at the level
/// the crate would set: `RUST_LOG`, else the config's default, raised to debug by `-debug`.
fn setup_logger(debug: bool, default_level: &str, pod: &str, namespace: &str) -> io::Result<()> {
    let file = open_log(Path::new("log"), LOG_READER_WAIT)?;
    let logger = PodLogger {
        inner: FifoLogger::with_file(file),
        fields: [
            ("pod", pod.to_string()),
            ("namespace", namespace.to_string()),
        ],
    };
    log::set_boxed_logger(Box::new(logger)).map_err(io::Error::other)?;
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| default_level.to_string());
    let level = log::LevelFilter::from_str(&level).unwrap_or(log::LevelFilter::Info);
    log::set_max_level(if debug {
        level.max(log::LevelFilter::Debug)
    } else {
        level
    });
    Ok(())
}

#[async_trait::async_trait]
impl Shim for HuskShim {
    type T = service::TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The daemon (no action; `start` and `delete` log nothing of their own).
        if args.action.is_empty() && !args.socket.is_empty() && !config.no_setup_logger {
            if let Err(e) = setup_logger(
                args.debug,
                &config.default_log_level,
                &args.id,
                &args.namespace,
            ) {
                eprintln!("{RUNTIME_ID}: the shim's log: {e}");
                std::process::exit(1);
            }
            config.no_setup_logger = true;
        }
        HuskShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let group = grouping(&opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd runs this (in the task's bundle) after a shim died. Its VMM died with it
        // (PR_SET_PDEATHSIG); what may be left is the pod's run directory (sockets, container
        // images) and a container rootfs the shim had mounted while packing it.
        log::info!("delete_shim {} in {}", self.id, self.namespace);
        rootfs::unmount(std::path::Path::new("rootfs"));
        // A sandbox task's pod network: the tc filters and qdiscs stay when the shim dies
        // (the tap went with the VMM).
        let spec = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(spec) = spec.as_ref().filter(|s| sandbox::is_sandbox(s)) {
            // The VMM's cgroup, once its VMM (killed with the shim) is gone.
            let cgroup = sandbox::vmm_cgroup(spec, &self.namespace, &self.id);
            let r = tokio::task::spawn_blocking(move || husk::cgroup::remove(&cgroup)).await;
            if let Ok(Err(e)) = r {
                log::warn!("removing the VMM's cgroup: {e:#}");
            }
            // Its user's lease, once nobody holds it (the shim's and the VMM's descriptors
            // went with them; the file stays until swept).
            let _ = tokio::task::spawn_blocking(husk::uid_lease::sweep).await;
        }
        if let Some(spec) = spec {
            if let (true, Ok(Some(netns))) = (sandbox::is_sandbox(&spec), sandbox::pod_netns(&spec))
            {
                let r = tokio::task::spawn_blocking(move || {
                    husk::net::teardown(&netns, sandbox::TAP_NAME)
                })
                .await;
                if let Ok(Err(e)) = r {
                    log::warn!("taking the pod's network apart: {e}");
                }
            }
        }
        let dir = sandbox::pod_dir(&self.namespace, &self.id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("removing {}: {e}", dir.display());
            }
        }
        let mut r = DeleteResponse::new();
        r.exit_status = 128 + libc::SIGKILL as u32;
        r.exited_at = Some(events::now()).into();
        Ok(r)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::TaskService::new(self.namespace.clone(), self.exit.clone(), publisher)
    }
}

#[tokio::main]
async fn main() {
    // containerd's shims answer -v/--version (as `containerd-shim-runc-v2 -v` does); the
    // crate's parser knows the flag but prints nothing. `husk doctor` reads this.
    if std::env::args()
        .skip(1)
        .any(|a| matches!(a.as_str(), "-v" | "--v" | "-version" | "--version"))
    {
        println!(
            "containerd-shim-husk-v2:\n  Version: {}\n  Agent API: {}",
            env!("CARGO_PKG_VERSION"),
            husk_proto::API_VERSION
        );
        return;
    }
    // Every child of the shim (the VMM, mkfs.ext4, debugfs) is waited for by whoever started
    // it: the crate's reaper (waitpid(-1) on SIGCHLD) would take their exit statuses away
    // (ECHILD). It has to be off from the start: the crate installs it before Shim::new. No
    // subreaper either: nothing of ours leaves orphans to collect.
    let config = Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    run::<HuskShim>(RUNTIME_ID, Some(config)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;

    /// Every line carries the pod's fields, then its own, then the message.
    #[test]
    fn log_lines_carry_the_pod_and_their_own_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let logger = PodLogger {
            inner: FifoLogger::with_file(File::create(&path).unwrap()),
            fields: [("pod", "p1".into()), ("namespace", "k8s.io".into())],
        };
        // The crate's logger writes what the global level lets through.
        log::set_max_level(log::LevelFilter::Info);
        let kv = [("container", "c1")];
        logger.log(
            &log::Record::builder()
                .level(log::Level::Warn)
                .args(format_args!("it went wrong"))
                .key_values(&kv)
                .build(),
        );
        logger.log(
            &log::Record::builder()
                .level(log::Level::Info)
                .args(format_args!("plain"))
                .build(),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(
                r#"level=warn pod="p1" namespace="k8s.io" container="c1" msg="it went wrong""#
            ),
            "{text}"
        );
        assert!(
            lines[1].contains(r#"level=info pod="p1" namespace="k8s.io" msg="plain""#),
            "{text}"
        );
    }
}
