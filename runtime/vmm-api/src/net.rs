//! The VM's network interface on the command line: `--net fd=N,...` (a tap the caller opened
//! and the VMM inherits) or `--net tap=NAME,...` (an existing tap the VMM attaches to itself),
//! with the guest's MAC address and MTU.

use std::fmt;

/// A MAC address, written `02:00:00:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the address is a multicast (or broadcast) one: no NIC may have it.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A locally administered unicast address (`x2:..`, `x6:..`, `xa:..`, `xe:..`) made from
    /// `bytes`: what a NIC gets when nobody chose its address.
    pub fn local_from(mut bytes: [u8; 6]) -> MacAddr {
        bytes[0] = (bytes[0] & !1) | 2;
        MacAddr(bytes)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            *b = parts
                .next()
                .filter(|p| p.len() == 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| {
                    format!("{s:?} is not a MAC address (six hex bytes, a:b:c:d:e:f)")
                })?;
        }
        if parts.next().is_some() {
            return Err(format!(
                "{s:?} is not a MAC address (six hex bytes, a:b:c:d:e:f)"
            ));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Where the VMM's network interface gets its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendArg {
    /// A tap file descriptor the VMM inherits, opened by its caller with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (the caller may live in another network
    /// namespace; the VMM needs neither it nor CAP_NET_ADMIN).
    Fd(i32),
    /// The name of an existing tap in the VMM's network namespace: the VMM opens
    /// `/dev/net/tun` and attaches to it (`husk run --net tap:NAME`).
    Tap(String),
    /// Nothing: the NIC of a VM template, connected when a clone of it is restored with a
    /// tap. Its link is down in the guest; frames the guest sends are dropped.
    None,
}

/// The default MTU of the guest's interface.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU the guest's driver takes (ETH_MIN_MTU).
pub const MIN_MTU: u16 = 68;
/// The longest interface name Linux takes (IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// A network interface given on the command line as `fd=N[,mac=MAC][,mtu=MTU]`,
/// `tap=NAME[,mac=MAC][,mtu=MTU]` or `none[,mac=MAC][,mtu=MTU]` (unconnected). Without `mac` the VMM picks a random locally administered
/// one; without `mtu` the guest's is [`DEFAULT_MTU`]. The guest sees it as the first
/// virtio-net device (`eth0`); the VMM names it `net0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    pub backend: NetBackendArg,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u16>,
}

impl NetArg {
    /// The MTU the guest gets.
    pub fn mtu(&self) -> u16 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }
}

impl std::str::FromStr for NetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut backend = None;
        let (mut mac, mut mtu) = (None, None);
        for kv in s.split(',') {
            if kv == "none" {
                match backend {
                    Some(_) => {
                        return Err(format!("net {s:?}: give one of fd=, tap= or none, once"))
                    }
                    None => backend = Some(NetBackendArg::None),
                }
                continue;
            }
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("net {s:?}: {kv:?} is not key=value"))?;
            let set_backend = |b: NetBackendArg| match backend {
                Some(_) => Err(format!("net {s:?}: give one of fd=, tap= or none, once")),
                None => Ok(Some(b)),
            };
            match k {
                "fd" => {
                    let fd: i32 = v
                        .parse()
                        .map_err(|_| format!("net {s:?}: fd must be a number"))?;
                    if fd < 3 {
                        return Err(format!(
                            "net {s:?}: fd {fd} is stdin, stdout or stderr (or negative), not a tap"
                        ));
                    }
                    backend = set_backend(NetBackendArg::Fd(fd))?;
                }
                "tap" => {
                    let bad = v.is_empty()
                        || v.len() > MAX_IFNAME
                        || v.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
                    if bad {
                        return Err(format!(
                            "net {s:?}: {v:?} is not an interface name (1 to {MAX_IFNAME} bytes, no '/', ':' or spaces)"
                        ));
                    }
                    backend = set_backend(NetBackendArg::Tap(v.to_string()))?;
                }
                "mac" => {
                    let m: MacAddr = v.parse().map_err(|e| format!("net {s:?}: {e}"))?;
                    if m.is_multicast() {
                        return Err(format!(
                            "net {s:?}: {m} is a multicast address, not a NIC's"
                        ));
                    }
                    mac = Some(m);
                }
                "mtu" => {
                    let m: u16 = v
                        .parse()
                        .ok()
                        .filter(|m| *m >= MIN_MTU)
                        .ok_or_else(|| format!("net {s:?}: mtu must be {MIN_MTU} to 65535"))?;
                    mtu = Some(m);
                }
                other => return Err(format!("net {s:?}: unknown key {other:?}")),
            }
        }
        let backend =
            backend.ok_or_else(|| format!("net {s:?}: fd=N, tap=NAME or none is required"))?;
        Ok(NetArg { backend, mac, mtu })
    }
}

impl fmt::Display for NetArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            NetBackendArg::Fd(fd) => write!(f, "fd={fd}")?,
            NetBackendArg::Tap(name) => write!(f, "tap={name}")?,
            NetBackendArg::None => write!(f, "none")?,
        }
        if let Some(m) = self.mac {
            write!(f, ",mac={m}")?;
        }
        if let Some(m) = self.mtu {
            write!(f, ",mtu={m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_parse() {
        let n: NetArg = "fd=5,mac=02:00:00:00:00:01,mtu=1450".parse().unwrap();
        assert_eq!(n.backend, NetBackendArg::Fd(5));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(n.mtu(), 1450);
        let t: NetArg = "tap=husk0".parse().unwrap();
        assert_eq!(t.backend, NetBackendArg::Tap("husk0".into()));
        assert_eq!((t.mac, t.mtu()), (None, DEFAULT_MTU));
        let n: NetArg = "none,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.backend, NetBackendArg::None);
        assert_eq!(n.to_string(), "none,mac=02:00:00:00:00:01");
        for bad in [
            "",
            "mac=02:00:00:00:00:01",
            "fd=5,tap=x",
            "none,fd=5",
            "none,none",
            "fd=x",
            "fd=1",
            "fd=-4",
            "tap=",
            "tap=averyveryverylongname",
            "tap=a/b",
            "fd=5,mac=01:00:5e:00:00:01",
            "fd=5,mac=02:00:00:00:00",
            "fd=5,mac=02:00:00:00:00:01:02",
            "fd=5,mac=2:0:0:0:0:1",
            "fd=5,mtu=67",
            "fd=5,mtu=65536",
            "fd=5,colour=red",
            "fd=5,mtu",
        ] {
            assert!(bad.parse::<NetArg>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn nets_print_what_they_parse() {
        for s in [
            "fd=3,mac=02:00:0a:ff:00:01,mtu=1500",
            "tap=husk0",
            "tap=t,mtu=9000",
            "fd=9,mac=52:54:00:12:34:56",
        ] {
            assert_eq!(s.parse::<NetArg>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn local_macs_are_unicast_and_locally_administered() {
        for b in [[0xffu8; 6], [0; 6], [0x01, 2, 3, 4, 5, 6]] {
            let m = MacAddr::local_from(b);
            assert!(!m.is_multicast());
            assert_eq!(m.0[0] & 2, 2);
            assert_eq!(m.0[1..], b[1..]);
        }
    }
}
