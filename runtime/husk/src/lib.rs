//! The host side of husk shared by its binaries (`husk` and `containerd-shim-husk-v2`):
//! microVMs ([`vm`]), container images ([`image`]), pod networking ([`net`]) and the
//! configuration file ([`config`]).

pub mod cgroup;
pub mod config;
pub mod image;
pub mod layers;
pub mod net;
pub mod pod;
pub mod podinfo;
pub mod share;
pub mod stdio;
pub mod template;
pub mod uid_lease;
pub mod vm;
pub mod vmm_process;
