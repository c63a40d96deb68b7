//! The wiring itself, run on a thread inside the pod's network namespace: read the CNI
//! interface, create the tap, redirect each one's ingress to the other; and the teardown that
//! removes what husk added, whether its setup state survived or not.

use std::os::fd::OwnedFd;
use std::path::Path;

use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;

use super::error::{NetlinkError, SetupError, TeardownError};
use super::info::{
    address_of, is_loopback, is_up, link_kind, link_mac, link_mtu, link_name, order_routes,
    route_of, NetInfo,
};
use super::rtnl::{is_husk_filter, Rtnl};
use super::tap;

/// The steps of the wiring after the tap exists, for tests that make setup fail after each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    TapCreated,
    TapUp,
    TapRedirect,
    IfaceQdisc,
    IfaceRedirect,
}

impl Step {
    #[cfg(test)]
    pub(crate) const ALL: [Step; 5] = [
        Step::TapCreated,
        Step::TapUp,
        Step::TapRedirect,
        Step::IfaceQdisc,
        Step::IfaceRedirect,
    ];
}

/// Where a test wants setup to fail; nothing outside tests.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FailPoint {
    #[cfg(test)]
    pub(crate) after: Option<Step>,
}

impl FailPoint {
    fn check(&self, step: Step) -> Result<(), SetupError> {
        #[cfg(test)]
        if self.after == Some(step) {
            return Err(SetupError::Injected(step));
        }
        let _ = step;
        Ok(())
    }
}

/// What a successful setup made.
#[derive(Debug)]
pub(crate) struct Wired {
    pub(crate) info: NetInfo,
    pub(crate) tap: OwnedFd,
}

/// What setup has made so far, to remove again if a later step fails.
#[derive(Debug, Default)]
struct Undo {
    tap: Option<u32>,
    iface_qdisc: Option<(u32, String)>,
}

impl Undo {
    async fn run(self, rtnl: &Rtnl, tap_name: &str) {
        if let Some((index, name)) = self.iface_qdisc {
            if let Err(e) = gone_is_fine(rtnl.delete_ingress_qdisc(index, &name).await) {
                tracing::warn!(error = %e, source = %e.source, "undoing a failed network setup");
            }
        }
        if let Some(index) = self.tap {
            // Usually gone already: the tap's only descriptor was closed.
            if let Err(e) = gone_is_fine(rtnl.delete_link(index, tap_name).await) {
                tracing::warn!(error = %e, source = %e.source, "undoing a failed network setup");
            }
        }
    }
}

/// Treats "no such device/qdisc/filter" as done: teardown is idempotent.
fn gone_is_fine(res: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match res {
        Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(()),
        other => other,
    }
}

/// `name (kind, up, 10.0.0.2/24)`: how an interface is named in error messages.
fn describe(link: &LinkMessage, addrs: &[AddressMessage]) -> String {
    let mut parts = vec![link_kind(link).unwrap_or_else(|| {
        if is_loopback(link) {
            "loopback".into()
        } else {
            "no kind".into()
        }
    })];
    parts.push(if is_up(link) { "up" } else { "down" }.into());
    parts.extend(
        addrs
            .iter()
            .filter(|a| a.header.index == link.header.index)
            .filter_map(address_of)
            .map(|a| a.to_string()),
    );
    format!("{} ({})", link_name(link).unwrap_or("?"), parts.join(", "))
}

/// The pod's interface: the one interface that is not loopback and that CNI configured (up,
/// or holding an address). Down interfaces without addresses are left aside: a kernel with
/// tunnel modules loaded puts such fallback devices (`sit0`, `tunl0`, ...) in every namespace.
fn pick_interface<'a>(
    netns: &Path,
    links: &'a [LinkMessage],
    addrs: &[AddressMessage],
) -> Result<&'a LinkMessage, SetupError> {
    let configured = |l: &LinkMessage| {
        is_up(l)
            || addrs
                .iter()
                .any(|a| a.header.index == l.header.index && address_of(a).is_some())
    };
    let candidates: Vec<&LinkMessage> = links
        .iter()
        .filter(|l| !is_loopback(l) && configured(l))
        .collect();
    let list = |ls: &mut dyn Iterator<Item = &LinkMessage>| {
        let names: Vec<String> = ls.map(|l| describe(l, addrs)).collect();
        if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        }
    };
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(SetupError::NoInterface {
            netns: netns.to_path_buf(),
            found: list(&mut links.iter()),
        }),
        several => Err(SetupError::SeveralInterfaces {
            netns: netns.to_path_buf(),
            count: several.len(),
            found: list(&mut several.iter().copied()),
        }),
    }
}

