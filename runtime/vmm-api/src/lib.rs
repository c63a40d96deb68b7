//! The contract between `husk-vmm` and the processes that drive it (`husk`, the shim): one
//! crate both sides use, with no KVM dependency, so that neither side builds command lines or
//! JSON by hand.
//!
//! - [`launch`]: the VMM's command line ([`launch::VmConfig`], parsed by the VMM with clap and
//!   rendered back into arguments by its callers) and its drives.
//! - [`net`]: the network interface's flag (`--net fd=N,...` or `--net tap=NAME,...`).
//! - [`files`]: the names of the sockets and logs in a VM's directory.
//! - [`drives`]: drive slots and the guest device (`/dev/vdX`) each one becomes.
//! - [`api`]: the control socket's requests and answers (one JSON line each way).
//! - [`client`]: a blocking client for the control socket.
//! - [`fdpass`]: files passed with a request line (`SCM_RIGHTS`), both sides.

pub mod api;
pub mod client;
pub mod drives;
pub mod fdpass;
pub mod files;
pub mod launch;
pub mod net;

pub use api::{Answer, DeviceStatus, Layer, Request, VcpuRegs, VcpuStatus, VmStatus};
pub use client::{Client, ClientError};
pub use launch::{DriveArg, FsArg, SeccompMode, VmConfig, EXIT_TEMPLATE_REFUSED};
pub use net::{MacAddr, NetArg, NetBackendArg};
