//! The short soak in the nested-KVM testbed (`tests/scripts/soak.sh`): containerd with husk,
//! cycles of husk pods in flight at once, each through every CRI step with its network, its
//! image's layers and a live volume, and after every cycle an inventory of what a pod could
//! leave behind. Every pod must go through and nothing may stay behind; the numbers (pods/s,
//! containerd's memory, the shims' fds) are printed, never asserted.
//!
//! `HUSK_SOAK_CYCLES` and `HUSK_SOAK_INFLIGHT` size it (20 and 4, CI's short soak);
//! `scripts/soak.sh` runs the long one on release builds.
//!
//! Needs root, the testbed's prerequisites, containerd, runc, the CNI plugins and crictl
//! (scripts/setup.sh).

use std::{path::Path, time::Duration};

use husk_tests::testbed;

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn short_soak_leaves_nothing_behind() {
    husk_tests::agent::require_root();
    testbed::require_tools(&["containerd", "ctr", "runc", "crictl"]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let husk = husk_tests::agent::workspace_bin("husk");
    let (cycles, inflight) = (
        env_or("HUSK_SOAK_CYCLES", 20),
        env_or("HUSK_SOAK_INFLIGHT", 4),
    );
    let cmd = format!(
        "bash {}/tests/scripts/soak.sh {} {} {cycles} {inflight}",
        repo.display(),
        repo.display(),
        husk.display()
    );
    let out = testbed::run_with(
        &cmd,
        &testbed::Options {
            // About a minute a cycle of 4 pods under TCG, debug builds; a generous bound.
            timeout: Duration::from_secs(900 + u64::from(cycles * inflight) * 60),
            mem_mib: 2048 + inflight * 512,
            ..testbed::Options::default()
        },
    )
    .expect("the testbed ran");
    println!("{}", out.stdout);
    assert_eq!(out.status, 0, "soak.sh failed");
    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with("soak: "))
        .unwrap_or_else(|| panic!("no summary line: {}", out.stdout));
    let pods = cycles * inflight;
    assert!(
        summary.contains(&format!("{cycles} cycles, {pods} pods (0 failed)")),
        "every pod goes through: {summary}"
    );
    assert!(
        summary.contains("leaks at the end: 0"),
        "nothing left at the end: {summary}"
    );
    assert!(
        out.stdout
            .contains("counters that differed from the baseline after some cycle: 0"),
        "nothing left after any cycle: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("warm-up pod: ok"),
        "the warm-up pod: {}",
        out.stdout
    );
}
