//! Bad input through CRI in the nested-KVM testbed (`tests/scripts/bad-input.sh`): each case
//! is refused with an error naming the problem, or runs as CRI defines the value; the pod
//! stays healthy after every one, and nothing of it is left once it is removed.
//!
//! Needs root, the testbed's prerequisites, containerd, runc, the CNI plugins and crictl
//! (scripts/setup.sh).

use std::time::Duration;

use husk_tests::testbed;

/// Cases that must be refused, and a word the error must hold (naming the problem).
const REFUSED: &[(&str, &str)] = &[
    ("memory-negative", "linux.resources.memory.limit"),
    ("command-empty", "args"),
    ("device-host", "host devices cannot be passed"),
    ("id-reused", "reserved"),
    // The OOM killer ends the container's setup; the agent names the limit.
    ("memory-tiny", "OOM killer"),
    ("exec-stopped", "CONTAINER_EXITED"),
    // containerd looks the name up in the image's /etc/passwd, which busybox's lacks.
    ("user-unknown", "passwd"),
];

/// Cases that may run as CRI (and runc) define the value, or be refused with the kernel's or
/// the agent's error: a negative CPU quota is no quota (as runc has it), a period of 0 is
/// unset, an absurd limit is no limit in effect; 100,000 environment entries pass execve's limit (E2BIG).
const EITHER: &[&str] = &[
    "memory-absurd",
    "cpu-quota-negative",
    "cpu-period-zero",
    "cpu-period-absurd",
    "cpu-shares-absurd",
    "cpuset-bad",
    "annotation-huge",
    "annotation-binary",
    "env-100000",
    "mount-dotdot",
];

#[test]
fn bad_input_is_refused_and_leaves_the_pod_healthy() {
    let out = testbed::run_cri_script("bad-input.sh", &[], Duration::from_secs(900), 3072);
    let text = &out.stdout;
    assert!(text.contains("warm-up pod: ok"), "{text}");
    let case = |name: &str| -> String {
        let prefix = format!("case {name}: ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no case {name}: {text}"))
            .to_string()
    };
    for (name, word) in REFUSED {
        let c = case(name);
        assert!(c.starts_with("refused"), "{name} must be refused: {c}");
        assert!(
            c.to_lowercase().contains(&word.to_lowercase()),
            "{name}: the error names the problem ({word:?}): {c}"
        );
        assert!(c.ends_with("pod healthy"), "{name}: {c}");
    }
    for name in EITHER {
        let c = case(name);
        assert!(
            c.starts_with("refused") || c.starts_with("ran: state CONTAINER_RUNNING"),
            "{name}: {c}"
        );
        assert!(c.ends_with("pod healthy"), "{name}: {c}");
    }
    // A `..` in a mount's destination never reaches outside the container's root: if the
    // container ran, its write through the mount is in the volume.
    if case("mount-dotdot").starts_with("ran") {
        assert!(
            text.contains("mount-dotdot: the volume's file: inside"),
            "{text}"
        );
    }
    assert!(text.contains("after: clean"), "{text}");
}
