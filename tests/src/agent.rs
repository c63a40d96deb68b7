//! A real `husk-agent --listen unix:...` process for tests, and a client to it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use husk_client::{pb, AgentAddr, AgentClient, StdioStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Panics with a clear message unless the test runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (namespaces, mounts, cgroups); CI runs it as root"
    );
}

/// A binary built by this workspace (target/<profile>/<name>), next to the test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace` (or `cargo test --workspace`) first",
        bin.display()
    );
    bin
}

/// A host-process agent in its own temporary directory, killed (and its cgroup and sockets
/// removed) on drop.
#[derive(Debug)]
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub state_dir: PathBuf,
    child: Child,
}

/// The cgroup v2 directory tests put their containers under: the unified hierarchy of a
/// hybrid host, or the root of a cgroup v2 host.
pub fn test_cgroup_parent() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            nix::sys::statfs::statfs(p)
                .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
                .unwrap_or(false)
        })
}

impl TestAgent {
    pub fn start() -> TestAgent {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("husk-agent-test")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("agent.sock");
        let state_dir = dir.path().join("state");
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let cgroup_root = test_cgroup_parent().map(|p| p.join(name));
        let mut cmd = Command::new(workspace_bin("husk-agent"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--log")
            .arg("debug")
            .stdin(Stdio::null());
        match &cgroup_root {
            Some(c) => cmd.arg("--cgroup-root").arg(c),
            None => cmd.arg("--cgroup-root").arg("none"),
        };
        let child = cmd.spawn().expect("spawning husk-agent");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() || !PathBuf::from(format!("{}.stdio", socket.display())).exists() {
            assert!(
                Instant::now() < deadline,
                "husk-agent did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        TestAgent {
            dir,
            socket,
            cgroup_root,
            state_dir,
            child,
        }
    }

    pub fn addr(&self) -> AgentAddr {
        AgentAddr::Unix(self.socket.clone())
    }

    pub async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.addr(), Duration::from_secs(10))
            .await
            .expect("connecting to the test agent")
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        if let Some(c) = &self.cgroup_root {
            // Sandbox and container cgroups are the agent's to remove; the root is ours.
            let _ = std::fs::remove_dir(c);
        }
    }
}

/// What a finished process gave.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
    pub status: i32,
    pub oom_killed: bool,
}

/// Creates a container from `spec` on `rootfs`, attaches its output, starts it, feeds
/// `stdin` (if any), and waits for it.
pub async fn run_container(
    c: &AgentClient,
    id: &str,
    spec: &oci_spec::runtime::Spec,
    rootfs: &Path,
    stdin: Option<&[u8]>,
) -> Finished {
    create_container(c, id, spec, rootfs, stdin.is_some())
        .await
        .expect("create_container");
    let (out, err) = (
        c.open_stream(id, "", StdioStream::Stdout).await.unwrap(),
        c.open_stream(id, "", StdioStream::Stderr).await.unwrap(),
    );
    let input = match stdin {
        Some(_) => Some(c.open_stream(id, "", StdioStream::Stdin).await.unwrap()),
        None => None,
    };
    let mut req = pb::StartContainerRequest::new();
    req.container_id = id.into();
    c.start_container(req).await.expect("start_container");
    if let (Some(mut w), Some(data)) = (input, stdin) {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    }
    finish(c, id, "", out, Some(err)).await
}

/// Reads a process's output streams to the end and waits for its exit.
pub async fn finish(
    c: &AgentClient,
    id: &str,
    exec_id: &str,
    mut out: Box<dyn husk_client::Conn>,
    err: Option<Box<dyn husk_client::Conn>>,
) -> Finished {
    let out_task = tokio::spawn(async move {
        let mut s = Vec::new();
        out.read_to_end(&mut s).await.unwrap();
        s
    });
    let err_task = err.map(|mut e| {
        tokio::spawn(async move {
            let mut s = Vec::new();
            e.read_to_end(&mut s).await.unwrap();
            s
        })
    });
    let mut req = pb::WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    let w = c.wait_process(req).await.expect("wait_process");
    let stdout = String::from_utf8_lossy(&out_task.await.unwrap()).into_owned();
    let stderr = match err_task {
        Some(t) => String::from_utf8_lossy(&t.await.unwrap()).into_owned(),
        None => String::new(),
    };
    Finished {
        stdout,
        stderr,
        status: w.exit_status,
        oom_killed: w.oom_killed,
    }
}

/// Sends CreateContainer for `spec` on the rootfs directory `rootfs`.
pub async fn create_container(
    c: &AgentClient,
    id: &str,
    spec: &oci_spec::runtime::Spec,
    rootfs: &Path,
    stdin: bool,
) -> Result<u32, husk_client::ClientError> {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(spec).unwrap();
    let mut r = pb::Rootfs::new();
    r.set_path(rootfs.display().to_string());
    req.rootfs = Some(r).into();
    req.stdin = stdin;
    c.create_container(req).await.map(|r| r.pid)
}

/// Removes a container.
pub async fn remove(c: &AgentClient, id: &str) {
    let mut req = pb::RemoveContainerRequest::new();
    req.container_id = id.into();
    c.remove_container(req).await.expect("remove_container");
}
