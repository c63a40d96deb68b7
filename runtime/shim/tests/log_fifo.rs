//! The shim's daemon and its log FIFO, the way containerd starts it: in the task's bundle, whose
//! `log` FIFO containerd holds open for reading. When containerd is killed before the daemon
//! opens it (inside runp), nobody ever will: the daemon must give up and exit, not wait forever
//! (it used to, and was left on the node for good).

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// The daemon as containerd's `shim start` runs it, in `bundle`, with no containerd listening.
fn daemon(bundle: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_containerd-shim-husk-v2"))
        .current_dir(bundle)
        .env("TTRPC_ADDRESS", bundle.join("containerd.sock.ttrpc"))
        .args(["-namespace", "test", "-id", "pod", "-address"])
        .arg(bundle.join("containerd.sock"))
        .arg("-socket")
        .arg(format!("unix://{}", bundle.join("shim.sock").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shim binary")
}

/// The daemon's exit and standard error, or a panic if it still runs after `limit`.
fn ended(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the shim's daemon still ran {limit:?} after it began: it waits forever on its log FIFO");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_daemon_whose_log_fifo_nobody_reads_gives_up_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("log"));
    let (status, err) = ended(daemon(dir.path()), Duration::from_secs(40));
    assert!(!status.success(), "{status}: {err}");
    assert!(
        err.contains("log FIFO") && err.contains("containerd, which starts the shim, is gone"),
        "{err}"
    );
}

#[test]
fn a_daemon_whose_log_fifo_is_read_goes_on_to_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    mkfifo(&log);
    // containerd's end, as it holds it: open for reading before the shim starts.
    let _reader: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&log)
        .unwrap();
    let (status, err) = ended(daemon(dir.path()), Duration::from_secs(40));
    // Past its log, the daemon connects to containerd's ttrpc socket, which is not there (the
    // crate's error names only the errno).
    assert!(!status.success(), "{status}: {err}");
    assert!(!err.contains("log FIFO"), "{err}");
    assert!(err.contains("ENOENT"), "{err}");
}
