//! husk-agent: the in-guest agent of husk.
//!
//! It runs as the microVM's PID 1 (or as a host process for tests), serves the agent API
//! of `husk-proto` over ttrpc, and runs the pod's containers.

pub mod container;
