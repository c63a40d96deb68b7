//! Root integration tests of the container engine against a real busybox rootfs.
//!
//! The test process plays the agent: it is a child subreaper and reaps the container
//! processes itself. Needs root (CI runs as root) and /bin/busybox (busybox-static).

use std::{
    collections::HashMap,
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::symlink,
    },
    path::{Path, PathBuf},
    sync::{Condvar, Mutex, Once},
    thread,
    time::{Duration, Instant},
};

use husk_agent::container::{
    Container, CreateError, EngineConfig, ProcessIo, RootfsSource, StartError,
};
use nix::{
    sys::{
        signal::Signal,
        wait::{waitpid, WaitStatus},
    },
    unistd::Pid,
};
use oci_spec::runtime::{Process, Spec};
use serde_json::{json, Value};

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "hostname", "ps", "ls", "sleep", "id", "mount", "grep", "true", "false",
    "touch", "mkdir", "pwd", "wc", "tty", "test", "ulimit", "head", "readlink",
];

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the engine tests need root (namespaces, mounts, cgroups); run them as root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "the engine tests need /bin/busybox (apt-get install busybox-static)"
    );
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    start_reaper();
}

/// A temporary world for one test: rootfs, state dir, cgroup root.
struct World {
    dir: tempfile::TempDir,
    cfg: EngineConfig,
    sandbox: String,
}

impl World {
    fn new(name: &str, cgroups: bool) -> World {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n",
        )
        .unwrap();
        // The unified hierarchy of a hybrid host, or the root of a cgroup v2 host.
        let cgroup_root = cgroups.then(|| {
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .map(Path::new)
                .find(|p| {
                    nix::sys::statfs::statfs(*p)
                        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
                })
                .expect("this test needs a cgroup v2 hierarchy (/sys/fs/cgroup/unified or /sys/fs/cgroup)")
                .join(format!("husk-test-{}-{name}", std::process::id()))
        });
        let cfg = EngineConfig {
            cgroup_root,
            state_dir: dir.path().join("state"),
            agent_exe: env!("CARGO_BIN_EXE_husk-agent").into(),
            layers: std::sync::Arc::new(husk_agent::container::LayerStore::new(
                dir.path().join("layers"),
                "/sys/class/block",
                dir.path().join("nodes"),
            )),
        };
        World {
            dir,
            cfg,
            sandbox: "sb".into(),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn create(&self, id: &str, spec: Value, io: ProcessIo) -> Result<Container, CreateError> {
        let spec: Spec = serde_json::from_value(spec).unwrap();
        Container::create(
            &self.cfg,
            &self.sandbox,
            id,
            spec,
            RootfsSource::Path(self.rootfs()),
            io,
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(root) = &self.cfg.cgroup_root {
            let _ = fs::remove_dir(root.join(&self.sandbox));
            let _ = fs::remove_dir(root);
        }
    }
}

fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin", "TERM=xterm"]
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    })
}

/// Pipes for a process: stdin /dev/null, stdout and stderr collected by threads.
struct Output {
    out: thread::JoinHandle<String>,
    err: thread::JoinHandle<String>,
}

impl Output {
    fn finish(self) -> (String, String) {
        (self.out.join().unwrap(), self.err.join().unwrap())
    }
}

fn collect(fd: OwnedFd) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = fs::File::from(fd).read_to_string(&mut s);
        s
    })
}

fn pipes() -> (ProcessIo, Output) {
    let stdin: OwnedFd = fs::File::open("/dev/null").unwrap().into();
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (
        ProcessIo {
            stdin,
            stdout: out_w,
            stderr: err_w,
            terminal: false,
        },
        Output {
            out: collect(out_r),
            err: collect(err_r),
        },
    )
}

/// Exit statuses collected by the reaper thread, as the agent's reaper does: every child
/// (and every orphan reparented to us) is reaped with waitpid(-1), so a zombie in a
/// container's pid namespace never keeps its init from dying.
static EXITS: Mutex<Option<HashMap<Pid, WaitStatus>>> = Mutex::new(None);
static EXITED: Condvar = Condvar::new();
static REAPER: Once = Once::new();

