//! Pod networking, host side: wires the network namespace CNI made for a pod to a tap that the
//! VMM's virtio-net device serves (Kata's "tcfilter" model, firecracker-containerd's
//! tc-redirect-tap).
//!
//! In the pod's namespace, next to the CNI interface (say `eth0`, one end of a veth pair), husk
//! creates a tap with the interface's MTU and puts an ingress qdisc on both, each with one
//! filter that sends every frame out of the other device:
//!
//! ```text
//! tc qdisc add dev eth0 ingress
//! tc filter add dev eth0 parent ffff: protocol all pref 18549 u32 match u32 0 0 \
//!     action mirred egress redirect dev TAP
//! (and the same from TAP to eth0)
//! ```
//!
//! The guest's NIC takes `eth0`'s MAC, addresses and routes ([`NetInfo`]), so to its neighbours
//! the VM *is* the pod's interface. Decisions:
//! - **u32, not matchall.** `match u32 0 0` matches every frame, as matchall does; the host
//!   kernels husk targets (this project's machines, the testbed's L1) have `cls_u32` but not
//!   `cls_matchall`, and Kata does the same.
//! - **`eth0` keeps its addresses.** Every frame arriving at `eth0` is redirected before the
//!   namespace's IP stack sees it, so the stack never answers for the guest (the tests check
//!   that an ARP request for the pod's IP reaches the tap and gets no answer from the host
//!   side), and nothing in the namespace sends of its own once CNI is done. Flushing them would
//!   change what CNI made (its `CHECK` and `DEL` expect them) and leave teardown to restore
//!   addresses and the routes that went with them.
//! - **The tap makes no IPv6 link-local address** (`addr_gen_mode none`): the host stack sends
//!   nothing into the guest through it.
//! - **The tap is not persistent**: it disappears with its last descriptor. The shim passes the
//!   descriptor to the VMM and closes its own copy, so a dead VMM takes the tap with it; the
//!   filter left on `eth0` then goes at [`teardown`].
//! - Setup refuses an interface whose ingress hook is already taken (a CNI plugin's ingress or
//!   clsact qdisc): husk's redirect would silently override it. So an ingress qdisc that holds
//!   husk's filter (priority [`FILTER_PRIORITY`]) is husk's, and teardown removes it.
//!
//! All of it runs on a thread of its own that enters the namespace (`setns`) and ends with the
//! work: the caller's threads stay in the host's namespace. The functions block; call them from
//! `tokio::task::spawn_blocking` in async code.

mod error;
mod forward;
mod info;
mod netns;
mod rtnl;
mod setup;
mod tap;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use error::{NetlinkError, NetnsError, SetupError, TeardownError};
pub use forward::{ForwardError, PortForward, CHAIN as FORWARD_CHAIN};
pub use info::{IpPrefix, MacAddr, NetInfo, ParseMacError, Route, RouteScope};
pub use netns::is_host_netns;
pub use rtnl::FILTER_PRIORITY;

/// A pod's network namespace wired to a tap; [`PodNetwork::teardown`] unwires it. Holds the
/// namespace open, so teardown works even after its path is gone.
#[derive(Debug)]
pub struct PodNetwork {
    netns: File,
    netns_path: PathBuf,
    iface: String,
    tap_name: String,
}

impl PodNetwork {
    /// Wires the network namespace at `netns` to a new tap `tap_name` (see the module doc) and
    /// returns the wiring, what the pod's interface holds, and the tap's descriptor
    /// (close-on-exec, blocking, `IFF_VNET_HDR` with the kernel's default header size: the
    /// VMM sets size and offloads). Blocks. On failure nothing it made is left.
    pub fn setup(
        netns: &Path,
        tap_name: &str,
    ) -> Result<(PodNetwork, NetInfo, OwnedFd), SetupError> {
        Self::setup_with(netns, tap_name, setup::FailPoint::default())
    }

    fn setup_with(
        netns: &Path,
        tap_name: &str,
        fail: setup::FailPoint,
    ) -> Result<(PodNetwork, NetInfo, OwnedFd), SetupError> {
        tap::validate_name(tap_name).map_err(|reason| SetupError::TapName {
            name: tap_name.to_string(),
            reason,
        })?;
        let file = netns::open(netns)?;
        let wired = netns::run_in(&file, netns, || setup::setup(netns, tap_name, fail))??;
        tracing::info!(
            netns = %netns.display(),
            iface = %wired.info.iface,
            tap = tap_name,
            "pod network wired to the tap"
        );
        let pod = PodNetwork {
            netns: file,
            netns_path: netns.to_path_buf(),
            iface: wired.info.iface.clone(),
            tap_name: tap_name.to_string(),
        };
        Ok((pod, wired.info, wired.tap))
    }

    /// Removes the filters, the qdiscs, the tap and port forwarding's rule ([`PortForward`]);
    /// the CNI interface is left as CNI made it. Idempotent. Blocks.
    pub fn teardown(&self) -> Result<(), TeardownError> {
        netns::run_in(&self.netns, &self.netns_path, || async {
            // The tap's wiring goes whatever becomes of the port forwarding rule.
            let wiring = setup::teardown(&self.tap_name).await;
            let rule = forward::remove_rule(&self.netns_path);
            wiring.and(rule.map_err(TeardownError::from))
        })?
    }

    /// The CNI interface's name in the namespace.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }
}

/// Removes what [`PodNetwork::setup`] and [`PortForward::setup`] made in the namespace at `netns` for the tap `tap_name`,
/// without its [`PodNetwork`] (after a crash, from `shim delete`). Idempotent: nothing there
/// (no namespace at that path any more, no tap, no filter) is fine. Blocks.
pub fn teardown(netns: &Path, tap_name: &str) -> Result<(), TeardownError> {
    let file = match netns::open(netns) {
        Ok(file) => file,
        Err(NetnsError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let work = || async {
        let wiring = setup::teardown(tap_name).await;
        let rule = forward::remove_rule(netns);
        wiring.and(rule.map_err(TeardownError::from))
    };
    match netns::run_in(&file, netns, work) {
        Ok(res) => res,
        // The bind mount is gone and an empty file is left: the namespace died with all in it.
        Err(NetnsError::NotNetns { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
