//! The files of one VM's directory: what the caller passes to the VMM and reads afterwards.
//!
//! ```text
//! DIR/vmm.log          the VMM's stdout and stderr
//! DIR/serial.log       the guest's console
//! DIR/jail/            the jailed VMM's root (--jail): nothing but its sockets
//! DIR/jail/api.sock    the control socket
//! DIR/jail/vsock.sock  the hybrid-vsock socket
//! ```

use std::path::{Path, PathBuf};

/// The jailed VMM's root directory (`--jail`), where its sockets are.
pub const JAIL: &str = "jail";
/// The control socket (`--api-sock`).
pub const API_SOCK: &str = "api.sock";
/// The hybrid-vsock socket (`--vsock-uds`); guest connections to host port P go to
/// `vsock.sock_P`.
pub const VSOCK_SOCK: &str = "vsock.sock";
/// The VMM's own stdout and stderr.
pub const VMM_LOG: &str = "vmm.log";
/// The guest's serial console (`--serial-log`), unless the caller keeps it elsewhere.
pub const SERIAL_LOG: &str = "serial.log";

/// The paths of one VM's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir(PathBuf);

impl VmDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The VMM's root once jailed; its sockets are here, jailed or not.
    pub fn jail(&self) -> PathBuf {
        self.0.join(JAIL)
    }

    pub fn api_sock(&self) -> PathBuf {
        self.jail().join(API_SOCK)
    }

    pub fn vsock_sock(&self) -> PathBuf {
        self.jail().join(VSOCK_SOCK)
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.0.join(VMM_LOG)
    }

    pub fn serial_log(&self) -> PathBuf {
        self.0.join(SERIAL_LOG)
    }
}
