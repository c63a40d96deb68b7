//! The agent as a host process (`husk-agent --listen unix:...`), driven over its real API with
//! a real busybox rootfs. Needs root (namespaces, mounts, cgroups): CI runs it as root.

use std::time::Duration;

use husk_client::{pb, ClientError, StdioStream};
use husk_tests::{
    agent::{create_container, finish, remove, run_container, TestAgent},
    rootfs::{busybox_rootfs, process, spec},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start_req(id: &str) -> pb::StartContainerRequest {
    let mut r = pb::StartContainerRequest::new();
    r.container_id = id.into();
    r
}

#[tokio::test]
async fn echo_output_and_exit_codes() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;

    let v = c.version().await.unwrap();
    assert_eq!(v.api_version, husk_proto::API_VERSION);

    let f = run_container(
        &c,
        "echo",
        &spec(&["echo", "hello from husk"]),
        &rootfs,
        None,
    )
    .await;
    assert_eq!(f.stdout, "hello from husk\n");
    assert_eq!(f.status, 0);
    remove(&c, "echo").await;

    let f = run_container(
        &c,
        "three",
        &spec(&["sh", "-c", "echo err >&2; exit 3"]),
        &rootfs,
        None,
    )
    .await;
    assert_eq!((f.status, f.stderr.as_str()), (3, "err\n"));
    remove(&c, "three").await;

    // Killed by SIGKILL: 128 + 9.
    create_container(&c, "killed", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    let out = c
        .open_stream("killed", "", StdioStream::Stdout)
        .await
        .unwrap();
    c.start_container(start_req("killed")).await.unwrap();
    let mut sig = pb::SignalProcessRequest::new();
    sig.container_id = "killed".into();
    sig.signal = 9;
    c.signal_process(sig).await.unwrap();
    let f = finish(&c, "killed", "", out, None).await;
    assert_eq!(f.status, 137);
    remove(&c, "killed").await;
}

#[tokio::test]
async fn large_output_is_not_lost() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    // 4 MiB, far more than a pipe holds, written before and while the client reads.
    let f = run_container(
        &c,
        "big",
        &spec(&[
            "sh",
            "-c",
            "dd if=/dev/zero bs=4096 count=1024 2>/dev/null; echo END",
        ]),
        &rootfs,
        None,
    )
    .await;
    assert_eq!(f.status, 0);
    assert_eq!(f.stdout.len(), 4096 * 1024 + 4);
    assert!(f.stdout.ends_with("END\n"));
}

#[tokio::test]
async fn stdin_is_piped_to_cat() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    let f = run_container(
        &c,
        "cat",
        &spec(&["cat"]),
        &rootfs,
        Some(b"line one\nline two\n"),
    )
    .await;
    assert_eq!(f.stdout, "line one\nline two\n");
    assert_eq!(f.status, 0);
}

#[tokio::test]
async fn namespaces_isolate_the_container() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;

    // pid: the container sees only its own processes, and its command is pid 1.
    let f = run_container(
        &c,
        "pidns",
        &spec(&["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"]),
        &rootfs,
        None,
    )
    .await;
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"1"), "{f:?}");
    // sh, ls and grep at most.
    let n: u32 = lines[1].parse().unwrap();
    assert!(n <= 3, "the container sees {n} processes: {f:?}");

    // uts: the spec's hostname.
    let f = run_container(&c, "uts", &spec(&["hostname"]), &rootfs, None).await;
    assert_eq!(f.stdout, "husk-test\n");
    let host = nix::unistd::gethostname().unwrap();
    assert_ne!(host.to_string_lossy(), "husk-test");

    // ipc: a new namespace. net: always the agent's (the VM's), even when the spec asks for
    // a new one.
    let mut s = spec(&[
        "sh",
        "-c",
        "readlink /proc/self/ns/ipc; readlink /proc/self/ns/net",
    ]);
    if let Some(linux) = s.linux_mut() {
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        ns.push(
            oci_spec::runtime::LinuxNamespaceBuilder::default()
                .typ(oci_spec::runtime::LinuxNamespaceType::Network)
                .build()
                .unwrap(),
        );
        linux.set_namespaces(Some(ns));
    }
    let f = run_container(&c, "ipcnet", &s, &rootfs, None).await;
    assert_eq!(f.status, 0, "{f:?}");
    let ours = |ns: &str| {
        std::fs::read_link(format!("/proc/self/ns/{ns}"))
            .unwrap()
            .display()
            .to_string()
    };
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{f:?}");
    assert!(
        lines[0].starts_with("ipc:[") && lines[0] != ours("ipc"),
        "{f:?}"
    );
    assert_eq!(lines[1], ours("net"), "{f:?}");

    // mount: a mount made on the host is invisible inside, and the mount table is the
    // container's own (its root is the rootfs).
    let marker = agent.dir.path().join("host-only-marker");
    std::fs::create_dir_all(&marker).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &marker,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let f = run_container(
        &c,
        "mnt",
        &spec(&["cat", "/proc/self/mountinfo"]),
        &rootfs,
        None,
    )
    .await;
    nix::mount::umount(&marker).unwrap();
    assert_eq!(f.status, 0);
    assert!(
        !f.stdout.contains("host-only-marker"),
        "host mount visible: {}",
        f.stdout
    );
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        f.stdout.lines().count() < host.lines().count(),
        "the container sees as many mounts as the host:\n{}",
        f.stdout
    );
    assert!(
        f.stdout.lines().any(|l| l.split(' ').nth(4) == Some("/")),
        "no root mount: {}",
        f.stdout
    );
}

