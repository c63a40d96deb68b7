//! The nested-KVM testbed works: /dev/kvm inside, host files visible,
//! exit status and output come back, a timeout kills QEMU, the test run's
//! deadline cuts a run short, progress lines reach stderr as they come, and an
//! L1 that does not end after its command is killed.
//!
//! Needs root, qemu-system-x86_64 and /usr/src/linux-source-6.12.tar.xz.
//! Slow: the first run builds the L1 kernel (about 5 minutes), every test
//! boots a VM under TCG.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_tests::testbed::{self, Error, Options};

/// One L1 VM at a time: they share 2 cores with everything else.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const TIMEOUT: Duration = Duration::from_secs(600);

fn run(cmd: &str) -> testbed::Output {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    match testbed::run(cmd, TIMEOUT) {
        Ok(out) => out,
        Err(e) => panic!("testbed run of {cmd:?}: {e}"),
    }
}

#[test]
fn kvm_works_inside_l1() {
    // The kernel starts on tsc-early and moves to tsc once its refined calibration is done,
    // about a second after boot (later on a busy host): up to 20 s are given for that.
    let out = run("test -c /dev/kvm && dmesg | grep -i 'nested paging' && \
         cs=/sys/devices/system/clocksource/clocksource0/current_clocksource && \
         for i in $(seq 100); do [ \"$(cat $cs)\" = tsc ] && break; sleep 0.2; done && \
         echo clocksource=$(cat $cs) && \
         dmesg | grep 'tsc:'");
    assert_eq!(
        out.status, 0,
        "no /dev/kvm or no nested paging: {}",
        out.stdout
    );
    // L1 must know its TSC frequency: with tsc_khz 0 its KVM never enters a guest (every
    // microVM hangs before its first instruction), which happened on a busy CI host.
    assert!(
        !out.stdout.contains("could not calculate TSC khz"),
        "L1 has no TSC frequency: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("clocksource=tsc\n"),
        "L1 does not run on its TSC: {}",
        out.stdout
    );

    // KVM_GET_API_VERSION from inside L1, by this very test binary (the host's
    // files are visible there).
    let exe = std::env::current_exe().expect("current_exe");
    let out = run(&format!(
        "HUSK_TESTBED_PROBE=1 {} --ignored --exact probe_kvm_api_version --nocapture --test-threads=1",
        exe.display()
    ));
    assert_eq!(out.status, 0, "probe failed: {}", out.stdout);
    assert!(out.stdout.contains("KVM_API_VERSION=12"), "{}", out.stdout);
}

/// The boot watchdog (an L1 that has not begun the command within HUSK_TESTBED_BOOT_SECS is
/// booted again) must not take a command that runs for a boot that hangs, even when the
/// console's filter holds its lines in a buffer: an `awk -W version | grep -q mawk` that lost
/// a pipefail race once left it so, and the watchdog killed three boots of a running command.
#[test]
fn a_running_command_is_never_taken_for_a_hung_boot() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    husk_tests::agent::require_root();
    let status = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(testbed::script())
        .env("HUSK_TESTBED_BOOT_SECS", "5")
        .env("HUSK_TESTBED_BUFFERED_FILTER", "1")
        .arg("--timeout")
        .arg("300")
        .arg("--status-file")
        .arg(status.path())
        .args(["--", "bash", "-c", "echo begun; sleep 15; echo done"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run.sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result = std::fs::read_to_string(status.path()).unwrap_or_default();
    assert_eq!(result.trim(), "exit 0", "{stderr}");
    assert_eq!(stdout, "begun\ndone\n");
    assert!(!stderr.contains("booting it again"), "{stderr}");
}

/// Run inside L1 by `kvm_works_inside_l1`: prints the KVM API version.
#[test]
#[ignore = "run inside the testbed by kvm_works_inside_l1"]
fn probe_kvm_api_version() {
    if std::env::var_os("HUSK_TESTBED_PROBE").is_none() {
        return;
    }
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("open /dev/kvm");
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value;
    // the fd is open for the duration of the call.
    let version = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&kvm),
            KVM_GET_API_VERSION,
            0,
        )
    };
    println!("KVM_API_VERSION={version}");
    assert_eq!(version, 12);
}

