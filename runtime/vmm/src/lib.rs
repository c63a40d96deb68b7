//! husk-vmm: a small KVM virtual machine monitor for husk's microVMs.
//!
//! - [`arch`]: the x86_64 boot protocol (page tables, GDT, boot_params, e820, MP table).
//! - [`vstate`]: everything that calls KVM ioctls (the VM, its vCPUs and their run loop).
//! - [`devices`]: legacy devices (serial, i8042, boot timer) and virtio-mmio (vsock, block,
//!   net).
//! - [`builder`]: builds a VM from a [`config::VmConfig`]: memory, kernel, command line,
//!   devices, boot tables.
//! - [`device_manager`]: puts the virtio devices behind their MMIO windows and routes the
//!   vCPUs' I/O exits to them.
//! - [`vmm`]: starts what the builder built and runs it to its end; its helpers are the
//!   [`event_loop`] (the devices' I/O thread), the [`api_server`] (the control socket) and
//!   [`signals`] (vCPU kicks, stop signals).
//! - [`jail`]: the VMM's jail (namespaces, root, user, no capabilities, rlimits), entered
//!   between building and starting.
//! - `test_guest` (tests only): tiny hand-written guests through the same path.

/// `println!` that never panics: a line of the VMM's log (stdout) that cannot be written (a
/// full disk, the file size limit of the jail) is dropped, and the VM runs on.
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics (see [`log_line!`]).
#[macro_export]
macro_rules! log_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod api_server;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod jail;
mod poll;
pub mod seccomp;
pub mod signals;
#[cfg(test)]
mod test_guest;
pub mod vmm;
pub mod vstate;
