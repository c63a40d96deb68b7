//! The guest's network: the one interface the VMM gives it (virtio-net, with the MAC of the
//! pod's interface on the host) configured the way the pod's network namespace on the host is
//! (MTU, addresses, routes), and loopback up. Containers share it (they get no network
//! namespace of their own: the VM is the pod's).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use husk_proto::agent as pb;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::{LinkAttribute, LinkMessage},
    route::{RouteAttribute, RouteMetric, RouteScope},
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request does not parse.
    #[error("{0}")]
    Invalid(String),
    #[error("no interface has the MAC {mac} (found: {found})")]
    NoInterface { mac: String, found: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: std::io::Error,
    },
}

/// What to configure, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mac: [u8; 6],
    /// The MAC the interface has now, if not `mac` (a template's clone).
    pub device_mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
    pub routes: Vec<PlannedRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRoute {
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub metric: Option<u32>,
    pub mtu: Option<u32>,
    pub scope: RouteScope,
}

fn invalid(msg: String) -> NetworkError {
    NetworkError::Invalid(msg)
}

fn parse_mac(s: &str) -> Result<[u8; 6], NetworkError> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid(format!("mac {s:?} is not aa:bb:cc:dd:ee:ff")))?;
    bytes
        .try_into()
        .map_err(|_| invalid(format!("mac {s:?} is not aa:bb:cc:dd:ee:ff")))
}

fn parse_prefix(p: &pb::IpPrefix, what: &str) -> Result<(IpAddr, u8), NetworkError> {
    let addr: IpAddr = p
        .address
        .parse()
        .map_err(|_| invalid(format!("{what}: {:?} is not an IP address", p.address)))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if p.prefix_len > max {
        return Err(invalid(format!(
            "{what}: prefix length {} of {addr} is over {max}",
            p.prefix_len
        )));
    }
    Ok((addr, p.prefix_len as u8))
}

fn parse_opt_ip(s: &str, what: &str) -> Result<Option<IpAddr>, NetworkError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| invalid(format!("{what}: {s:?} is not an IP address")))
}

impl Plan {
    /// Checks a request: every address, prefix and scope parses, and each route's addresses
    /// are of its destination's family.
    pub fn parse(req: &pb::ConfigureNetworkRequest) -> Result<Plan, NetworkError> {
        let mac = parse_mac(&req.mac)?;
        let device_mac = match req.device_mac.as_str() {
            "" => None,
            m => Some(parse_mac(m)?).filter(|d| *d != mac),
        };
        if !(68..=65535).contains(&req.mtu) {
            return Err(invalid(format!("mtu {} is out of 68..=65535", req.mtu)));
        }
        let addresses = req
            .addresses
            .iter()
            .map(|a| parse_prefix(a, "address"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut routes = Vec::new();
        for r in &req.routes {
            let destination = match r.destination.as_ref() {
                Some(d) => parse_prefix(d, "route destination")?,
                None => return Err(invalid("a route without a destination".into())),
            };
            let gateway = parse_opt_ip(&r.gateway, "route gateway")?;
            let source = parse_opt_ip(&r.source, "route source")?;
            for ip in [gateway, source].into_iter().flatten() {
                if ip.is_ipv4() != destination.0.is_ipv4() {
                    return Err(invalid(format!(
                        "route to {}/{}: {ip} is of the other address family",
                        destination.0, destination.1
                    )));
                }
            }
            let scope = match r.scope.as_str() {
                "" | "universe" => RouteScope::Universe,
                "link" => RouteScope::Link,
                "host" => RouteScope::Host,
                "site" => RouteScope::Site,
                other => return Err(invalid(format!("route scope {other:?} is unknown"))),
            };
            routes.push(PlannedRoute {
                destination,
                gateway,
                source,
                metric: (r.metric != 0).then_some(r.metric),
                mtu: (r.mtu != 0).then_some(r.mtu),
                scope,
            });
        }
        Ok(Plan {
            mac,
            device_mac,
            mtu: req.mtu,
            addresses,
            routes,
        })
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |e| NetworkError::Netlink {
        what,
        source: match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => std::io::Error::other(other.to_string()),
        },
    }
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", l.header.index))
}

/// Configures the guest's network as `plan` says.
pub async fn configure(plan: &Plan) -> Result<(), NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetworkError::Netlink {
        what: "opening a route netlink socket".into(),
        source: e,
    })?;
    let conn = tokio::spawn(conn);
    let r = apply(&handle, plan).await;
    conn.abort();
    r
}