#[tokio::test]
async fn readonly_rootfs_refuses_writes() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /newfile && echo wrote; touch /tmp/x 2>/dev/null; exit 0",
    ]);
    let mut root = s.root().clone().unwrap();
    root.set_readonly(Some(true));
    s.set_root(Some(root));
    let f = run_container(&c, "ro", &s, &rootfs, None).await;
    assert!(!f.stdout.contains("wrote"), "{f:?}");
    assert!(f.stderr.contains("Read-only file system"), "{f:?}");
    assert!(!rootfs.join("newfile").exists());
}

#[tokio::test]
async fn exec_joins_the_running_container() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    create_container(&c, "long", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    let _out = c
        .open_stream("long", "", StdioStream::Stdout)
        .await
        .unwrap();
    c.start_container(start_req("long")).await.unwrap();

    let mut req = pb::ExecProcessRequest::new();
    req.container_id = "long".into();
    req.exec_id = "ps".into();
    req.process_json = serde_json::to_vec(&process(&[
        "sh",
        "-c",
        "hostname; cat /proc/1/cmdline; echo; exit 5",
    ]))
    .unwrap();
    c.exec_process(req.clone()).await.unwrap();
    let out = c
        .open_stream("long", "ps", StdioStream::Stdout)
        .await
        .unwrap();
    let err = c
        .open_stream("long", "ps", StdioStream::Stderr)
        .await
        .unwrap();
    let f = finish(&c, "long", "ps", out, Some(err)).await;
    assert_eq!(f.stdout, "husk-test\nsleep\u{0}1000\u{0}\n", "{f:?}");
    assert_eq!(f.status, 5);

    // The same exec id twice.
    match c.exec_process(req.clone()).await {
        Err(ClientError::AlreadyExists(m)) => assert!(m.contains("ps"), "{m}"),
        other => panic!("duplicate exec id: {other:?}"),
    }

    // RemoveProcess forgets an exited exec (its id is free again); a running one stays.
    let rm = |exec: &str| {
        let mut r = pb::RemoveProcessRequest::new();
        r.container_id = "long".into();
        r.exec_id = exec.into();
        r
    };
    c.remove_process(rm("ps")).await.unwrap();
    let mut w = pb::WaitProcessRequest::new();
    w.container_id = "long".into();
    w.exec_id = "ps".into();
    assert!(matches!(
        c.wait_process(w).await,
        Err(ClientError::NotFound(_))
    ));
    c.exec_process(req).await.expect("the id is free again");
    let mut sleeper = pb::ExecProcessRequest::new();
    sleeper.container_id = "long".into();
    sleeper.exec_id = "sleeper".into();
    sleeper.process_json = serde_json::to_vec(&process(&["sleep", "1000"])).unwrap();
    c.exec_process(sleeper).await.unwrap();
    assert!(matches!(
        c.remove_process(rm("sleeper")).await,
        Err(ClientError::FailedPrecondition(_))
    ));
    assert!(matches!(
        c.remove_process(rm("")).await,
        Err(ClientError::InvalidArgument(_))
    ));

    let mut lp = pb::ListProcessesRequest::new();
    lp.container_id = "long".into();
    let pids = c.list_processes(lp).await.unwrap().pids;
    assert!(!pids.is_empty());
    remove(&c, "long").await;
}

