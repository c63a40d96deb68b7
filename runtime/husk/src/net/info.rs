//! What the shim read from the pod's network namespace: the plain data the guest's agent needs
//! to give the VM's NIC the pod's identity ([`NetInfo`]), and the pure functions that build it
//! from netlink messages (unit-tested here without root).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteType,
};
use serde::{Deserialize, Serialize};

/// The pod's network as CNI set it up: one interface, its addresses and the routes through it.
/// DNS is not here: CRI gives the container its `resolv.conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    /// The CNI interface's name in the pod's namespace (`eth0` for most plugins).
    pub iface: String,
    /// Its MAC address; the guest NIC takes it, so neighbours' ARP caches stay right.
    pub mac: MacAddr,
    /// Its MTU; the tap and the guest NIC get the same.
    pub mtu: u32,
    /// IPv4 and IPv6 addresses, IPv6 link-local ones left out (the guest makes its own from
    /// the same MAC).
    pub addresses: Vec<IpPrefix>,
    /// Routes of the main table through the interface, IPv4 and IPv6, without the ones the
    /// kernel derives from the addresses (`proto kernel`): the guest's kernel derives those.
    /// Ordered so that adding them in order works: on-link routes (no gateway, such as the
    /// CNI ptp plugin's route to its gateway) before the routes through a gateway.
    pub routes: Vec<Route>,
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff` (also in JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not six colon-separated hex bytes.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(|| ParseMacError(s.into()))?;
            if part.len() != 2 {
                return Err(ParseMacError(s.into()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError(s.into()))?;
        }
        match parts.next() {
            None => Ok(MacAddr(mac)),
            Some(_) => Err(ParseMacError(s.into())),
        }
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

impl TryFrom<String> for MacAddr {
    type Error = ParseMacError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// An address with its prefix length (`10.88.0.5/16`, `fd00::5/64`, `0.0.0.0/0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl IpPrefix {
    /// The default route's destination for the address family of `like`.
    pub fn any(like: IpAddr) -> Self {
        let address = match like {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Self {
            address,
            prefix_len: 0,
        }
    }
}

/// `ADDR/LEN`, or a bare `ADDR` for a host prefix (/32 or /128).
impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not ADDR/PREFIX: {addr:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?} is not ADDR/PREFIX: {l:?} is not 0 to {max}"))?,
        };
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

/// One route through the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Where it leads; the default route is `0.0.0.0/0` or `::/0`.
    pub destination: IpPrefix,
    /// The next hop, if the destination is not on the link.
    pub gateway: Option<IpAddr>,
    /// The interface it leaves by (the pod's interface, [`NetInfo::iface`]).
    pub device: String,
    /// The preferred source address (`src`), if set.
    pub source: Option<IpAddr>,
    /// The metric (`metric`/`priority`), if set.
    pub metric: Option<u32>,
    /// A per-route MTU (`mtu`), if set.
    pub mtu: Option<u32>,
    /// `link` for a route to a directly reachable gateway (what the CNI ptp plugin adds).
    pub scope: RouteScope,
}

/// The scope of a route, as `ip route` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteScope {
    Universe,
    Site,
    Link,
    Host,
    Nowhere,
    Other(u8),
}

impl From<netlink_packet_route::route::RouteScope> for RouteScope {
    fn from(s: netlink_packet_route::route::RouteScope) -> Self {
        use netlink_packet_route::route::RouteScope as Nl;
        match s {
            Nl::Universe => RouteScope::Universe,
            Nl::Site => RouteScope::Site,
            Nl::Link => RouteScope::Link,
            Nl::Host => RouteScope::Host,
            Nl::NoWhere => RouteScope::Nowhere,
            other => RouteScope::Other(u8::from(other)),
        }
    }
}

/// The interface's name.
pub(crate) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The interface's kind (`veth`, `tun`, `sit`, ...), if it has one.
pub(crate) fn link_kind(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

pub(crate) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The interface's Ethernet address; `None` for an interface that is not Ethernet.
pub(crate) fn link_mac(link: &LinkMessage) -> Option<MacAddr> {
    if link.header.link_layer_type != LinkLayerType::Ether {
        return None;
    }
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr),
        _ => None,
    })
}

