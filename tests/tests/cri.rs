//! containerd end to end in the nested-KVM testbed: containerd 1.6 with its CRI plugin, a CNI
//! bridge, locally built images (pause, busybox) and crictl, running the pod and container
//! steps (runp, create, start, logs, exec, stop, rm, stopp, rmp) and timing them.
//!
//! Needs root, the testbed's prerequisites, and containerd, runc, the CNI plugins and crictl
//! (scripts/setup.sh installs them).

use std::{path::Path, time::Duration};

use husk_tests::{sections::sections, testbed};

#[test]
fn crictl_pod_lifecycle() {
    husk_tests::agent::require_root();
    for tool in ["containerd", "ctr", "runc", "crictl"] {
        assert!(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool} >/dev/null"))
                .status()
                .unwrap()
                .success(),
            "{tool} is missing: run scripts/setup.sh"
        );
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cmd = format!(
        "bash {}/tests/scripts/cri-checks.sh {}",
        repo.display(),
        repo.display()
    );
    let out = testbed::run(&cmd, Duration::from_secs(1200)).expect("the testbed ran");
    println!("{}", out.stdout);
    let s = sections(&out.stdout);
    let get = |n: &str| {
        s.get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no section {n}: {}", out.stdout))
    };

    let (text, rc) = get("containerd");
    assert_eq!(rc, Some(0), "containerd did not come up: {text}");

    // The peer: runc through the same CRI steps.
    let (text, rc) = get("runc");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("hello from the container"), "{text}");
    assert!(text.contains("exec-ok"), "{text}");
    assert!(text.contains("pods left: 0"), "{text}");
    assert!(text.contains("timing runc:"), "{text}");

    // The untrusted annotation selects husk (`husk install` registered it): the pod is a
    // microVM, and stopp/rmp leave no VMM, shim or run directory.
    let (text, rc) = get("husk");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("SANDBOX_READY"), "{text}");
    assert!(
        text.contains("vmm processes: 1\n"),
        "no microVM for the pod: {text}"
    );
    assert!(
        text.contains("after rmp: vmm 0 shim 0 run dirs 0 pods 0"),
        "{text}"
    );

    // Two pods are two microVMs. SIGKILL to one VMM: that pod's sandbox task has exited (NOT
    // READY), the other pod is untouched, and both go without leftovers.
    let (text, rc) = get("husk_two_pods");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("vmm processes: 2\n"), "{text}");
    assert!(text.contains("killed pod: SANDBOX_NOTREADY"), "{text}");
    assert!(text.contains("other pod: SANDBOX_READY"), "{text}");
    assert!(
        text.contains("after rmp: vmm 0 shim 0 run dirs 0 pods 0"),
        "{text}"
    );

    // containerd restarts: it reconnects to the pod's shim; the same VM runs on and still
    // stops cleanly.
    let (text, rc) = get("husk_restart");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("after restart: SANDBOX_READY, same vmm yes"),
        "{text}"
    );
    assert!(
        text.contains("after rmp: vmm 0 shim 0 run dirs 0 pods 0"),
        "{text}"
    );

    // A pod whose VM cannot start: runp fails saying why, nothing is left.
    let (text, rc) = get("husk_no_kernel");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("vmlinux does not exist"), "{text}");
    assert!(text.contains("after: vmm 0 shim 0 pods 0"), "{text}");
}
