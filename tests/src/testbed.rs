//! Runs commands inside the nested-KVM testbed (`tests/testbed/run.sh`).
//!
//! The testbed is a first-level VM (L1) under QEMU TCG `-cpu max`: it has a
//! working `/dev/kvm` (nested SVM) and sees the host's root file system
//! read-only with a RAM overlay, so host binaries (our VMM, containerd, the
//! test binaries themselves) run inside it. Everything there is 10-30x slower
//! than native: give generous timeouts.
//!
//! ```no_run
//! use std::time::Duration;
//! let out = husk_tests::testbed::run("test -c /dev/kvm && echo ok", Duration::from_secs(300))?;
//! assert_eq!((out.status, out.stdout.as_str()), (0, "ok\n"));
//! # Ok::<(), husk_tests::testbed::Error>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The Debian kernel source the testbed kernel is built from.
pub const KERNEL_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// What a command printed inside the testbed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status of the command (128 + signal number if it was killed).
    pub status: i32,
    /// Its stdout and stderr, interleaved as they came over the serial console.
    pub stdout: String,
}

/// Why a command could not be run to completion in the testbed.
#[derive(Debug)]
pub enum Error {
    /// Something the testbed needs is not on this machine.
    Missing(String),
    /// `run.sh` could not be started.
    Spawn(std::io::Error),
    /// The command did not finish in time; QEMU was killed.
    Timeout {
        /// The time limit that was hit.
        after: Duration,
        /// Whether that limit was the test run's deadline (`HUSK_TEST_DEADLINE`), shorter
        /// than the one asked for.
        deadline: bool,
        /// What the command printed until then.
        stdout: String,
    },
    /// The testbed itself failed (kernel build, boot, mounts): the message of `run.sh`.
    Testbed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Missing(what) => write!(f, "the testbed needs {what}"),
            Error::Spawn(_) => write!(f, "cannot start tests/testbed/run.sh"),
            Error::Timeout {
                after, deadline, ..
            } => {
                write!(
                    f,
                    "the command did not finish within {after:?} in the testbed{}",
                    if *deadline {
                        " (all that was left before the test run's deadline, HUSK_TEST_DEADLINE)"
                    } else {
                        ""
                    }
                )
            }
            Error::Testbed(msg) => write!(f, "the testbed failed: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// How to run a command in the testbed. [`Options::default`] matches
/// `run.sh`'s defaults, with the caller's working directory.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kill the VM after this long (counted from QEMU's start, after the
    /// kernel and initramfs are built or found in the cache).
    pub timeout: Duration,
    /// Memory of the L1 VM in MiB.
    pub mem_mib: u32,
    /// vCPUs of the L1 VM.
    pub cpus: u32,
    /// Working directory of the command (default: the current one).
    pub cwd: Option<PathBuf>,
    /// Environment added to the caller's PATH, HOME, HUSK_CACHE, RUST_LOG...
    pub env: Vec<(String, String)>,
    /// QEMU's `-name`, to recognise the process (default `husk-testbed`).
    pub name: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(900),
            mem_mib: 2048,
            cpus: 2,
            cwd: None,
            env: Vec::new(),
            name: None,
        }
    }
}

/// The runner script, `tests/testbed/run.sh` of this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/run.sh")
}

/// Checks what the testbed cannot install itself: root, QEMU, the kernel source.
pub fn check_prerequisites() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Missing(
            "root (QEMU, the cache in /var/cache/husk, apt-get)".into(),
        ));
    }
    if !on_path("qemu-system-x86_64") {
        return Err(Error::Missing(
            "qemu-system-x86_64 (apt-get install qemu-system-x86)".into(),
        ));
    }
    if !Path::new(KERNEL_TARBALL).is_file() {
        return Err(Error::Missing(format!(
            "{KERNEL_TARBALL} (apt-get install linux-source-6.12)"
        )));
    }
    Ok(())
}