pub(crate) fn is_loopback(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Loopback)
}

pub(crate) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// The address an address message gives the interface (`IFA_LOCAL`, which differs from
/// `IFA_ADDRESS` on point-to-point links), with its prefix length; `None` for an IPv6
/// link-local address.
pub(crate) fn address_of(msg: &AddressMessage) -> Option<IpPrefix> {
    let find = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    let address = find(true).or_else(|| find(false))?;
    if address.is_ipv6() && msg.header.scope == AddressScope::Link {
        return None;
    }
    Some(IpPrefix {
        address,
        prefix_len: msg.header.prefix_len,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The route a route message describes, if it is one the guest must add: a unicast route of
/// the main table that leaves by `oif` (named `device`) and that the kernel did not derive from
/// an address. Multipath routes are left out (CNI plugins do not make them).
pub(crate) fn route_of(msg: &RouteMessage, oif: u32, device: &str) -> Option<Route> {
    let mut table = u32::from(msg.header.table);
    let mut out = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut metric = None;
    let mut mtu = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => out = Some(*i),
            RouteAttribute::Destination(a) => destination = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::Metrics(ms) => {
                mtu = ms.iter().find_map(|m| match m {
                    RouteMetric::Mtu(v) => Some(*v),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || msg.header.kind != RouteType::Unicast
        || msg.header.protocol == RouteProtocol::Kernel
        || out != Some(oif)
    {
        return None;
    }
    let unspecified = match msg.header.address_family {
        netlink_packet_route::AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(Route {
        destination: IpPrefix {
            address: destination.unwrap_or(unspecified),
            prefix_len: msg.header.destination_prefix_length,
        },
        gateway,
        device: device.to_string(),
        source,
        metric,
        mtu,
        scope: msg.header.scope.into(),
    })
}

/// Puts on-link routes before routes through a gateway (a gateway must be reachable when its
/// route is added), keeping the kernel's order otherwise.
pub(crate) fn order_routes(mut routes: Vec<Route>) -> Vec<Route> {
    routes.sort_by_key(|r| r.gateway.is_some());
    routes
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::RouteScope as NlScope;
    use netlink_packet_route::AddressFamily;

    use super::*;

    #[test]
    fn prefixes_parse_from_text_and_print_back() {
        for ok in ["10.0.0.2/24", "fd00::5/64", "0.0.0.0/0", "::/0"] {
            assert_eq!(ok.parse::<IpPrefix>().unwrap().to_string(), ok);
        }
        assert_eq!(
            "10.1.2.3".parse::<IpPrefix>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!("fd00::1".parse::<IpPrefix>().unwrap().prefix_len, 128);
        for (bad, why) in [
            ("10.0.0.2/33", "not 0 to 32"),
            ("fd00::1/129", "not 0 to 128"),
            ("10.0.0.2/", "not 0 to 32"),
            ("10.0.0.2/x", "not 0 to 32"),
            ("10.0.0/24", "not an IP address"),
            ("", "not an IP address"),
        ] {
            let err = bad.parse::<IpPrefix>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(
            IpPrefix::any("fd00::1".parse().unwrap()).to_string(),
            "::/0"
        );
    }

    #[test]
    fn mac_round_trips_through_text_and_json() {
        let mac: MacAddr = "02:42:0a:58:00:05".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05]);
        assert_eq!(mac.to_string(), "02:42:0a:58:00:05");
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:42:0a:58:00:05\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        for bad in [
            "",
            "02:42:0a:58:00",
            "02:42:0a:58:00:05:06",
            "2:42:0a:58:00:05",
            "zz:42:0a:58:00:05",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    fn route(family: AddressFamily, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = NlScope::Universe;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn default_route_has_unspecified_destination() {
        let gw = Ipv4Addr::new(10, 88, 0, 1);
        let msg = route(
            AddressFamily::Inet,
            vec![
                RouteAttribute::Oif(7),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)),
                RouteAttribute::Priority(100),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
        );
        let r = route_of(&msg, 7, "eth0").unwrap();
        assert_eq!(r.destination.to_string(), "0.0.0.0/0");
        assert_eq!(r.gateway, Some(IpAddr::V4(gw)));
        assert_eq!(
            (r.metric, r.mtu, r.scope),
            (Some(100), Some(1400), RouteScope::Universe)
        );
        assert_eq!(r.device, "eth0");
    }

    #[test]
    fn routes_the_guest_derives_or_cannot_use_are_left_out() {
        let v6 = |attrs| route(AddressFamily::Inet6, attrs);
        let mut kernel = v6(vec![RouteAttribute::Oif(7)]);
        kernel.header.protocol = RouteProtocol::Kernel;
        assert!(route_of(&kernel, 7, "eth0").is_none());
        let mut local = v6(vec![RouteAttribute::Oif(7)]);
        local.header.kind = RouteType::Local;
        assert!(route_of(&local, 7, "eth0").is_none());
        let mut other_table = v6(vec![RouteAttribute::Oif(7), RouteAttribute::Table(1000)]);
        other_table.header.table = 252;
        assert!(route_of(&other_table, 7, "eth0").is_none());
        assert!(route_of(&v6(vec![RouteAttribute::Oif(8)]), 7, "eth0").is_none());
        let ok = route_of(&v6(vec![RouteAttribute::Oif(7)]), 7, "eth0").unwrap();
        assert_eq!(ok.destination.to_string(), "::/0");
    }

    #[test]
    fn on_link_routes_come_before_routes_through_a_gateway() {
        // What the CNI ptp plugin makes, in the kernel's dump order (default first).
        let gw = Ipv4Addr::new(10, 1, 1, 1);
        let default = route(
            AddressFamily::Inet,
            vec![
                RouteAttribute::Oif(3),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)),
            ],
        );
        let mut to_gw = route(
            AddressFamily::Inet,
            vec![
                RouteAttribute::Oif(3),
                RouteAttribute::Destination(RouteAddress::Inet(gw)),
            ],
        );
        to_gw.header.destination_prefix_length = 32;
        to_gw.header.scope = NlScope::Link;
        let routes: Vec<Route> = [default, to_gw]
            .iter()
            .filter_map(|m| route_of(m, 3, "eth0"))
            .collect();
        let ordered = order_routes(routes);
        assert_eq!(ordered[0].destination.to_string(), "10.1.1.1/32");
        assert_eq!(ordered[0].scope, RouteScope::Link);
        assert_eq!(ordered[1].gateway, Some(IpAddr::V4(gw)));
    }

    #[test]
    fn address_prefers_local_and_skips_ipv6_link_local() {
        let mut v4 = AddressMessage::default();
        v4.header.prefix_len = 32;
        v4.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1))),
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 1, 1, 2))),
        ];
        assert_eq!(address_of(&v4).unwrap().to_string(), "10.1.1.2/32");
        let mut ll = AddressMessage::default();
        ll.header.prefix_len = 64;
        ll.header.scope = AddressScope::Link;
        ll.attributes = vec![AddressAttribute::Address("fe80::1".parse().unwrap())];
        assert!(address_of(&ll).is_none());
        ll.header.scope = AddressScope::Universe;
        assert_eq!(address_of(&ll).unwrap().to_string(), "fe80::1/64");
    }

    #[test]
    fn net_info_serializes_as_plain_data() {
        let info = NetInfo {
            iface: "eth0".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            mtu: 1500,
            addresses: vec![IpPrefix {
                address: "10.88.0.5".parse().unwrap(),
                prefix_len: 16,
            }],
            routes: vec![],
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["mac"], "02:00:00:00:00:01");
        assert_eq!(json["addresses"][0]["address"], "10.88.0.5");
        assert_eq!(serde_json::from_value::<NetInfo>(json).unwrap(), info);
    }
}