#[tokio::test]
async fn terminal_session_with_resize() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    create_container(&c, "tty", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    c.start_container(start_req("tty")).await.unwrap();

    let mut p = process(&["sh"]);
    p.set_terminal(Some(true));
    let mut req = pb::ExecProcessRequest::new();
    req.container_id = "tty".into();
    req.exec_id = "shell".into();
    req.process_json = serde_json::to_vec(&p).unwrap();
    req.stdin = true;
    c.exec_process(req).await.unwrap();
    let mut out = c
        .open_stream("tty", "shell", StdioStream::Stdout)
        .await
        .unwrap();
    let mut input = c
        .open_stream("tty", "shell", StdioStream::Stdin)
        .await
        .unwrap();
    // No stderr stream with a terminal.
    assert!(c
        .open_stream("tty", "shell", StdioStream::Stderr)
        .await
        .is_err());

    let mut rs = pb::ResizeTerminalRequest::new();
    rs.container_id = "tty".into();
    rs.exec_id = "shell".into();
    rs.rows = 40;
    rs.cols = 100;
    c.resize_terminal(rs).await.unwrap();
    input
        .write_all(b"test -t 0 && echo IS-A-TTY; stty size; exit 4\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_to_end(&mut got))
        .await
        .expect("terminal output ends")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("IS-A-TTY"), "{text}");
    assert!(text.contains("40 100"), "{text}");
    let mut w = pb::WaitProcessRequest::new();
    w.container_id = "tty".into();
    w.exec_id = "shell".into();
    assert_eq!(c.wait_process(w).await.unwrap().exit_status, 4);

    // Resize of a process without a terminal is a precondition failure.
    let mut rs = pb::ResizeTerminalRequest::new();
    rs.container_id = "tty".into();
    rs.rows = 1;
    rs.cols = 1;
    assert!(matches!(
        c.resize_terminal(rs).await,
        Err(ClientError::FailedPrecondition(_))
    ));
    remove(&c, "tty").await;
}

#[tokio::test]
async fn terminal_starts_with_the_spec_console_size() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    create_container(&c, "sized", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    c.start_container(start_req("sized")).await.unwrap();
    let mut p = process(&["stty", "size"]);
    p.set_terminal(Some(true));
    p.set_console_size(Some(
        oci_spec::runtime::BoxBuilder::default()
            .height(25u64)
            .width(90u64)
            .build()
            .unwrap(),
    ));
    let mut req = pb::ExecProcessRequest::new();
    req.container_id = "sized".into();
    req.exec_id = "stty".into();
    req.process_json = serde_json::to_vec(&p).unwrap();
    c.exec_process(req).await.unwrap();
    let mut out = c
        .open_stream("sized", "stty", StdioStream::Stdout)
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_to_end(&mut got))
        .await
        .expect("terminal output ends")
        .unwrap();
    // No resize was sent: the size is the spec's from the start.
    assert_eq!(String::from_utf8_lossy(&got).trim(), "25 90");
    remove(&c, "sized").await;
}

