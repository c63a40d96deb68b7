//! The netlink requests husk's pod networking makes, over a route netlink socket of the
//! calling thread's network namespace. Each failure names what it was doing.

use std::io;

use futures_util::stream::{StreamExt, TryStreamExt};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkMessage,
};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::error::NetlinkError;

/// The priority (`pref`) of husk's redirect filters: how teardown tells them from others.
pub const FILTER_PRIORITY: u16 = 0x4875;
/// `ETH_P_ALL` as the kernel wants it in `tcm_info`: network byte order.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`; filters on it have it as parent.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// A route netlink connection bound to the current thread's network namespace.
#[derive(Debug)]
pub(crate) struct Rtnl {
    handle: Handle,
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |e| {
        let source = match e {
            rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
            other => io::Error::other(other.to_string()),
        };
        NetlinkError::new(op, source)
    }
}

impl Rtnl {
    /// Opens the socket and spawns its connection task on the current tokio runtime.
    pub(crate) fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetlinkError::new("opening a route netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    /// Every interface in the namespace.
    pub(crate) async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing interfaces"))
    }

    /// Every IPv4 and IPv6 address in the namespace.
    pub(crate) async fn addresses(&self) -> Result<Vec<AddressMessage>, NetlinkError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing addresses"))
    }

    /// Every IPv4 and IPv6 route of every table.
    pub(crate) async fn routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing IPv4 routes"))?;
        let v6 = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
            .execute()
            .try_collect::<Vec<_>>()
            .await;
        match v6 {
            Ok(v6) => all.extend(v6),
            // A kernel without IPv6 (ipv6.disable=1) has no IPv6 routes to list.
            Err(rtnetlink::Error::NetlinkError(m))
                if m.to_io().raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(nl_err("listing IPv6 routes")(e)),
        }
        Ok(all)
    }

    /// Gives the interface `index` an MTU and brings it up. Before that, tells IPv6 not to
    /// make a link-local address for it (best effort: a kernel without IPv6 refuses), so the
    /// host stack sends nothing of its own through a tap that only carries the guest's frames.
    pub(crate) async fn bring_up(
        &self,
        index: u32,
        name: &str,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let no_ll = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        match self.handle.link().change(no_ll).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m))
                if m.to_io().raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(nl_err(format!("turning off IPv6 addresses of {name}"))(e)),
        }
        let up = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .change(up)
            .execute()
            .await
            .map_err(nl_err(format!("setting {name} up with MTU {mtu}")))
    }

    pub(crate) async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_err(format!("deleting {name}")))
    }

    /// The kind of the qdisc that holds the interface's ingress hook (`ingress` or `clsact`),
    /// if there is one.
    pub(crate) async fn ingress_qdisc(
        &self,
        index: u32,
        name: &str,
    ) -> Result<Option<String>, NetlinkError> {
        let qdiscs: Vec<TcMessage> = self
            .handle
            .qdisc()
            .get()
            .index(index as i32)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("listing the qdiscs of {name}")))?;
        Ok(qdiscs
            .iter()
            .filter(|q| q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS)
            .find_map(tc_kind))
    }

    pub(crate) async fn add_ingress_qdisc(
        &self,
        index: u32,
        name: &str,
    ) -> Result<(), NetlinkError> {
        self.handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl_err(format!("adding an ingress qdisc to {name}")))
    }

    /// Deletes the interface's ingress qdisc (and with it every filter on it). Only a qdisc of
    /// kind `ingress` is deleted, never a `clsact`.
    pub(crate) async fn delete_ingress_qdisc(
        &self,
        index: u32,
        name: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = TcHandle::INGRESS;
        msg.header.handle = TcHandle::from(INGRESS_HANDLE);
        msg.attributes.push(TcAttribute::Kind("ingress".into()));
        self.ack(RouteNetlinkMessage::DelQueueDiscipline(msg))
            .await
            .map_err(nl_err(format!("deleting the ingress qdisc of {name}")))
    }

    /// Adds, on `from`'s ingress, husk's filter that sends every frame out of `to`:
    /// `tc filter add dev FROM parent ffff: protocol all pref 18549 u32 match u32 0 0
    /// action mirred egress redirect dev TO`.
    pub(crate) async fn add_redirect(
        &self,
        from: (u32, &str),
        to: (u32, &str),
    ) -> Result<(), NetlinkError> {
        let op = || format!("adding a filter redirecting {} to {}", from.1, to.1);
        self.handle
            .traffic_filter(from.0 as i32)
            .add()
            .parent(INGRESS_HANDLE)
            .priority(FILTER_PRIORITY)
            .protocol(PROTOCOL_ALL)
            .redirect(to.0)
            .map_err(nl_err(op()))?
            .execute()
            .await
            .map_err(nl_err(op()))
    }

    /// The filters on the interface's ingress hook (none if it has no ingress qdisc).
    pub(crate) async fn ingress_filters(
        &self,
        index: u32,
        name: &str,
    ) -> Result<Vec<TcMessage>, NetlinkError> {
        let res: Result<Vec<TcMessage>, _> = self
            .handle
            .traffic_filter(index as i32)
            .get()
            .ingress()
            .execute()
            .try_collect()
            .await;
        match res {
            Ok(filters) => Ok(filters),
            // No ingress qdisc: nothing to list.
            Err(rtnetlink::Error::NetlinkError(m))
                if matches!(m.to_io().raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(nl_err(format!("listing the ingress filters of {name}"))(e)),
        }
    }

    /// Deletes the ingress filters of priority [`FILTER_PRIORITY`]: husk's redirect.
    pub(crate) async fn delete_redirect(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = TcHandle::from(INGRESS_HANDLE);
        msg.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(PROTOCOL_ALL);
        self.ack(RouteNetlinkMessage::DelTrafficFilter(msg))
            .await
            .map_err(nl_err(format!("deleting husk's redirect filter on {name}")))
    }

    /// Sends a request and waits for its acknowledgement.
    async fn ack(&self, msg: RouteNetlinkMessage) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut response = self.handle.clone().request(req)?;
        while let Some(reply) = response.next().await {
            if let NetlinkPayload::Error(e) = reply.payload {
                if e.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
            }
        }
        Ok(())
    }
}

/// The `TCA_KIND` of a qdisc or filter message.
pub(crate) fn tc_kind(msg: &TcMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.clone()),
        _ => None,
    })
}

/// Whether a filter message is husk's: a u32 filter at [`FILTER_PRIORITY`] (the u32 filter's
/// hash table entry, which carries no action, counts too).
pub(crate) fn is_husk_filter(msg: &TcMessage) -> bool {
    (msg.header.info >> 16) as u16 == FILTER_PRIORITY && tc_kind(msg).as_deref() == Some("u32")
}
