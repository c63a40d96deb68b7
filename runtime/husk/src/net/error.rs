//! Why wiring a pod's network namespace to a tap, or unwiring it, failed. Messages say what was
//! being done; the cause is the `source`, printed once by whoever prints the chain.

use std::io;
use std::path::PathBuf;

/// A netlink request that failed; `op` says which (`adding an ingress qdisc to eth0`).
#[derive(Debug, thiserror::Error)]
#[error("{op}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    pub(crate) fn new(op: impl Into<String>, source: io::Error) -> Self {
        NetlinkError {
            op: op.into(),
            source,
        }
    }

    /// The errno the kernel answered with, if it answered.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// Entering a network namespace given by path.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path could not be opened (missing, no permission).
    #[error("opening network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path is not a network namespace (`setns` said EINVAL).
    #[error("{path} is not a network namespace")]
    NotNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `setns` failed otherwise (EPERM without CAP_SYS_ADMIN).
    #[error("entering network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No thread (or no async runtime on it) to do the work in the namespace.
    #[error("starting a thread in network namespace {path}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why [`PodNetwork::setup`](super::PodNetwork::setup) failed. Whatever it had made is gone.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The tap name cannot be an interface name.
    #[error("tap name {name:?} is not an interface name: {reason}")]
    TapName { name: String, reason: &'static str },
    /// An interface with the tap's name is already in the namespace (a setup without teardown?).
    #[error("network namespace {netns} already has an interface named {name}")]
    TapExists { netns: PathBuf, name: String },
    /// Nothing in the namespace to give the VM; `found` lists what is there.
    #[error("network namespace {netns} has no network interface to give the VM (found: {found})")]
    NoInterface { netns: PathBuf, found: String },
    /// More than one interface could be the pod's; husk maps exactly one.
    #[error(
        "network namespace {netns} has {count} network interfaces and husk maps exactly one: {found}"
    )]
    SeveralInterfaces {
        netns: PathBuf,
        count: usize,
        found: String,
    },
    /// The interface has no Ethernet address (an L3 device such as wireguard or tun).
    #[error("interface {iface} in {netns} is not an Ethernet interface ({kind}); the VM's NIC is")]
    NotEthernet {
        netns: PathBuf,
        iface: String,
        kind: String,
    },
    /// The interface already has an ingress (or clsact) qdisc: a CNI plugin uses it, or a
    /// previous setup was not torn down.
    #[error("interface {iface} in {netns} already has an {kind} qdisc; husk needs its ingress")]
    IngressInUse {
        netns: PathBuf,
        iface: String,
        kind: String,
    },
    /// Creating the tap device.
    #[error("creating tap {name}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A failure a test asked for, after the given step.
    #[cfg(test)]
    #[error("injected failure after {0:?}")]
    Injected(super::setup::Step),
}

/// Why a teardown failed. What could be removed was removed.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The interface with the tap's name is not a tap: husk did not make it and leaves it.
    #[error("interface {name} is a {kind} device, not husk's tap; left as it is")]
    NotATap { name: String, kind: String },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Removing port forwarding's NAT rule.
    #[error(transparent)]
    Forward(#[from] super::forward::ForwardError),
}
