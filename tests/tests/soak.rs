//! The short soak in the nested-KVM testbed (`tests/scripts/soak.sh`): containerd with husk,
//! cycles of husk pods in flight at once, each through every CRI step with its network, its
//! image's layers and a live volume, and after every cycle an inventory of what a pod could
//! leave behind. Every pod must go through and nothing may stay behind; the numbers (pods/s,
//! containerd's memory, the shims' fds) are printed, never asserted.
//!
//! First, concurrency: a burst of 8 pods created at the same moment must all go through (their
//! slots, cache keys, sockets, drive images and taps must not collide).
//!
//! `HUSK_SOAK_CYCLES`, `HUSK_SOAK_INFLIGHT` and `HUSK_SOAK_BURST` size it (20, 4 and 8: CI's);
//! `scripts/soak.sh` runs the long one on release builds.
//!
//! Needs root, the testbed's prerequisites, containerd, runc, the CNI plugins and crictl
//! (scripts/setup.sh).

use std::time::Duration;

use husk_tests::{sections::tail, testbed};

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// What went wrong, from the script's output, the telling lines first (CI shows only the
/// first and last lines of a failure): the failed pods' steps and errors; the pods' own
/// evidence (the shim's errors and warnings, a VM's status and console, taken before its
/// cleanup); the reports on crictl calls that waited long (`stall: `); the rest of containerd's
/// lines about the failed pods; the cycles that left something behind; how slow the slowest
/// steps and agent RPCs were.
fn trouble(stdout: &str) -> String {
    let lines: Vec<&str> = stdout.lines().collect();
    let diagnosis = |l: &str| l.starts_with("    | ");
    let evidence = |l: &str| {
        diagnosis(l)
            && (l.contains("level=error")
                || l.contains("level=warning")
                || l.starts_with("    | the VMM's status")
                || l.starts_with("    | the guest console")
                || l.starts_with("    | console| "))
    };
    let mut out: Vec<&str> = Vec::new();
    let pick =
        |f: &dyn Fn(&str) -> bool| lines.iter().copied().filter(|l| f(l)).collect::<Vec<_>>();
    out.extend(pick(&|l| l.contains(": failed at ")));
    out.extend(pick(&evidence));
    out.extend(pick(&|l| l.starts_with("stall: ")));
    out.extend(pick(&|l| diagnosis(l) && !evidence(l)));
    out.extend(pick(&|l| {
        (l.contains(" pods ok in ") && !l.contains("; leaks: 0;"))
            || l.starts_with("slowest steps")
            || l.starts_with("agent RPCs answered only after")
            || l.starts_with("boots that hung")
    }));
    out.join("\n")
}

#[test]
fn a_burst_of_pods_then_a_short_soak_leave_nothing_behind() {
    let (cycles, inflight) = (
        env_or("HUSK_SOAK_CYCLES", 20),
        env_or("HUSK_SOAK_INFLIGHT", 4),
    );
    let burst = env_or("HUSK_SOAK_BURST", 8);
    let out = testbed::run_cri_script(
        "soak.sh",
        &[cycles, inflight, burst].map(|n| n.to_string()),
        // About 12 s a pod under TCG (4 in flight, debug builds): a bound of twice that, so
        // that a hang fails here, with its output, well inside CI's time.
        Duration::from_secs(600 + u64::from(cycles * inflight + burst) * 25),
        // L1's memory: a pod takes about 70 MiB of it (its VMM's touched guest memory, the
        // shim, virtiofsd), the installed debug binaries 400 MiB of its tmpfs root; each
        // cycle's line prints what is left.
        2048 + inflight.max(burst) * 256,
    );
    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with("soak: "))
        .unwrap_or_else(|| panic!("no summary line: {}", tail(&out.stdout, 60)));
    let pods = cycles * inflight;
    assert!(
        summary.contains(&format!("{cycles} cycles, {pods} pods (0 failed)")),
        "every pod goes through: {summary}\n{}",
        trouble(&out.stdout)
    );
    assert!(
        summary.contains("leaks at the end: 0"),
        "nothing left at the end: {summary}\n{}",
        trouble(&out.stdout)
    );
    assert!(
        out.stdout
            .contains("counters that differed from the baseline after some cycle: 0"),
        "nothing left after any cycle: {}",
        trouble(&out.stdout)
    );
    assert!(
        out.stdout.contains(&format!(
            "burst: {burst} of {burst} pods created at once went through"
        )),
        "{burst} pods created at the same moment: {}",
        trouble(&out.stdout)
    );
    assert!(
        out.stdout.contains("warm-up pod: ok"),
        "the warm-up pod: {}",
        trouble(&out.stdout)
    );
}
