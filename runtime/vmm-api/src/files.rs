//! The files of one VM's directory: what the caller passes to the VMM and reads afterwards.

use std::path::{Path, PathBuf};

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

    pub fn api_sock(&self) -> PathBuf {
        self.0.join(API_SOCK)
    }

    pub fn vsock_sock(&self) -> PathBuf {
        self.0.join(VSOCK_SOCK)
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.0.join(VMM_LOG)
    }

    pub fn serial_log(&self) -> PathBuf {
        self.0.join(SERIAL_LOG)
    }
}
