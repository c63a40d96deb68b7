//! Shared helpers of the end-to-end tests.
pub mod agent;
pub mod rootfs;
pub mod sections;
pub mod testbed;
