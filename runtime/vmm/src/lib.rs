//! husk-vmm: a small KVM virtual machine monitor for husk's microVMs.
//!
//! - [`arch`]: the x86_64 boot protocol (page tables, GDT, boot_params, e820, MP table).
//! - [`vstate`]: everything that calls KVM ioctls (the VM and its vCPUs).
//! - [`devices`]: legacy devices (serial, i8042, boot timer) and virtio-mmio (vsock, block).
//! - [`vmm`]: builds a VM from a [`config::VmConfig`] and runs it to its end.

pub mod arch;
pub mod config;
pub mod devices;
mod poll;
pub mod vmm;
pub mod vstate;