/// Reads the pod's interface, creates the tap and wires the two together. Runs inside the
/// namespace; on failure removes whatever it made.
pub(crate) async fn setup(
    netns: &Path,
    tap_name: &str,
    fail: FailPoint,
) -> Result<Wired, SetupError> {
    let rtnl = Rtnl::connect()?;
    let links = rtnl.links().await?;
    let addrs = rtnl.addresses().await?;
    if links.iter().any(|l| link_name(l) == Some(tap_name)) {
        return Err(SetupError::TapExists {
            netns: netns.to_path_buf(),
            name: tap_name.to_string(),
        });
    }
    let iface = pick_interface(netns, &links, &addrs)?;
    let index = iface.header.index;
    let name = link_name(iface).unwrap_or_default().to_string();
    let mac = link_mac(iface).ok_or_else(|| SetupError::NotEthernet {
        netns: netns.to_path_buf(),
        iface: name.clone(),
        kind: link_kind(iface).unwrap_or_else(|| "no kind".into()),
    })?;
    let mtu = link_mtu(iface).unwrap_or(1500);
    let info = NetInfo {
        iface: name.clone(),
        mac,
        mtu,
        addresses: addrs
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(address_of)
            .collect(),
        routes: order_routes(
            rtnl.routes()
                .await?
                .iter()
                .filter_map(|r| route_of(r, index, &name))
                .collect(),
        ),
    };
    if let Some(kind) = rtnl.ingress_qdisc(index, &name).await? {
        return Err(SetupError::IngressInUse {
            netns: netns.to_path_buf(),
            iface: name,
            kind,
        });
    }
    let mut undo = Undo::default();
    match wire(&rtnl, (index, &name), tap_name, mtu, fail, &mut undo).await {
        Ok(tap) => Ok(Wired { info, tap }),
        Err(e) => {
            undo.run(&rtnl, tap_name).await;
            Err(e)
        }
    }
}

/// The steps that change the namespace, each recorded in `undo` once done. The CNI
/// interface's ingress is redirected last, when the tap side is ready.
async fn wire(
    rtnl: &Rtnl,
    iface: (u32, &str),
    tap_name: &str,
    mtu: u32,
    fail: FailPoint,
    undo: &mut Undo,
) -> Result<OwnedFd, SetupError> {
    let fd = tap::create(tap_name).map_err(|source| SetupError::Tap {
        name: tap_name.to_string(),
        source,
    })?;
    let tap_index = rtnl
        .links()
        .await?
        .iter()
        .find(|l| link_name(l) == Some(tap_name))
        .map(|l| l.header.index)
        .ok_or_else(|| SetupError::Tap {
            name: tap_name.to_string(),
            source: std::io::Error::other("the tap vanished after it was created"),
        })?;
    undo.tap = Some(tap_index);
    fail.check(Step::TapCreated)?;
    let tap = (tap_index, tap_name);
    rtnl.bring_up(tap_index, tap_name, mtu).await?;
    fail.check(Step::TapUp)?;
    rtnl.add_ingress_qdisc(tap_index, tap_name).await?;
    rtnl.add_redirect(tap, iface).await?;
    fail.check(Step::TapRedirect)?;
    rtnl.add_ingress_qdisc(iface.0, iface.1).await?;
    undo.iface_qdisc = Some((iface.0, iface.1.to_string()));
    fail.check(Step::IfaceQdisc)?;
    rtnl.add_redirect(iface, tap).await?;
    fail.check(Step::IfaceRedirect)?;
    Ok(fd)
}

/// Removes husk's redirect filters from every interface of the namespace (with the ingress
/// qdisc they were on, once it holds nothing else) and the tap `tap_name`. Idempotent.
pub(crate) async fn teardown(tap_name: &str) -> Result<(), TeardownError> {
    let rtnl = Rtnl::connect()?;
    let links = rtnl.links().await?;
    for link in links.iter().filter(|l| !is_loopback(l)) {
        let (index, name) = (link.header.index, link_name(link).unwrap_or("?"));
        if name == tap_name {
            continue;
        }
        if !rtnl
            .ingress_filters(index, name)
            .await?
            .iter()
            .any(is_husk_filter)
        {
            continue;
        }
        gone_is_fine(rtnl.delete_redirect(index, name).await)?;
        // Setup refuses an interface whose ingress is taken, so a qdisc that held husk's
        // filter is husk's; it goes once nothing else is on it.
        if rtnl.ingress_filters(index, name).await?.is_empty()
            && rtnl.ingress_qdisc(index, name).await?.as_deref() == Some("ingress")
        {
            gone_is_fine(rtnl.delete_ingress_qdisc(index, name).await)?;
        }
    }
    if let Some(tap) = links.iter().find(|l| link_name(l) == Some(tap_name)) {
        let kind = link_kind(tap).unwrap_or_else(|| "no kind".into());
        if kind != "tun" {
            return Err(TeardownError::NotATap {
                name: tap_name.to_string(),
                kind,
            });
        }
        gone_is_fine(rtnl.delete_link(tap.header.index, tap_name).await)?;
    }
    Ok(())
}