fn start_reaper() {
    REAPER.call_once(|| {
        *EXITS.lock().unwrap() = Some(HashMap::new());
        thread::spawn(|| loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(st) => {
                    if let Some(pid) = st.pid() {
                        EXITS.lock().unwrap().as_mut().unwrap().insert(pid, st);
                        EXITED.notify_all();
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        });
    });
}

/// Runs a helper command to its end. Its exit goes through the reaper thread (which reaps
/// every child), so `Command::status()` would race it; returns (success, stdout, stderr).
fn run_cmd(cmd: &mut std::process::Command) -> (bool, String, String) {
    use std::io::Read;
    start_reaper();
    // The reaper thread waits for it (below, through `wait`).
    #[allow(clippy::zombie_processes)]
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning a helper command");
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = wait(Pid::from_raw(child.id() as i32));
    (matches!(st, WaitStatus::Exited(_, 0)), out, err)
}

/// The exit status of `pid` (we are its parent or subreaper), within 30 s.
fn wait(pid: Pid) -> WaitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exits = EXITS.lock().unwrap();
    loop {
        if let Some(st) = exits.as_mut().unwrap().remove(&pid) {
            return st;
        }
        let now = Instant::now();
        assert!(now < deadline, "{pid} did not exit");
        exits = EXITED.wait_timeout(exits, deadline - now).unwrap().0;
    }
}

fn exit_code(st: WaitStatus) -> i32 {
    match st {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        other => panic!("unexpected {other:?}"),
    }
}

/// Creates, starts and waits for a container; returns (exit code, stdout, stderr).
fn run(w: &World, id: &str, spec: Value) -> (i32, String, String) {
    let (io, out) = pipes();
    let mut c = w.create(id, spec, io).expect("create");
    c.start().expect("start");
    let code = exit_code(wait(c.init_pid()));
    c.destroy().expect("destroy");
    let (o, e) = out.finish();
    (code, o, e)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn mountinfo_mentions(s: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(s)
}

#[test]
fn echo_output_and_exit_code() {
    let w = World::new("echo", true);
    let (code, out, err) = run(
        &w,
        "echo",
        spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    );
    assert_eq!(code, 3);
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
}

#[test]
fn hostname_comes_from_the_spec() {
    let w = World::new("hostname", false);
    let (code, out, _) = run(&w, "h", spec(&["hostname"]));
    assert_eq!((code, out.as_str()), (0, "box\n"));
}

#[test]
fn pid_namespace_shows_only_the_container() {
    let w = World::new("pidns", false);
    let (code, out, err) = run(
        &w,
        "p",
        spec(&[
            "sh",
            "-c",
            "echo $$; for p in /proc/[0-9]*; do echo ${p#/proc/}; done",
        ]),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "1\n1\n");
    let (_, out, _) = run(&w, "ps", spec(&["ps", "-o", "pid,comm"]));
    let pids: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(pids, ["1"], "{out}");
}

#[test]
fn host_mounts_are_invisible() {
    let w = World::new("mnt", false);
    let (code, out, err) = run(&w, "m", spec(&["cat", "/proc/self/mountinfo"]));
    assert_eq!(code, 0, "{err}");
    let points: Vec<&str> = out.lines().map(|l| l.split(' ').nth(4).unwrap()).collect();
    for p in &points {
        assert!(
            ["/", "/proc", "/dev", "/dev/pts", "/tmp"].contains(p),
            "unexpected mount {p} in the container: {out}"
        );
    }
}

#[test]
fn read_only_rootfs() {
    let w = World::new("ro", false);
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /x 2>/dev/null && echo wrote || echo ro; touch /tmp/y && echo tmp-ok",
    ]);
    s["root"]["readonly"] = json!(true);
    let (code, out, _) = run(&w, "ro", s);
    assert_eq!((code, out.as_str()), (0, "ro\ntmp-ok\n"));
    assert!(!w.rootfs().join("x").exists());
}