#[test]
fn host_files_are_visible_and_writes_stay_inside() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let marker = repo.join("target/.husk-testbed-write-check");
    let _ = std::fs::remove_file(&marker);
    let out = run(&format!(
        "cat {}/Cargo.toml && echo written > {} && cat {} && pwd",
        repo.display(),
        marker.display(),
        marker.display()
    ));
    assert_eq!(out.status, 0, "{}", out.stdout);
    let host_manifest = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap();
    assert!(out.stdout.starts_with(&host_manifest), "{}", out.stdout);
    assert!(out.stdout.contains("written\n"), "{}", out.stdout);
    assert!(!marker.exists(), "a write inside L1 reached the host");
}

#[test]
fn exit_status_and_output_come_back() {
    let out = run("echo out; echo err >&2; exit 7");
    assert_eq!(out.status, 7);
    assert_eq!(out.stdout, "out\nerr\n");

    let out = run("kill -9 $$");
    assert_eq!(out.status, 128 + 9);
}

#[test]
fn timeout_kills_qemu() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("husk-testbed-timeout-{}", std::process::id());
    let opts = Options {
        timeout: Duration::from_secs(20),
        name: Some(name.clone()),
        ..Options::default()
    };
    // Build (or find) the kernel first so the timeout only covers QEMU.
    testbed::run_with("true", &opts).expect("warm-up run");

    let start = Instant::now();
    match testbed::run_with("echo started; sleep 3600", &opts) {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, opts.timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    let strays: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| {
            String::from_utf8_lossy(cmdline)
                .split('\0')
                .any(|arg| arg == name)
        })
        .collect();
    assert!(strays.is_empty(), "QEMU left running after the timeout");
}

/// run.sh itself (not through [`testbed::run_with`], so that its environment and stderr are
/// this test's alone): (status file line, stderr, how long it took).
fn run_script(env: &[(&str, String)], args: &[&str]) -> (String, String, Duration) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let status = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let out = std::process::Command::new(testbed::script())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--status-file")
        .arg(status.path())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run.sh");
    let line = std::fs::read_to_string(status.path()).unwrap();
    (
        line.trim_end().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn the_test_runs_deadline_cuts_a_run_short_and_progress_comes_as_it_goes() {
    // Build (or find) the kernel first, so that the deadline only covers QEMU.
    run("true");
    let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap();
    let deadline = secs(std::time::SystemTime::now()) + Duration::from_secs(60);
    let (status, stderr, took) = run_script(
        &[("HUSK_TEST_DEADLINE", deadline.as_secs().to_string())],
        &[
            "--timeout",
            "900",
            "--",
            "bash",
            "-c",
            "echo '=== a section'; echo 'not progress'; sleep 3600",
        ],
    );
    let cut: u64 = status
        .strip_prefix("timeout ")
        .and_then(|rest| rest.strip_suffix(" deadline"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a timeout at the deadline: {status:?}\n{stderr}"));
    assert!((30..=60).contains(&cut), "cut to {cut} s: {status:?}");
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("testbed| +") && l.ends_with(" === a section")),
        "the section line came to stderr: {stderr}"
    );
    assert!(!stderr.contains("not progress"), "{stderr}");

    // Past the deadline, nothing starts.
    let (status, stderr, _) = run_script(
        &[(
            "HUSK_TEST_DEADLINE",
            (deadline.as_secs() - 3600).to_string(),
        )],
        &["--", "true"],
    );
    assert!(
        status.starts_with("error ") && status.contains("HUSK_TEST_DEADLINE"),
        "{status:?}\n{stderr}"
    );
}

#[test]
fn an_l1_still_there_after_its_command_ended_is_killed() {
    // The command's end is its status line on the console, as init.sh prints it before it
    // reboots L1; a command that prints it and goes on stands for an L1 whose reboot hangs.
    let (status, stderr, took) = run_script(
        &[],
        &[
            "--timeout",
            "600",
            "--",
            "bash",
            "-c",
            "echo HUSK-TESTBED-EXIT=3 uptime=1; sleep 3600",
        ],
    );
    assert_eq!(status, "exit 3", "{stderr}");
    assert!(took < Duration::from_secs(200), "took {took:?}: {stderr}");
    assert!(
        stderr.contains("did not end within 30s of its command's end: QEMU killed"),
        "{stderr}"
    );
}