#[tokio::test]
async fn errors_carry_the_right_codes() {
    let agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;

    // Unknown ids: NOT_FOUND.
    assert!(matches!(
        c.start_container(start_req("nope")).await,
        Err(ClientError::NotFound(_))
    ));
    let mut w = pb::WaitProcessRequest::new();
    w.container_id = "nope".into();
    assert!(matches!(
        c.wait_process(w).await,
        Err(ClientError::NotFound(_))
    ));

    // A spec that is not JSON, and one with no args: INVALID_ARGUMENT naming the field.
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = "bad".into();
    req.oci_spec_json = b"{not json".to_vec();
    let mut r = pb::Rootfs::new();
    r.set_path(rootfs.display().to_string());
    req.rootfs = Some(r).into();
    match c.create_container(req).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("oci_spec_json"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(&["true"]);
    let mut p = s.process().clone().unwrap();
    p.set_args(Some(vec![]));
    s.set_process(Some(p));
    match create_container(&c, "noargs", &s, &rootfs, false).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("args"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A rootfs that does not exist is named.
    match create_container(
        &c,
        "noroot",
        &spec(&["true"]),
        std::path::Path::new("/nonexistent/rootfs"),
        false,
    )
    .await
    {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("/nonexistent/rootfs"), "{m}"),
        other => panic!("created a container on a missing rootfs: {other:?}"),
    }
    // A relative cwd is named.
    let mut s = spec(&["true"]);
    let mut p = s.process().clone().unwrap();
    p.set_cwd("relative/dir".into());
    s.set_process(Some(p));
    match create_container(&c, "relcwd", &s, &rootfs, false).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("cwd"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Unknown containers for signal and remove, an unknown exec for wait: NOT_FOUND.
    let mut sig = pb::SignalProcessRequest::new();
    sig.container_id = "nope".into();
    sig.signal = 15;
    assert!(matches!(
        c.signal_process(sig).await,
        Err(ClientError::NotFound(_))
    ));
    let mut rm = pb::RemoveContainerRequest::new();
    rm.container_id = "nope".into();
    assert!(matches!(
        c.remove_container(rm).await,
        Err(ClientError::NotFound(_))
    ));

    // Duplicate id: ALREADY_EXISTS. Start twice: FAILED_PRECONDITION.
    create_container(&c, "dup", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    assert!(matches!(
        create_container(&c, "dup", &spec(&["true"]), &rootfs, false).await,
        Err(ClientError::AlreadyExists(_))
    ));
    c.start_container(start_req("dup")).await.unwrap();
    assert!(matches!(
        c.start_container(start_req("dup")).await,
        Err(ClientError::FailedPrecondition(_))
    ));
    let mut w = pb::WaitProcessRequest::new();
    w.container_id = "dup".into();
    w.exec_id = "no-such-exec".into();
    assert!(matches!(
        c.wait_process(w).await,
        Err(ClientError::NotFound(_))
    ));
    // "-" names the init process in stream headers: not an exec id.
    let mut ex = pb::ExecProcessRequest::new();
    ex.container_id = "dup".into();
    ex.exec_id = "-".into();
    ex.process_json = serde_json::to_vec(&process(&["true"])).unwrap();
    match c.exec_process(ex).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("exec_id"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A program that does not exist fails at start and says which.
    create_container(
        &c,
        "noprog",
        &spec(&["/bin/no-such-program"]),
        &rootfs,
        false,
    )
    .await
    .unwrap();
    match c.start_container(start_req("noprog")).await {
        Err(e) => assert!(e.to_string().contains("no-such-program"), "{e}"),
        Ok(_) => panic!("started a missing program"),
    }
    remove(&c, "noprog").await;
    remove(&c, "dup").await;

    // Failed creates left nothing: no container state, no cgroup.
    for id in ["bad", "noargs", "noroot", "relcwd"] {
        assert!(
            !agent.state_dir.join(id).exists(),
            "state of {id} left behind"
        );
    }
}

#[tokio::test]
async fn removal_leaves_nothing_behind() {
    let mut agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    create_container(
        &c,
        "gone",
        &spec(&["sh", "-c", "sleep 1000 & sleep 1000"]),
        &rootfs,
        false,
    )
    .await
    .unwrap();
    let _out = c
        .open_stream("gone", "", StdioStream::Stdout)
        .await
        .unwrap();
    c.start_container(start_req("gone")).await.unwrap();
    let mut lp = pb::ListProcessesRequest::new();
    lp.container_id = "gone".into();
    let pids = c.list_processes(lp).await.unwrap().pids;
    remove(&c, "gone").await;

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = rootfs.display().to_string();
    let state = agent.state_dir.display().to_string();
    assert!(
        !mountinfo.contains(&root),
        "rootfs still mounted:\n{mountinfo}"
    );
    assert!(
        !mountinfo.contains(&state),
        "state still mounted:\n{mountinfo}"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "process {pid} survived removal"
        );
    }
    if let Some(cg) = &agent.cgroup_root {
        let leftovers: Vec<_> = walk(cg);
        assert!(
            leftovers.iter().all(|p| !p.ends_with("gone")),
            "container cgroup left: {leftovers:?}"
        );
    }
    match c.start_container(start_req("gone")).await {
        Err(ClientError::NotFound(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(agent.stop().success());
    assert!(!agent.socket.exists(), "agent socket left behind");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(e.path());
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// An ext4 image of `rootfs` on a loop device; detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn of(rootfs: &std::path::Path, dir: &std::path::Path) -> LoopDevice {
        let img = dir.join("rootfs.ext4");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(rootfs)
            .arg(&img)
            .arg("64M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(st.success());
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup (util-linux)");
        assert!(out.status.success(), "losetup: {out:?}");
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

fn block_create(id: &str, s: &oci_spec::runtime::Spec, dev: &str) -> pb::CreateContainerRequest {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(s).unwrap();
    let mut bd = pb::BlockDevice::new();
    bd.source = dev.into();
    bd.fstype = "ext4".into();
    let mut r = pb::Rootfs::new();
    r.set_block(bd);
    req.rootfs = Some(r).into();
    req
}

/// A block-device rootfs is mounted by the agent itself (in its own mount namespace, which
/// the test shares): removal unmounts it, and so does a create that fails after the mount.
#[tokio::test]
async fn a_block_rootfs_is_unmounted_on_removal_and_on_a_failed_create() {
    let mut agent = TestAgent::start();
    let rootfs = busybox_rootfs(agent.dir.path());
    let dev = LoopDevice::of(&rootfs, agent.dir.path());
    let c = agent.client().await;
    let mounted = |dev: &str| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!(" {dev} ")))
    };

    c.create_container(block_create("blk", &spec(&["sleep", "1000"]), &dev.0))
        .await
        .unwrap();
    assert!(
        mounted(&dev.0),
        "{} is not mounted while the container exists",
        dev.0
    );
    c.start_container(start_req("blk")).await.unwrap();
    remove(&c, "blk").await;
    assert!(!mounted(&dev.0), "{} still mounted after removal", dev.0);

    // The cwd does not exist in the image: create fails in the container's init, after the
    // agent mounted the device and made the cgroup.
    let mut s = spec(&["true"]);
    let mut p = s.process().clone().unwrap();
    p.set_cwd("/no/such/dir".into());
    s.set_process(Some(p));
    match c
        .create_container(block_create("blkfail", &s, &dev.0))
        .await
    {
        Err(e) => assert!(e.to_string().contains("/no/such/dir"), "{e}"),
        Ok(_) => panic!("created a container with a missing cwd"),
    }
    assert!(
        !mounted(&dev.0),
        "{} left mounted by a failed create",
        dev.0
    );
    assert!(!agent.state_dir.join("blkfail").exists(), "state left");
    if let Some(cg) = &agent.cgroup_root {
        let left: Vec<_> = walk(cg)
            .into_iter()
            .filter(|p| p.ends_with("blkfail"))
            .collect();
        assert!(left.is_empty(), "cgroup left: {left:?}");
    }
    assert!(agent.stop().success());
}

/// A container in a shared PID namespace (here another container's, joined by path): when
/// its init exits, what the init forked is killed, as runc does (a private namespace's kernel
/// does it itself). Otherwise a background child holds the output open and the exit never
/// completes: containerd's StopPodSandbox waited forever on nginx's workers.
#[tokio::test]
async fn a_shared_pid_namespace_container_ends_with_its_init() {
    let agent = TestAgent::start();
    assert!(
        agent.cgroup_root.is_some(),
        "the test needs cgroup v2 (cgroup.kill)"
    );
    let rootfs = busybox_rootfs(agent.dir.path());
    let c = agent.client().await;
    let holder = create_container(&c, "holder", &spec(&["sleep", "1000"]), &rootfs, false)
        .await
        .unwrap();
    let _out = c
        .open_stream("holder", "", StdioStream::Stdout)
        .await
        .unwrap();
    c.start_container(start_req("holder")).await.unwrap();

    let mut s = spec(&["sh", "-c", "sleep 1000 & echo forked $!"]);
    let linux = s.linux_mut().as_mut().unwrap();
    let ns = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .map(|mut n| {
            if n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid {
                n.set_path(Some(format!("/proc/{holder}/ns/pid").into()));
            }
            n
        })
        .collect();
    linux.set_namespaces(Some(ns));
    let f = tokio::time::timeout(
        Duration::from_secs(30),
        run_container(&c, "forker", &s, &rootfs, None),
    )
    .await
    .expect("the exit completed although the init's child held its stdout");
    assert_eq!(f.status, 0, "{f:?}");
    let child: i32 = f
        .stdout
        .trim()
        .strip_prefix("forked ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(child > 1, "{f:?}");
    // The child is gone from the shared namespace: only the holder's sleep is left.
    let mut lp = pb::ListProcessesRequest::new();
    lp.container_id = "forker".into();
    assert_eq!(c.list_processes(lp).await.unwrap().pids, Vec::<u32>::new());
    remove(&c, "forker").await;
    remove(&c, "holder").await;
}
