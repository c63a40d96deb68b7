//! Setup that must fail, and leave nothing; teardown after a crash and of nothing.

use std::path::Path;

use super::fixture::*;
use crate::net::setup::{FailPoint, Step};
use crate::net::{is_host_netns, teardown, NetnsError, PodNetwork, SetupError, TeardownError};

const TAP: &str = "husk-tap1";

/// Nothing of husk's in the pod namespace: no tap, `eth0`'s qdiscs untouched.
fn assert_nothing_left(f: &VethPod) {
    assert!(!f.pod.has_link(TAP), "a tap was left behind");
    assert_eq!(
        f.pod.qdisc_kinds("eth0"),
        ["noqueue"],
        "eth0's qdiscs changed"
    );
}

#[test]
fn a_namespace_with_only_loopback_is_refused_naming_what_is_there() {
    require_root();
    let ns = Netns::new("empty");
    let err = PodNetwork::setup(&ns.path(), TAP).unwrap_err();
    assert!(matches!(err, SetupError::NoInterface { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("no network interface") && msg.contains("lo (loopback"),
        "{msg}"
    );
    assert!(!ns.has_link(TAP));
}

#[test]
fn two_configured_interfaces_are_refused_naming_both() {
    require_root();
    let f = veth_pod();
    f.pod.ip("link add net1 type veth peer name net1-peer");
    f.pod.ip("addr add 10.100.0.5/24 dev net1");
    let err = PodNetwork::setup(&f.pod.path(), TAP).unwrap_err();
    let SetupError::SeveralInterfaces { count, found, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*count, 2, "{err}");
    assert!(found.contains("eth0 (veth, up, 10.99.0.5/24"), "{err}");
    assert!(found.contains("net1 (veth, down, 10.100.0.5/24)"), "{err}");
    assert_nothing_left(&f);
}

#[test]
fn interfaces_nobody_configured_are_left_aside() {
    require_root();
    let f = veth_pod();
    // Down and without address, like the fallback tunnels some kernels put in every namespace.
    f.pod.ip("link add idle0 type veth peer name idle1");
    let (net, info, _tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    assert_eq!(info.iface, "eth0");
    net.teardown().unwrap();
    assert_nothing_left(&f);
}

#[test]
fn bad_namespace_paths_are_refused() {
    require_root();
    let err = PodNetwork::setup(Path::new("/nonexistent/netns"), TAP).unwrap_err();
    assert!(
        matches!(err, SetupError::Netns(NetnsError::Open { .. })),
        "{err:?}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = PodNetwork::setup(file.path(), TAP).unwrap_err();
    assert!(
        matches!(err, SetupError::Netns(NetnsError::NotNetns { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("is not a network namespace"),
        "{err}"
    );
}

#[test]
fn the_host_namespace_is_recognised() {
    require_root();
    let ns = Netns::new("host");
    assert!(is_host_netns(Path::new("/proc/self/ns/net")).unwrap());
    assert!(!is_host_netns(&ns.path()).unwrap());
}

#[test]
fn a_taken_tap_name_or_ingress_is_refused() {
    require_root();
    let f = veth_pod();
    let err = PodNetwork::setup(&f.pod.path(), "eth0").unwrap_err();
    assert!(matches!(err, SetupError::TapExists { .. }), "{err:?}");
    let err = PodNetwork::setup(&f.pod.path(), "tap%d").unwrap_err();
    assert!(matches!(err, SetupError::TapName { .. }), "{err:?}");
    assert_nothing_left(&f);

    // A CNI plugin's ingress qdisc is not husk's to take over, nor to remove.
    run(
        "tc",
        &["-n", &f.pod.name, "qdisc", "add", "dev", "eth0", "ingress"],
    );
    let err = PodNetwork::setup(&f.pod.path(), TAP).unwrap_err();
    assert!(matches!(err, SetupError::IngressInUse { .. }), "{err:?}");
    assert!(
        err.to_string().contains("already has an ingress qdisc"),
        "{err}"
    );
    assert!(!f.pod.has_link(TAP));
    teardown(&f.pod.path(), TAP).unwrap();
    assert!(f.pod.qdisc_kinds("eth0").contains(&"ingress".to_string()));
}

#[test]
fn a_failure_after_any_step_leaves_nothing() {
    require_root();
    let f = veth_pod();
    for step in Step::ALL {
        let fail = FailPoint { after: Some(step) };
        let err = PodNetwork::setup_with(&f.pod.path(), TAP, fail).unwrap_err();
        assert!(
            matches!(err, SetupError::Injected(s) if s == step),
            "{err:?}"
        );
        assert_nothing_left(&f);
    }
    let (net, _, _tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    net.teardown().unwrap();
    assert_nothing_left(&f);
}

#[test]
fn teardown_by_path_cleans_up_after_a_crash() {
    require_root();
    let f = veth_pod();

    // The shim died, the VMM still holds the tap.
    let (net, _, tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    drop(net);
    teardown(&f.pod.path(), TAP).unwrap();
    assert_nothing_left(&f);
    drop(tap);

    // Both died: the tap went with its descriptor, the filter on eth0 stayed.
    let (net, _, tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    drop((net, tap));
    assert!(!f.pod.has_link(TAP));
    assert!(f.pod.qdisc_kinds("eth0").contains(&"ingress".to_string()));
    teardown(&f.pod.path(), TAP).unwrap();
    assert_nothing_left(&f);
    teardown(&f.pod.path(), TAP).unwrap();
}

#[test]
fn teardown_of_nothing_is_fine_and_takes_nothing_else() {
    require_root();
    let f = veth_pod();
    teardown(&f.pod.path(), TAP).unwrap();
    teardown(Path::new("/nonexistent/netns"), TAP).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    teardown(file.path(), TAP).expect("an unmounted namespace file: the namespace is gone");
    let err = teardown(&f.pod.path(), "eth0").unwrap_err();
    assert!(matches!(err, TeardownError::NotATap { .. }), "{err:?}");
    assert!(f.pod.has_link("eth0"), "not husk's to delete");
    assert_nothing_left(&f);
}