/// Runs `cmd` with `bash -c` in the testbed with default options and the given timeout.
pub fn run(cmd: &str, timeout: Duration) -> Result<Output, Error> {
    run_with(
        cmd,
        &Options {
            timeout,
            ..Options::default()
        },
    )
}

/// Runs `cmd` with `bash -c` in the testbed. The build and boot logs of
/// `run.sh` go to this process's stderr.
pub fn run_with(cmd: &str, opts: &Options) -> Result<Output, Error> {
    check_prerequisites()?;
    let status_file = tempfile::NamedTempFile::new().map_err(Error::Spawn)?;
    let mut command = Command::new(script());
    command
        .arg("--timeout")
        .arg(opts.timeout.as_secs().max(1).to_string())
        .arg("--mem")
        .arg(opts.mem_mib.to_string())
        .arg("--cpus")
        .arg(opts.cpus.to_string())
        .arg("--status-file")
        .arg(status_file.path());
    if let Some(cwd) = &opts.cwd {
        command.arg("--cwd").arg(cwd);
    }
    if let Some(name) = &opts.name {
        command.arg("--name").arg(name);
    }
    for (k, v) in &opts.env {
        command.arg("--env").arg(format!("{k}={v}"));
    }
    let out = command
        .args(["--", "bash", "-c", cmd])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(Error::Spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let result = std::fs::read_to_string(status_file.path()).unwrap_or_default();
    let result = result.trim_end();
    if let Some(status) = result.strip_prefix("exit ") {
        let status = status
            .parse()
            .map_err(|_| Error::Testbed(format!("bad status line {result:?}")))?;
        Ok(Output { status, stdout })
    } else if let Some(rest) = result.strip_prefix("timeout") {
        // "timeout SECS [deadline]": run.sh cuts the timeout to the test run's deadline.
        let mut words = rest.split_whitespace();
        let after = words
            .next()
            .and_then(|secs| secs.parse().ok())
            .map_or(opts.timeout, Duration::from_secs);
        Err(Error::Timeout {
            after,
            deadline: words.next() == Some("deadline"),
            stdout,
        })
    } else if let Some(msg) = result.strip_prefix("error ") {
        Err(Error::Testbed(msg.to_string()))
    } else {
        Err(Error::Testbed(format!(
            "run.sh ended with {} without reporting a result",
            out.status
        )))
    }
}

/// Whether a file `tool` is in a directory of PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Panics, naming the first of `tools` that is not on PATH (scripts/setup.sh installs them).
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        assert!(on_path(tool), "{tool} is missing: run scripts/setup.sh");
    }
}

/// Runs one of the CRI scripts of `tests/scripts` in the testbed against containerd with
/// this build's husk (`SCRIPT REPO HUSK ARGS...`, the interface of soak.sh, faults.sh and
/// bad-input.sh), prints its output, and checks that it exited 0. Needs root and the tools
/// containerd's tests need.
pub fn run_cri_script(script: &str, args: &[String], timeout: Duration, mem_mib: u32) -> Output {
    crate::agent::require_root();
    require_tools(&["containerd", "ctr", "runc", "crictl"]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let husk = crate::agent::workspace_bin("husk");
    let cmd = format!(
        "bash {}/tests/scripts/{script} {} {} {}",
        repo.display(),
        repo.display(),
        husk.display(),
        args.join(" ")
    );
    let out = run_with(
        &cmd,
        &Options {
            timeout,
            mem_mib,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| match e {
        Error::Timeout { ref stdout, .. } => panic!(
            "{script} in the testbed: {e}; its last lines:\n{}",
            crate::sections::tail(stdout, 40)
        ),
        e => panic!("{script} in the testbed: {e}"),
    });
    println!("{}", out.stdout);
    assert_eq!(
        out.status,
        0,
        "{script} failed; its last lines:\n{}",
        crate::sections::tail(&out.stdout, 40)
    );
    out
}
