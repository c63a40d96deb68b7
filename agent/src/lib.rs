//! husk-agent: the in-guest agent of husk.
//!
//! It runs as the microVM's PID 1 (or as a host process for tests), serves the agent API
//! of `husk-proto` over ttrpc, and runs the pod's containers.
//!
//! - [`container`]: the container engine (namespaces, mounts, cgroups, processes).
//! - [`sandbox`]: the sandbox's containers and processes; the domain of every RPC.
//! - [`service`]: thin ttrpc handlers over [`sandbox`].
//! - [`stdio`]: stdio streams, one connection per stream.
//! - [`network`]: the guest's interface, addresses and routes, as the pod's on the host.
//! - [`oom`]: watches the containers' memory.events for OOM kills.
//! - [`reaper`]: reaps every child and reports exits.
//! - [`server`]: the vsock / Unix listeners.
//! - [`pid1`]: guest init duties.
//! - [`template`]: a VM template's agent, gated until its clone is restored.

pub mod container;
pub mod error;
pub mod network;
pub mod oom;
pub mod pid1;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod stdio;
pub mod sysctl;
pub mod template;
