//! Everything that calls KVM: the VM (memory, irqchip, irqfds), its vCPUs and their run
//! loop, what the vCPUs tell the status, what a crashed vCPU's state says, pausing them, and
//! the KVM state a snapshot saves and a restore puts back.

mod crash;
pub mod pause;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_stats;
pub mod vm;
