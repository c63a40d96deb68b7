//! Setup on a real veth pod: what it reads, what tc shows, frames both ways through the
//! redirect, and a teardown that leaves the pod's interface as CNI made it.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use netlink_packet_route::tc::{
    TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
    TcMessage, TcMirrorActionType, TcOption,
};
use serde_json::Value;

use super::fixture::*;
use crate::net::info::link_name;
use crate::net::rtnl::{is_husk_filter, Rtnl};
use crate::net::{is_host_netns, netns, PodNetwork, RouteScope, FILTER_PRIORITY};

const TAP: &str = "husk-tap0";

/// The pod interface's addresses and routes as `ip` shows them, to compare before and after.
fn cni_state(pod: &Netns) -> (Value, Vec<Value>, Vec<Value>) {
    let link = pod.ip_json("link show dev eth0")[0].clone();
    let strip = |mut v: Value| {
        // Counters and the qdisc change with traffic and with husk's ingress.
        for key in ["qdisc", "txqlen"] {
            v.as_object_mut().unwrap().remove(key);
        }
        v
    };
    let addrs: Vec<Value> = pod.ip_json("addr show dev eth0")[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| serde_json::json!([a["local"], a["prefixlen"]]))
        .collect();
    let mut routes = pod.ip_json("route show").as_array().unwrap().clone();
    routes.extend(
        pod.ip_json("-6 route show")
            .as_array()
            .unwrap()
            .iter()
            .cloned(),
    );
    (strip(link), addrs, routes)
}

/// Asserts that `dev`'s ingress holds husk's filter and that it redirects to `to`.
fn assert_redirect(pod: &Netns, dev: &str, to: &str) {
    let qdiscs = pod.qdisc_kinds(dev);
    assert!(
        qdiscs.iter().any(|k| k == "ingress"),
        "{dev} qdiscs: {qdiscs:?}"
    );
    let filters = pod.tc_json(&format!("filter show dev {dev} ingress"));
    let filters = filters.as_array().unwrap();
    assert!(!filters.is_empty(), "no filter on {dev}");
    for f in filters {
        assert_eq!(f["kind"], "u32", "{f}");
        assert_eq!(f["protocol"], "all", "{f}");
        assert_eq!(f["pref"], u64::from(FILTER_PRIORITY), "{f}");
    }
    let with_action: Vec<&Value> = filters
        .iter()
        .filter(|f| f["options"]["actions"].is_array())
        .collect();
    assert_eq!(with_action.len(), 1, "{filters:?}");
    let opts = &with_action[0]["options"];
    assert_eq!(opts["match"]["mask"], "0", "matches every frame: {opts}");
    let action = &opts["actions"][0];
    assert_eq!(action["kind"], "mirred", "{action}");
    assert_eq!(action["mirred_action"], "redirect", "{action}");
    assert_eq!(action["direction"], "egress", "{action}");
    assert_eq!(action["to_dev"], to, "{action}");
}

/// The interface a filter redirects to with `mirred egress redirect`, if it does.
fn redirect_target(msg: &TcMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => actions
                .iter()
                .flat_map(|a| &a.attributes)
                .find_map(|a| match a {
                    TcActionAttribute::Options(opts) => opts.iter().find_map(|o| match o {
                        TcActionOption::Mirror(TcActionMirrorOption::Parms(p))
                            if p.eaction == TcMirrorActionType::EgressRedir =>
                        {
                            Some(p.ifindex)
                        }
                        _ => None,
                    }),
                    _ => None,
                }),
            _ => None,
        }),
        _ => None,
    })
}

/// Checks through netlink (not tc's rendering) that each device's husk filter redirects to the
/// other device's index.
fn assert_redirect_by_netlink(pod: &Netns, a: &str, b: &str) {
    let file = File::open(pod.path()).unwrap();
    netns::run_in(&file, &pod.path(), || async {
        let rtnl = Rtnl::connect().unwrap();
        let links = rtnl.links().await.unwrap();
        let index = |n: &str| {
            links
                .iter()
                .find(|l| link_name(l) == Some(n))
                .unwrap()
                .header
                .index
        };
        for (from, to) in [(a, b), (b, a)] {
            let filters = rtnl.ingress_filters(index(from), from).await.unwrap();
            assert!(filters.iter().all(is_husk_filter), "{from}: {filters:?}");
            let targets: Vec<u32> = filters.iter().filter_map(redirect_target).collect();
            assert_eq!(targets, [index(to)], "{from} redirects to {to}");
        }
    })
    .unwrap();
}

