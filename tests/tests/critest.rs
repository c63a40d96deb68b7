//! Conformance: cri-tools' validation suite (critest v1.34.0) against containerd 1.6 in the
//! nested-KVM testbed, once with the runc handler and once with husk's, on images from a local
//! registry (tests/scripts/critest.sh). husk must pass every spec runc passes, apart from the
//! specs a VM-isolated runtime cannot pass by design ([`BY_DESIGN`]) and those whose work is
//! still to come ([`NOT_YET`]), both also in the README.
//!
//! Needs root, the testbed's prerequisites, containerd, runc, the CNI plugins, critest and
//! ginkgo, and Debian's nginx unpacked under $HUSK_CACHE (scripts/setup.sh).

use std::{collections::BTreeMap, path::Path, time::Duration};

use husk_tests::{
    sections::{sections, tail},
    testbed,
};

/// Specs that ask a pod to share something of the host that a pod in its own VM does not
/// have: its network or IPC namespace, or its mounts. Each with the reason, as in the README.
const BY_DESIGN: &[(&str, &str)] = &[
    (
        "Security Context NamespaceOption runtime should support HostNetwork is true",
        "the pod's network is the VM's; the host's network namespace is not in it",
    ),
    (
        "Streaming runtime should support streaming interfaces runtime should support portforward in host network",
        "a host-network pod: the VM has no way into the host's network namespace",
    ),
    (
        "Security Context NamespaceOption runtime should support HostIpc is true",
        "System V IPC objects live in the guest kernel, not the host's",
    ),
    (
        "Container Mount Propagation runtime should support mount propagation mount with 'rshared' should support propagation from host to container and vice versa",
        "a mount made in the guest cannot appear on the host",
    ),
];

/// Specs husk does not pass yet and will: each names the work that makes it pass. A spec
/// here that passes fails the test, so the list only shrinks.
const NOT_YET: &[(&str, &str)] = &[];

/// One handler's results: spec name -> state (passed, failed, skipped, ...), and the lines
/// saying why failed specs failed.
fn results(text: &str, handler: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut states = BTreeMap::new();
    let mut why = BTreeMap::new();
    let mut last = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("spec {handler} ")) {
            let (head, name) = rest.split_once(" :: ").expect("a spec line");
            let state = head.split_whitespace().next().unwrap_or("?");
            states.insert(name.to_string(), state.to_string());
            last = Some(name.to_string());
        } else if let (Some(w), Some(name)) = (line.strip_prefix("  why: "), &last) {
            why.insert(name.clone(), w.to_string());
        } else if let (Some(more), Some(name)) = (line.strip_prefix("  | "), &last) {
            // The rest of a failure's message (a VM that did not boot: what the shim said).
            if let Some(w) = why.get_mut(name) {
                w.push_str(
                    "
      ",
                );
                w.push_str(more);
            }
        }
    }
    (states, why)
}

#[test]
fn critest_husk_passes_what_runc_passes() {
    husk_tests::agent::require_root();
    testbed::require_tools(&["containerd", "runc", "crictl", "critest", "ginkgo"]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cmd = format!(
        "bash {}/tests/scripts/critest.sh {}",
        repo.display(),
        repo.display()
    );
    let opts = testbed::Options {
        timeout: Duration::from_secs(2400),
        mem_mib: 4096,
        ..Default::default()
    };
    let out = testbed::run_with(&cmd, &opts).unwrap_or_else(|e| panic!("the testbed: {e}"));
    let s = sections(&out.stdout);
    let get = |n: &str| {
        s.get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no section {n}: {}", tail(&out.stdout, 60)))
    };
    let (text, rc) = get("setup");
    assert_eq!(
        rc,
        Some(0),
        "containerd or the registry did not come up: {}",
        tail(&text, 60)
    );

    let (runc_text, rc) = get("critest runc");
    assert_eq!(
        rc,
        Some(0),
        "critest did not run with runc: {}",
        tail(&runc_text, 60)
    );
    let (husk_text, rc) = get("critest husk");
    assert_eq!(
        rc,
        Some(0),
        "critest did not run with husk: {}",
        tail(&husk_text, 60)
    );
    let (runc, runc_why) = results(&runc_text, "runc");
    let (husk, husk_why) = results(&husk_text, "husk");
    for line in runc_text.lines().chain(husk_text.lines()) {
        if line.starts_with("critest ") || line.starts_with("leftovers") {
            println!("{line}");
        }
    }
    println!("failing on runc in the testbed:");
    for (name, state) in runc
        .iter()
        .filter(|(_, s)| *s != "passed" && *s != "skipped")
    {
        println!(
            "  {state} {name}\n    {}",
            runc_why.get(name).map_or("", |w| w)
        );
    }
    assert!(
        runc.len() > 100,
        "the whole suite ran for runc: {}",
        tail(&runc_text, 60)
    );
    assert_eq!(
        runc.keys().collect::<Vec<_>>(),
        husk.keys().collect::<Vec<_>>(),
        "the same specs ran for both handlers"
    );

    let mut exceptions = Vec::new();
    let mut pending = Vec::new();
    let mut regressions = Vec::new();
    for (name, state) in &runc {
        if state != "passed" || husk[name] == "passed" {
            continue;
        }
        let listed = |list: &[(&str, &'static str)]| {
            list.iter()
                .find(|(n, _)| name.trim_end().ends_with(n))
                .map(|(_, why)| *why)
        };
        if let Some(reason) = listed(BY_DESIGN) {
            exceptions.push(format!("  {name}\n    ({reason})"));
        } else if let Some(reason) = listed(NOT_YET) {
            pending.push(format!("  {name}\n    ({reason})"));
        } else {
            regressions.push(format!(
                "  {} {name}\n    {}",
                husk[name],
                husk_why.get(name).map_or("", |w| w)
            ));
        }
    }
    let now_passing: Vec<_> = NOT_YET
        .iter()
        .filter(|(n, _)| husk.iter().any(|(k, s)| k.ends_with(n) && s == "passed"))
        .map(|(n, _)| format!("  {n}"))
        .collect();
    let runc_passed = runc.values().filter(|s| *s == "passed").count();
    let husk_passed = husk.values().filter(|s| *s == "passed").count();
    println!(
        "critest passed: runc {runc_passed}, husk {husk_passed}, of {} specs",
        runc.len()
    );
    println!(
        "passes on runc, fails on husk by design ({}):\n{}",
        exceptions.len(),
        exceptions.join("\n")
    );
    println!(
        "passes on runc, fails on husk, not done yet ({}):\n{}",
        pending.len(),
        pending.join("\n")
    );
    println!(
        "passes on runc, fails on husk ({}):\n{}",
        regressions.len(),
        regressions.join("\n")
    );
    assert!(
        regressions.is_empty(),
        "husk fails specs runc passes:\n{}",
        regressions.join("\n")
    );
    assert!(
        now_passing.is_empty(),
        "specs listed as not done yet pass now: take them off NOT_YET (and the README):\n{}",
        now_passing.join("\n")
    );
    assert!(
        husk_text.contains("leftovers: pods 0 containers 0 vmm 0 shim 0"),
        "critest left pods or VMs behind: {}",
        tail(&husk_text, 60)
    );
}
