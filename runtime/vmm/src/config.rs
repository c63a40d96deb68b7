//! What a VM is made of, from the command line.

use std::path::PathBuf;

/// A drive given on the command line as `id=ID,path=PATH,ro=BOOL` (path may be empty:
/// an empty slot whose backing file comes later through the control API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    pub path: Option<PathBuf>,
    pub read_only: bool,
}

impl std::str::FromStr for DriveConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut d = DriveConfig {
            id: String::new(),
            path: None,
            read_only: false,
        };
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("drive {s:?}: {kv:?} is not key=value"))?;
            match k {
                "id" => d.id = v.to_string(),
                "path" if v.is_empty() => d.path = None,
                "path" => d.path = Some(v.into()),
                "ro" => {
                    d.read_only = v
                        .parse()
                        .map_err(|_| format!("drive {s:?}: ro must be true or false"))?
                }
                other => return Err(format!("drive {s:?}: unknown key {other:?}")),
            }
        }
        if d.id.is_empty() {
            return Err(format!("drive {s:?}: an id is required"));
        }
        Ok(d)
    }
}

/// The configuration of one microVM.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "husk-vmm", version, about = "husk's KVM microVM monitor")]
pub struct VmConfig {
    /// The guest kernel (ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// The guest initramfs (cpio, optionally compressed).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to husk's defaults.
    #[arg(long, default_value = "")]
    pub cmdline_extra: String,
    /// Number of vCPUs.
    #[arg(long, default_value = "1")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value = "256")]
    pub mem_mib: u32,
    /// Where the guest's serial console goes (default: this process's stdout). A log file
    /// keeps the first 16 MiB, then one line saying the rest was dropped.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// The hybrid-vsock Unix socket (the host connects here; guest connections to host port P
    /// go to `<path>_P`). No vsock device without it.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value = "3")]
    pub guest_cid: u64,
    /// A block device: id=ID,path=PATH,ro=BOOL (repeatable; /dev/vda, /dev/vdb, ... in order).
    #[arg(long = "drive")]
    pub drives: Vec<DriveConfig>,
    /// The control socket (JSON lines: {"status":{}}, {"stop":{}}, {"update_drive":{"id":..,"path":..}}).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_parse() {
        let d: DriveConfig = "id=rootfs,path=/x.img,ro=true".parse().unwrap();
        assert_eq!(d.id, "rootfs");
        assert_eq!(d.path.as_deref(), Some(std::path::Path::new("/x.img")));
        assert!(d.read_only);
        let e: DriveConfig = "id=slot1,path=".parse().unwrap();
        assert_eq!(e.path, None);
        assert!("path=/x".parse::<DriveConfig>().is_err());
        assert!("id=a,ro=maybe".parse::<DriveConfig>().is_err());
        assert!("id=a,colour=red".parse::<DriveConfig>().is_err());
    }
}
