//! Everything that calls KVM: the VM (memory, irqchip, irqfds), its vCPUs and their run
//! loop, what the vCPUs tell the status, and what a crashed vCPU's state says.

mod crash;
pub mod vcpu;
pub mod vcpu_stats;
pub mod vm;