#[test]
fn exec_joins_the_running_container() {
    let w = World::new("exec", true);
    let (io, out) = pipes();
    let mut c = w.create("ex", spec(&["sleep", "30"]), io).unwrap();
    c.start().unwrap();
    let p: Process = serde_json::from_value(json!({
        "args": ["sh", "-c", "cat /proc/1/cmdline; echo; echo $$; hostname; pwd"],
        "cwd": "/tmp", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]
    }))
    .unwrap();
    let (eio, eout) = pipes();
    let pid = c.exec(&p, eio).expect("exec");
    assert_eq!(exit_code(wait(pid)), 0);
    let (o, e) = eout.finish();
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(
        lines[0].trim_end_matches('\0').replace('\0', " "),
        "sleep 30",
        "{o} {e}"
    );
    assert_ne!(lines[1], "1");
    assert!(
        lines[1].parse::<u32>().unwrap() < 100,
        "pid in the container's namespace: {o}"
    );
    assert_eq!(&lines[2..], ["box", "/tmp"]);
    // The exec'd process was in the container's cgroup, and both are listed.
    let pids = c.pids().unwrap();
    assert_eq!(pids, vec![c.init_pid()]);

    // An exec of a missing program names it.
    let p: Process = serde_json::from_value(json!({
        "args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]
    }))
    .unwrap();
    let (eio, _eout) = pipes();
    let e = c.exec(&p, eio).unwrap_err();
    assert_eq!(
        e.to_string(),
        "exec \"nope\": executable file not found in $PATH"
    );

    c.signal_all(Signal::SIGKILL).unwrap();
    assert_eq!(exit_code(wait(c.init_pid())), 128 + 9);
    c.destroy().unwrap();
    out.finish();
}

#[test]
fn bad_spec_is_a_typed_error_and_leaves_nothing() {
    let w = World::new("bad", true);
    let (io, _out) = pipes();
    let e = w.create("bad", spec(&[]), io).unwrap_err();
    assert!(matches!(e, CreateError::InvalidSpec(_)), "{e:?}");
    assert!(e.is_invalid_spec());
    assert_eq!(e.to_string(), "spec.process.args: must not be empty");
    assert!(!w.cfg.state_dir.join("bad").exists());

    // Limits without cgroup support name linux.resources.
    let w2 = World::new("bad2", false);
    let mut s = spec(&["true"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 1048576}});
    let (io, _out) = pipes();
    let e = w2.create("lim", s, io).unwrap_err();
    assert!(e.is_invalid_spec());
    assert!(e.to_string().starts_with("spec.linux.resources:"), "{e}");
}

#[test]
fn failed_setup_is_undone() {
    let w = World::new("setupfail", true);
    let mut s = spec(&["true"]);
    s["process"]["cwd"] = json!("/does/not/exist");
    let (io, _out) = pipes();
    let e = w.create("sf", s, io).unwrap_err();
    assert!(matches!(e, CreateError::Setup(_)), "{e:?}");
    let msg = chain(&e);
    assert!(msg.contains("/does/not/exist"), "{msg}");
    assert!(!w.cfg.state_dir.join("sf").exists());
    let cg = w.cfg.cgroup_root.as_ref().map(|r| r.join("sb/sf"));
    if let Some(cg) = cg {
        assert!(!cg.exists());
    }
    assert!(!mountinfo_mentions(w.rootfs().to_str().unwrap()));
}

