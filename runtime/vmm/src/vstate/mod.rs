//! Everything that calls KVM: the VM (memory, irqchip, irqfds) and its vCPUs.

pub mod vcpu;
pub mod vm;