#[test]
fn setup_reads_the_pod_interface_and_redirects_both_ways() {
    require_root();
    let f = veth_pod();
    let before = cni_state(&f.pod);
    let (net, info, tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();

    // The caller's thread stays in the host's namespace.
    assert!(is_host_netns(Path::new("/proc/thread-self/ns/net")).unwrap());
    assert_eq!((net.iface(), net.tap_name()), ("eth0", TAP));

    assert_eq!(info.iface, "eth0");
    assert_eq!(info.mac.to_string(), POD_MAC);
    assert_eq!(info.mtu, POD_MTU);
    let addrs: Vec<String> = info.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        addrs,
        ["10.99.0.5/24", "fd00:99::5/64"],
        "no link-local, IPv4 first"
    );
    let routes: Vec<String> = info
        .routes
        .iter()
        .map(|r| format!("{} via {:?} dev {}", r.destination, r.gateway, r.device))
        .collect();
    assert_eq!(
        routes,
        [
            "0.0.0.0/0 via Some(10.99.0.1) dev eth0",
            "::/0 via Some(fd00:99::1) dev eth0"
        ],
        "the connected routes are the guest kernel's to make"
    );
    let v6 = &info.routes[1];
    assert_eq!(
        (v6.metric, v6.mtu, v6.scope),
        (Some(1024), Some(1300), RouteScope::Universe)
    );

    // The tap: its MTU, up, no address of its own.
    let link = &f.pod.ip_json(&format!("-d link show dev {TAP}"))[0];
    assert_eq!(link["mtu"], POD_MTU);
    assert_eq!(link["linkinfo"]["info_kind"], "tun");
    assert_eq!(link["linkinfo"]["info_data"]["type"], "tap");
    assert_eq!(link["linkinfo"]["info_data"]["vnet_hdr"], true);
    assert_eq!(link["linkinfo"]["info_data"]["persist"], false);
    assert!(
        link["flags"].as_array().unwrap().contains(&"UP".into()),
        "{link}"
    );
    let tap_addrs = &f.pod.ip_json(&format!("addr show dev {TAP}"))[0]["addr_info"];
    assert_eq!(
        tap_addrs,
        &serde_json::json!([]),
        "no IPv6 link-local on the tap"
    );

    assert_redirect(&f.pod, "eth0", TAP);
    assert_redirect(&f.pod, TAP, "eth0");
    assert_redirect_by_netlink(&f.pod, "eth0", TAP);

    // A frame into the veth from outside comes out of the tap, behind a virtio-net header.
    let outside = f.outside.packet_socket("veth0");
    let pod_mac = info.mac.0;
    let inbound = frame(pod_mac, OUTSIDE_MAC, b"husk: outside to the guest");
    write_all(&outside, &inbound);
    let got = read_until(&tap, Duration::from_secs(5), |b| {
        contains(b, b"outside to the guest")
    });
    let got = got.unwrap_or_else(|others| panic!("not on the tap; got {others:?}"));
    assert_eq!(&got[VNET_HDR_LEN..], &inbound[..], "the frame, unchanged");

    // A frame the guest writes to the tap leaves by the veth.
    let outbound = frame(OUTSIDE_MAC, pod_mac, b"husk: guest to outside");
    let mut with_hdr = vec![0u8; VNET_HDR_LEN];
    with_hdr.extend_from_slice(&outbound);
    write_all(&tap, &with_hdr);
    let got = read_until(&outside, Duration::from_secs(5), |b| {
        contains(b, b"guest to outside")
    });
    let got = got.unwrap_or_else(|others| panic!("not out of the veth; got {others:?}"));
    assert_eq!(got, outbound);

    net.teardown().unwrap();
    assert!(!f.pod.has_link(TAP), "the tap is gone");
    assert_eq!(
        f.pod.qdisc_kinds("eth0"),
        ["noqueue"],
        "no ingress qdisc on eth0"
    );
    assert_eq!(
        f.pod.tc_json("filter show dev eth0 ingress"),
        serde_json::json!([])
    );
    assert_eq!(cni_state(&f.pod), before, "eth0 as CNI made it");
    net.teardown()
        .expect("a second teardown finds nothing to do");
    drop(tap);
}

/// ARP request for 10.99.0.5 from 10.99.0.1 (the outside end), broadcast.
fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&OUTSIDE_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&OUTSIDE_MAC);
    f.extend_from_slice(&[10, 99, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 99, 0, 5]);
    f.resize(60, 0);
    f
}

fn is_arp_reply(b: &[u8]) -> bool {
    b.len() >= 22 && b[12..14] == [0x08, 0x06] && b[20..22] == [0, 2]
}

/// Why the pod's interface keeps its addresses: with them still on `eth0`, the namespace's IP
/// stack never sees the frames for the pod's IP and never answers for the guest.
#[test]
fn the_pod_namespace_stack_does_not_answer_for_the_guest() {
    require_root();
    let f = veth_pod();
    let outside = f.outside.packet_socket("veth0");

    // Before the wiring the namespace answers ARP for its address (the check can see replies).
    write_all(&outside, &arp_request());
    let reply = read_until(&outside, Duration::from_secs(5), is_arp_reply);
    assert!(reply.is_ok(), "the unwired namespace answers ARP");
    f.pod.ip("neigh flush dev eth0");

    let (net, _info, tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    write_all(&outside, &arp_request());
    let on_tap = read_until(&tap, Duration::from_secs(5), |b| {
        b.len() > VNET_HDR_LEN && arp_request() == b[VNET_HDR_LEN..]
    });
    assert!(on_tap.is_ok(), "the ARP request reaches the guest's tap");
    let reply = read_until(&outside, Duration::from_millis(1500), is_arp_reply);
    assert!(
        reply.is_err(),
        "the namespace answered for the guest: {reply:?}"
    );
    net.teardown().unwrap();
}

/// The CNI ptp plugin's layout: a /32 address, an on-link route to the gateway, the default
/// route through it. The kernel lists the default route first; NetInfo puts it last.
#[test]
fn ptp_routes_come_in_an_order_the_guest_can_add() {
    require_root();
    let f = bare_veth_pod();
    f.pod.ip("addr add 10.1.1.2/32 dev eth0");
    f.pod.ip("route add 10.1.1.1 dev eth0 scope link");
    f.pod
        .ip("route add default via 10.1.1.1 dev eth0 src 10.1.1.2");
    let (net, info, _tap) = PodNetwork::setup(&f.pod.path(), TAP).unwrap();
    let routes: Vec<String> = info
        .routes
        .iter()
        .map(|r| {
            format!(
                "{} {:?} {:?} {:?}",
                r.destination, r.gateway, r.scope, r.source
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            "10.1.1.1/32 None Link None",
            "0.0.0.0/0 Some(10.1.1.1) Universe Some(10.1.1.2)"
        ]
    );
    net.teardown().unwrap();
}