#[test]
fn start_reports_a_missing_program() {
    let w = World::new("noprog", false);
    let (io, _out) = pipes();
    let mut c = w.create("np", spec(&["/bin/nope", "x"]), io).unwrap();
    match c.start().unwrap_err() {
        StartError::Exec { program, message } => {
            assert_eq!(program, "/bin/nope");
            assert_eq!(message, "no such file or directory");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(exit_code(wait(c.init_pid())), 127);
    c.destroy().unwrap();
}

#[test]
fn destroy_removes_everything() {
    let w = World::new("destroy", true);
    let (io, _out) = pipes();
    let mut c = w.create("d", spec(&["sleep", "30"]), io).unwrap();
    let cg = c.cgroup_path().map(Path::to_path_buf);
    if let Some(cg) = &cg {
        let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap();
        assert!(procs.contains(&c.init_pid().to_string()), "{procs}");
    }
    assert!(w.cfg.state_dir.join("d").exists());
    c.start().unwrap();
    c.destroy().unwrap();
    assert!(matches!(
        wait(c.init_pid()),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
    c.destroy().unwrap();
    assert!(!w.cfg.state_dir.join("d").exists());
    if let Some(cg) = cg {
        assert!(!cg.exists());
    }
    assert!(!mountinfo_mentions(w.rootfs().to_str().unwrap()));
}

#[test]
fn destroy_before_start() {
    let w = World::new("nostart", true);
    let (io, _out) = pipes();
    let mut c = w.create("ns", spec(&["sleep", "30"]), io).unwrap();
    c.destroy().unwrap();
    let st = wait(c.init_pid());
    assert!(
        matches!(st, WaitStatus::Signaled(..) | WaitStatus::Exited(..)),
        "{st:?}"
    );
    assert!(!w.cfg.state_dir.join("ns").exists());
}

#[test]
fn user_env_cwd() {
    let w = World::new("user", false);
    let mut s = spec(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; echo $FOO; pwd; echo $HOME",
    ]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["cwd"] = json!("/tmp");
    let (code, out, err) = run(&w, "u", s);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "1000\n1000\n1000 10 20\nbar\n/tmp\n/tmp\n");
}

#[test]
fn caps_rlimits_nnp() {
    let w = World::new("caps", false);
    let mut s = spec(&[
        "sh",
        "-c",
        "ulimit -n; grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status",
    ]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}]);
    s["process"]["noNewPrivileges"] = json!(true);
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
        "permitted": ["CAP_KILL", "CAP_CHOWN"], "inheritable": []
    });
    let (code, out, err) = run(&w, "c", s);
    assert_eq!(code, 0, "{err}");
    // CAP_CHOWN = bit 0, CAP_KILL = bit 5.
    assert!(out.starts_with("100\n"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000021"), "{out}");
    // Root's execve grants the whole bounding set (as under runc).
    assert!(out.contains("CapEff:\t0000000000000021"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");

    // A non-root user keeps exactly the ambient capability across execve, nothing else.
    let mut s = spec(&["sh", "-c", "grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
        "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]
    });
    let (code, out, err) = run(&w, "c2", s);
    assert_eq!(code, 0, "{err}");
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        assert!(
            out.contains(&format!("{set}:\t0000000000000020")),
            "{set}: {out}"
        );
    }
}

#[test]
fn masked_and_readonly_paths() {
    let w = World::new("mask", false);
    fs::write(w.rootfs().join("etc/secret"), "secret\n").unwrap();
    fs::write(w.rootfs().join("root/file"), "x").unwrap();
    let mut s = spec(&[
        "sh",
        "-c",
        "wc -c < /etc/secret; ls /root | wc -l; touch /root/new 2>/dev/null || echo root-ro; \
         echo x > /proc/sys/kernel/domainname 2>/dev/null && echo rw || echo ro",
    ]);
    s["linux"]["maskedPaths"] = json!(["/etc/secret", "/root", "/proc/nonexistent"]);
    s["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
    let (code, out, err) = run(&w, "mk", s);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "0\n0\nroot-ro\nro\n", "{err}");
    // The rootfs itself is untouched.
    assert_eq!(
        fs::read_to_string(w.rootfs().join("etc/secret")).unwrap(),
        "secret\n"
    );
}

#[test]
fn seccomp_blocks_a_syscall() {
    let w = World::new("seccomp", false);
    let mut s = spec(&["sh", "-c", "mkdir /tmp/x 2>&1; echo done"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    });
    let (code, out, err) = run(&w, "sc", s);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Function not implemented"), "{out}");
    assert!(out.ends_with("done\n"));
}

/// With no_new_privileges the filter goes on right before execve: a profile that refuses
/// read(2) must not stop the helper (which reads its start signal) from starting the program.
#[test]
fn seccomp_goes_on_after_the_helper_is_done() {
    let w = World::new("seccomp-late", false);
    let mut s = spec(&["echo", "started"]);
    s["process"]["noNewPrivileges"] = json!(true);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["read", "rt_sigaction"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (code, out, err) = run(&w, "sl", s);
    assert_eq!((code, out.as_str()), (0, "started\n"), "{err}");
}

#[test]
fn cgroup_freeze_stats_and_signals() {
    let w = World::new("cgroup", true);
    let (io, _out) = pipes();
    let mut c = w.create("cg", spec(&["sleep", "30"]), io).unwrap();
    c.start().unwrap();
    c.pause().unwrap();
    let events = fs::read_to_string(c.cgroup_path().unwrap().join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    c.resume().unwrap();
    let st = c.stats().unwrap();
    assert!(st.cpu_usage_usec > 0 || st.cpu_user_usec == 0);
    assert_eq!(c.oom_kills().unwrap(), 0);
    assert_eq!(c.pids().unwrap(), vec![c.init_pid()]);
    // sleep as pid 1 has no SIGTERM handler, so the kernel drops it; SIGKILL works.
    c.signal_all(Signal::SIGKILL).unwrap();
    assert_eq!(exit_code(wait(c.init_pid())), 137);
    c.destroy().unwrap();
}

#[test]
fn terminal_gets_a_controlling_tty() {
    let w = World::new("tty", false);
    let pty = nix::pty::openpty(None, None).unwrap();
    let io = ProcessIo {
        stdin: pty.slave.try_clone().unwrap(),
        stdout: pty.slave.try_clone().unwrap(),
        stderr: pty.slave,
        terminal: true,
    };
    let mut c = w
        .create(
            "t",
            spec(&[
                "sh",
                "-c",
                "test -t 0 && echo is-a-tty; readlink /proc/self/fd/0",
            ]),
            io,
        )
        .unwrap();
    c.start().unwrap();
    assert_eq!(exit_code(wait(c.init_pid())), 0);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let master = fs::File::from(pty.master);
    loop {
        // After the last writer is gone, the master reads EIO.
        match nix::unistd::read(master.as_raw_fd(), &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let out = String::from_utf8_lossy(&buf);
    assert!(out.contains("is-a-tty"), "{out}");
    c.destroy().unwrap();
}

#[test]
fn block_device_rootfs() {
    let w = World::new("block", true);
    let img = w.dir.path().join("rootfs.img");
    let (ok, _, err) = run_cmd(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(w.rootfs())
            .arg(&img)
            .arg("16M"),
    );
    assert!(ok, "mkfs.ext4 (e2fsprogs) failed: {err}");
    let (ok, out, err) = run_cmd(
        std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img),
    );
    assert!(ok, "this test needs a loop device (losetup -f): {err}");
    let dev = PathBuf::from(out.trim());
    let (io, output) = pipes();
    let spec: Spec =
        serde_json::from_value(spec(&["sh", "-c", "cat /etc/passwd | head -1"])).unwrap();
    let res = Container::create(
        &w.cfg,
        &w.sandbox,
        "blk",
        spec,
        RootfsSource::Block {
            source: dev.clone(),
            fstype: "ext4".into(),
            options: vec!["noatime".into()],
            readonly: true,
        },
        io,
    );
    let check = || -> (i32, String) {
        let mut c = res.expect("create");
        let mnt = w.cfg.state_dir.join("blk/rootfs");
        assert!(mountinfo_mentions(mnt.to_str().unwrap()));
        c.start().unwrap();
        let code = exit_code(wait(c.init_pid()));
        c.destroy().unwrap();
        assert!(!mountinfo_mentions(mnt.to_str().unwrap()));
        assert!(!w.cfg.state_dir.join("blk").exists());
        (code, output.finish().0)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
    let _ = run_cmd(std::process::Command::new("losetup").arg("-d").arg(&dev));
    let (code, out) = result.unwrap();
    assert_eq!((code, out.as_str()), (0, "root:x:0:0:root:/root:/bin/sh\n"));
}