async fn apply(handle: &Handle, plan: &Plan) -> Result<(), NetworkError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing interfaces"))?;
    if let Some(lo) = links.iter().find(|l| link_name(l) == "lo") {
        let up = LinkUnspec::new_with_index(lo.header.index).up().build();
        handle
            .link()
            .change(up)
            .execute()
            .await
            .map_err(nl("setting lo up"))?;
    }
    let now = plan.device_mac.unwrap_or(plan.mac);
    let mac = now.map(|b| format!("{b:02x}")).join(":");
    let Some(link) = links.iter().find(|l| link_mac(l) == Some(&now[..])) else {
        let found = links
            .iter()
            .map(|l| {
                let m = link_mac(l)
                    .map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    })
                    .unwrap_or_default();
                format!("{} {m}", link_name(l))
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(NetworkError::NoInterface { mac, found });
    };
    let (index, name) = (link.header.index, link_name(link));
    if plan.device_mac.is_some() {
        let set = LinkUnspec::new_with_index(index)
            .address(plan.mac.to_vec())
            .build();
        handle
            .link()
            .change(set)
            .execute()
            .await
            .map_err(nl(format!(
                "giving {name} the MAC {}",
                plan.mac.map(|b| format!("{b:02x}")).join(":")
            )))?;
    }
    let up = LinkUnspec::new_with_index(index).mtu(plan.mtu).up().build();
    handle
        .link()
        .change(up)
        .execute()
        .await
        .map_err(nl(format!("setting {name} up with MTU {}", plan.mtu)))?;
    for (addr, len) in &plan.addresses {
        let mut add = handle.address().add(index, *addr, *len);
        if addr.is_ipv6() {
            // The pod's interface on the host passed duplicate address detection for this
            // address already, and its stack no longer answers on the link (every frame goes
            // to the VM): detecting again would only hold the address tentative for seconds.
            add.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        add.execute()
            .await
            .map_err(nl(format!("adding {addr}/{len} to {name}")))?;
    }
    for r in &plan.routes {
        let mut msg = match r.destination.0 {
            IpAddr::V4(d) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, r.destination.1)
                    .output_interface(index)
                    .scope(r.scope);
                if let Some(IpAddr::V4(g)) = r.gateway {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V4(s)) = r.source {
                    b = b.pref_source(s);
                }
                if let Some(m) = r.metric {
                    b = b.priority(m);
                }
                b.build()
            }
            IpAddr::V6(d) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, r.destination.1)
                    .output_interface(index)
                    .scope(r.scope);
                if let Some(IpAddr::V6(g)) = r.gateway {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V6(s)) = r.source {
                    b = b.pref_source(s);
                }
                if let Some(m) = r.metric {
                    b = b.priority(m);
                }
                b.build()
            }
        };
        if let Some(mtu) = r.mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        let what = format!(
            "adding the route to {}/{}{}",
            r.destination.0,
            r.destination.1,
            r.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
        );
        // Replace: the kernel may have made the same route from an address already.
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(a: &str, l: u32) -> pb::IpPrefix {
        let mut p = pb::IpPrefix::new();
        p.address = a.into();
        p.prefix_len = l;
        p
    }

    fn request() -> pb::ConfigureNetworkRequest {
        let mut r = pb::ConfigureNetworkRequest::new();
        r.mac = "02:42:0a:58:00:05".into();
        r.mtu = 1500;
        r.addresses = vec![prefix("10.88.0.5", 16), prefix("fd00::5", 64)];
        let mut def = pb::Route::new();
        def.destination = Some(prefix("0.0.0.0", 0)).into();
        def.gateway = "10.88.0.1".into();
        let mut v6 = pb::Route::new();
        v6.destination = Some(prefix("::", 0)).into();
        v6.gateway = "fd00::1".into();
        v6.metric = 1024;
        v6.mtu = 1400;
        r.routes = vec![def, v6];
        r
    }

    #[test]
    fn a_request_becomes_a_plan() {
        let p = Plan::parse(&request()).unwrap();
        assert_eq!(p.mac, [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05]);
        assert_eq!(p.addresses[0], ("10.88.0.5".parse().unwrap(), 16));
        assert_eq!(p.routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(p.routes[0].scope, RouteScope::Universe);
        assert_eq!(
            (p.routes[1].metric, p.routes[1].mtu),
            (Some(1024), Some(1400))
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        type Breaker = fn(&mut pb::ConfigureNetworkRequest);
        let cases: [(Breaker, &str); 7] = [
            (|r| r.mac = "02:42:0a".into(), "is not aa:bb"),
            (|r| r.mac = "zz:42:0a:58:00:05".into(), "is not aa:bb"),
            (|r| r.mtu = 20, "out of 68"),
            (
                |r| r.addresses[0].address = "10.88.0".into(),
                "not an IP address",
            ),
            (|r| r.addresses[1].prefix_len = 129, "over 128"),
            (
                |r| r.routes[0].gateway = "fd00::1".into(),
                "other address family",
            ),
            (|r| r.routes[1].scope = "galaxy".into(), "scope \"galaxy\""),
        ];
        for (break_it, msg) in cases {
            let mut r = request();
            break_it(&mut r);
            let e = Plan::parse(&r).unwrap_err();
            assert!(matches!(e, NetworkError::Invalid(_)), "{e}");
            assert!(e.to_string().contains(msg), "{e} lacks {msg}");
        }
        let mut r = request();
        r.routes[0].destination = protobuf::MessageField::none();
        assert!(Plan::parse(&r)
            .unwrap_err()
            .to_string()
            .contains("without a destination"));
    }

    /// Runs `ip ARGS` (in the calling thread's network namespace) and returns its output.
    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `f` on a thread of its own in a new network namespace holding the veth pair
    /// v0-v1; as root.
    fn in_netns_with_veth(f: impl FnOnce() + Send + 'static) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace, a veth pair)"
        );
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
            f()
        })
        .join()
        .unwrap();
    }

    /// The plan applied for real, in a fresh network namespace, to one end of a veth pair
    /// found by its MAC (as the guest's virtio-net interface is).
    #[test]
    fn configures_the_interface_with_that_mac() {
        in_netns_with_veth(|| {
            ip(&["link", "set", "v1", "up"]);
            let link: serde_json::Value =
                serde_json::from_str(&ip(&["-j", "link", "show", "v0"])).unwrap();
            let mut req = request();
            req.mac = link[0]["address"].as_str().unwrap().to_string();
            req.mtu = 1400;
            let plan = Plan::parse(&req).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(configure(&plan)).unwrap();
            let link: serde_json::Value =
                serde_json::from_str(&ip(&["-j", "link", "show", "v0"])).unwrap();
            assert_eq!(link[0]["mtu"], 1400);
            assert!(link[0]["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "UP"));
            let lo: serde_json::Value =
                serde_json::from_str(&ip(&["-j", "link", "show", "lo"])).unwrap();
            assert!(lo[0]["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
            let addrs = ip(&["-j", "addr", "show", "dev", "v0"]);
            assert!(addrs.contains("\"10.88.0.5\",\"prefixlen\":16"), "{addrs}");
            assert!(addrs.contains("\"fd00::5\",\"prefixlen\":64"), "{addrs}");
            // Usable at once: no duplicate address detection holding it tentative.
            let json: serde_json::Value = serde_json::from_str(&addrs).unwrap();
            let v6 = json[0]["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["local"] == "fd00::5")
                .unwrap();
            assert_eq!(v6["nodad"], true, "{addrs}");
            assert!(v6.get("tentative").is_none(), "{addrs}");
            let v4 = ip(&["-j", "route", "show", "default"]);
            assert!(v4.contains("\"gateway\":\"10.88.0.1\""), "{v4}");
            let v6 = ip(&["-6", "-d", "-j", "route", "show", "default"]);
            assert!(v6.contains("\"gateway\":\"fd00::1\""), "{v6}");
            assert!(v6.contains("\"metric\":1024"), "{v6}");
            assert!(v6.contains("\"mtu\":1400"), "{v6}");
            // A MAC nobody has: NOT_FOUND, naming what there is.
            req.mac = "02:00:00:00:00:99".into();
            let e = rt
                .block_on(configure(&Plan::parse(&req).unwrap()))
                .unwrap_err();
            assert!(matches!(e, NetworkError::NoInterface { .. }), "{e}");
            assert!(e.to_string().contains("v0"), "{e}");
        });
    }

    /// A template's clone: its interface still has the template's MAC (`device_mac`), is
    /// found by it and given the pod's.
    #[test]
    fn an_interface_found_by_its_device_mac_is_given_the_pods() {
        in_netns_with_veth(|| {
            ip(&["link", "set", "v0", "address", "02:00:00:00:00:07"]);
            let mut req = request();
            req.device_mac = "02:00:00:00:00:07".into();
            req.mac = "02:42:0a:58:00:05".into();
            let plan = Plan::parse(&req).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(configure(&plan)).unwrap();
            let link: serde_json::Value =
                serde_json::from_str(&ip(&["-j", "link", "show", "v0"])).unwrap();
            assert_eq!(link[0]["address"], "02:42:0a:58:00:05");
            assert!(link[0]["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "UP"));
            // Found by the MAC it has now: the old one is nobody's.
            let e = rt.block_on(configure(&plan)).unwrap_err();
            assert!(matches!(e, NetworkError::NoInterface { .. }), "{e}");
        });
    }
}
