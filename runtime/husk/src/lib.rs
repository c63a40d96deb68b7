//! The host side of husk shared by its binaries (`husk` and `containerd-shim-husk-v2`):
//! microVMs ([`vm`]) and container images ([`image`]).

pub mod image;
pub mod vm;
