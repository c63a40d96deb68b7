//! What a VM is made of, from the command line: the types live in `husk-vmm-api`, which the
//! VMM's callers share to render the same command line.

pub use husk_vmm_api::launch::{DriveArg as DriveConfig, SeccompMode, VmConfig};
