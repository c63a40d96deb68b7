//! The VMM's command line: [`VmConfig`] is what `husk-vmm` parses (with clap) and what its
//! callers render into arguments with [`VmConfig::to_args`], so both sides share one type.

use std::{ffi::OsString, fmt, path::PathBuf};

use crate::net::NetArg;

/// A drive given on the command line: `id=ID,path=PATH,ro=BOOL` for one backing file (path
/// may be empty: an empty slot whose backing file comes later through the control API), or
/// `id=ID,layered` for a layered drive (read-only, no file of its own: image layers are added
/// and removed through the control API, each at its own byte range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveArg {
    pub id: String,
    pub path: Option<PathBuf>,
    /// Always true for a layered drive (the parser sets it).
    pub read_only: bool,
    pub layered: bool,
}

impl DriveArg {
    /// The layered drive `id`.
    pub fn layered(id: impl Into<String>) -> Self {
        DriveArg {
            id: id.into(),
            path: None,
            read_only: true,
            layered: true,
        }
    }
}

impl std::str::FromStr for DriveArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut d = DriveArg {
            id: String::new(),
            path: None,
            read_only: false,
            layered: false,
        };
        let (mut path_given, mut ro_given) = (false, false);
        for kv in s.split(',') {
            if kv == "layered" {
                d.layered = true;
                continue;
            }
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("drive {s:?}: {kv:?} is not key=value"))?;
            match k {
                "id" => d.id = v.to_string(),
                "path" => {
                    path_given = true;
                    d.path = (!v.is_empty()).then(|| v.into());
                }
                "ro" => {
                    ro_given = true;
                    d.read_only = v
                        .parse()
                        .map_err(|_| format!("drive {s:?}: ro must be true or false"))?
                }
                "layered" => return Err(format!("drive {s:?}: layered takes no value")),
                other => return Err(format!("drive {s:?}: unknown key {other:?}")),
            }
        }
        if d.id.is_empty() {
            return Err(format!("drive {s:?}: an id is required"));
        }
        if d.layered {
            if path_given {
                return Err(format!(
                    "drive {s:?}: a layered drive has no path (its layers come through the control API)"
                ));
            }
            if ro_given && !d.read_only {
                return Err(format!("drive {s:?}: a layered drive is read-only"));
            }
            d.read_only = true;
        }
        Ok(d)
    }
}

impl fmt::Display for DriveArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.layered {
            return write!(f, "id={},layered", self.id);
        }
        let path = self
            .path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        write!(f, "id={},path={path},ro={}", self.id, self.read_only)
    }
}

/// A shared directory for the guest (virtio-fs), served by a vhost-user-fs backend
/// (virtiofsd) listening on `socket`: `tag=TAG,socket=PATH`. The guest mounts it with
/// `mount -t virtiofs TAG DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsArg {
    pub tag: String,
    pub socket: PathBuf,
}

impl std::str::FromStr for FsArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut socket) = (None, None);
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("fs {s:?}: {kv:?} is not key=value"))?;
            match k {
                "tag" => tag = Some(v.to_string()),
                "socket" => socket = Some(PathBuf::from(v)),
                other => return Err(format!("fs {s:?}: unknown key {other:?}")),
            }
        }
        let tag = tag
            .filter(|t| !t.is_empty() && t.len() <= 36)
            .ok_or_else(|| format!("fs {s:?}: a tag of 1 to 36 bytes is required"))?;
        let socket = socket
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| format!("fs {s:?}: the backend's socket is required"))?;
        Ok(FsArg { tag, socket })
    }
}

impl fmt::Display for FsArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tag={},socket={}", self.tag, self.socket.display())
    }
}

/// husk-vmm's exit status when the template of `--restore` cannot be restored (damaged,
/// made by another VMM, or not put back by this host's KVM): its caller may boot the VM
/// instead, and make the template again. Other errors exit with 1; the guest's ends with 0
/// (it powered off, or the VM was stopped), 2 (it panicked) and 3 (it crashed).
pub const EXIT_TEMPLATE_REFUSED: i32 = 4;

/// The configuration of one microVM.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(name = "husk-vmm", version, about = "husk's KVM microVM monitor")]
pub struct VmConfig {
    /// The guest kernel (ELF vmlinux).
    #[arg(long, required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Restore the VM from a template (the file of a `snapshot` request) instead of booting
    /// a kernel: its guest memory is mapped privately from the file (clones share the pages
    /// none of them wrote) and its vCPUs go on where they were. `--vcpus`, `--mem-mib` and
    /// the devices (`--vsock-uds`, `--drive`, `--net`, in the same order) must be those of
    /// the snapshotted VM; a template that does not match, or cannot be put back, is
    /// refused, naming the difference, with exit status [`EXIT_TEMPLATE_REFUSED`].
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline_extra"])]
    pub restore: Option<PathBuf>,
    /// The guest initramfs (cpio, optionally compressed).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to husk's defaults.
    #[arg(long, default_value = "")]
    pub cmdline_extra: String,
    /// The largest file an empty writable drive slot may be given later (`update_drive`):
    /// a jailed VMM's file size limit covers it (as it covers every writable drive given at
    /// start, the serial log, and a snapshot of guest memory).
    #[arg(long, default_value = "0")]
    pub max_drive_bytes: u64,
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
    /// A block device: id=ID,path=PATH,ro=BOOL, or id=ID,layered for a read-only drive whose
    /// image layers come through the control socket (repeatable; /dev/vda, /dev/vdb, ... in
    /// order).
    #[arg(long = "drive")]
    pub drives: Vec<DriveArg>,
    /// The control socket (JSON lines: {"status":{}}, {"stop":{}},
    /// {"update_drive":{"id":..,"path":..}}, {"add_layer":{"drive":..,"path":..}},
    /// {"remove_layer":{"drive":..,"start":..}}).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// The network interface (at most one; the guest's eth0, the VMM's "net0"):
    /// fd=N[,mac=MAC][,mtu=MTU] for an inherited tap fd opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, or tap=NAME[,mac=MAC][,mtu=MTU] for an existing tap
    /// the VMM attaches to. Default MAC: random, locally administered; default MTU: 1500.
    #[arg(long)]
    pub net: Option<NetArg>,
    /// A shared directory (virtio-fs): tag=TAG,socket=PATH, the socket of a vhost-user-fs
    /// backend (virtiofsd) already listening; connected when the VM is built (before the
    /// jail). The backend never maps guest memory: requests and answers pass through a
    /// bounce area of the VMM's. Repeatable.
    #[arg(long = "fs")]
    pub fs: Vec<FsArg>,
    /// The VMM's per-thread seccomp filters: `kill` (the default: a syscall outside the
    /// calling thread's list kills the VMM), `log` (allowed, and logged by the kernel's audit;
    /// for finding what a list lacks) or `off` (debugging only: a guest that breaks a device
    /// model then reaches every syscall).
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Jail the VMM once it has built the VM (opened /dev/kvm, its files and tap, bound its
    /// sockets) and before any of its threads starts: it moves into new mount, IPC, UTS and
    /// network namespaces whose root (after `pivot_root`) is this directory, bound read-only
    /// (it must hold the sockets: `--api-sock` and `--vsock-uds` inside it, and whatever host
    /// listeners `<vsock-uds>_P` the guest may connect to), and runs on as `--uid` and
    /// `--gid` with no capabilities. Its stdin, if a pipe, is its lifeline: once its writers
    /// are gone the VMM's parent is taken to be gone too, and the VMM exits. The caller
    /// removes the sockets afterwards (the VMM cannot write its root).
    #[arg(long, requires_all = ["uid", "gid"])]
    pub jail: Option<PathBuf>,
    /// The user the jailed VMM runs as (not 0).
    #[arg(long, requires = "jail", value_parser = clap::value_parser!(u32).range(1..))]
    pub uid: Option<u32>,
    /// The group the jailed VMM runs as (not 0); it keeps no supplementary groups.
    #[arg(long, requires = "jail", value_parser = clap::value_parser!(u32).range(1..))]
    pub gid: Option<u32>,
}

/// What the VMM's seccomp filters do with a syscall outside their lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    #[default]
    Kill,
    Log,
    Off,
}

impl VmConfig {
    /// A VM of `vcpus` and `mem_mib` booting `kernel`, with nothing else.
    pub fn new(kernel: impl Into<PathBuf>, vcpus: u8, mem_mib: u32) -> Self {
        Self {
            kernel: Some(kernel.into()),
            restore: None,
            initramfs: None,
            cmdline_extra: String::new(),
            max_drive_bytes: 0,
            vcpus,
            mem_mib,
            serial_log: None,
            vsock_uds: None,
            guest_cid: 3,
            drives: Vec::new(),
            api_sock: None,
            net: None,
            fs: Vec::new(),
            seccomp: SeccompMode::Kill,
            jail: None,
            uid: None,
            gid: None,
        }
    }

    /// The arguments that make `husk-vmm` parse this configuration back (program name
    /// excluded).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, v: OsString| {
            a.push(format!("--{name}").into());
            a.push(v);
        };
        if let Some(k) = &self.kernel {
            flag("kernel", k.clone().into());
        }
        if let Some(t) = &self.restore {
            flag("restore", t.clone().into());
        }
        if let Some(i) = &self.initramfs {
            flag("initramfs", i.clone().into());
        }
        if !self.cmdline_extra.is_empty() {
            flag("cmdline-extra", self.cmdline_extra.clone().into());
        }
        if self.max_drive_bytes != 0 {
            flag("max-drive-bytes", self.max_drive_bytes.to_string().into());
        }
        flag("vcpus", self.vcpus.to_string().into());
        flag("mem-mib", self.mem_mib.to_string().into());
        if let Some(p) = &self.serial_log {
            flag("serial-log", p.clone().into());
        }
        if let Some(p) = &self.vsock_uds {
            flag("vsock-uds", p.clone().into());
        }
        flag("guest-cid", self.guest_cid.to_string().into());
        for d in &self.drives {
            flag("drive", d.to_string().into());
        }
        if let Some(p) = &self.api_sock {
            flag("api-sock", p.clone().into());
        }
        if let Some(n) = &self.net {
            flag("net", n.to_string().into());
        }
        for f in &self.fs {
            flag("fs", f.to_string().into());
        }
        match self.seccomp {
            SeccompMode::Kill => {}
            SeccompMode::Log => flag("seccomp", "log".into()),
            SeccompMode::Off => flag("seccomp", "off".into()),
        }
        if let Some(j) = &self.jail {
            flag("jail", j.clone().into());
        }
        if let Some(u) = self.uid {
            flag("uid", u.to_string().into());
        }
        if let Some(g) = self.gid {
            flag("gid", g.to_string().into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn drives_parse() {
        let d: DriveArg = "id=rootfs,path=/x.img,ro=true".parse().unwrap();
        assert_eq!(d.id, "rootfs");
        assert_eq!(d.path.as_deref(), Some(std::path::Path::new("/x.img")));
        assert!(d.read_only);
        let e: DriveArg = "id=slot1,path=".parse().unwrap();
        assert_eq!(e.path, None);
        assert!("path=/x".parse::<DriveArg>().is_err());
        assert!("id=a,ro=maybe".parse::<DriveArg>().is_err());
        assert!("id=a,colour=red".parse::<DriveArg>().is_err());
        assert!(!d.layered && !e.layered);
    }

    #[test]
    fn layered_drives_parse() {
        for s in [
            "id=layers,layered",
            "layered,id=layers",
            "id=layers,layered,ro=true",
        ] {
            assert_eq!(
                s.parse::<DriveArg>().unwrap(),
                DriveArg::layered("layers"),
                "{s}"
            );
        }
        for (bad, why) in [
            ("id=layers,layered,path=/x.img", "has no path"),
            ("id=layers,path=,layered", "has no path"),
            ("id=layers,layered,ro=false", "is read-only"),
            ("id=layers,layered=true", "takes no value"),
            ("layered", "an id is required"),
            ("id=layers,layer", "is not key=value"),
        ] {
            let e = bad.parse::<DriveArg>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn drives_print_what_they_parse() {
        for s in [
            "id=rootfs,path=/x.img,ro=true",
            "id=slot1,path=,ro=false",
            "id=layers,layered",
        ] {
            assert_eq!(s.parse::<DriveArg>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn config_round_trips_through_its_arguments() {
        let mut c = VmConfig::new("/k/vmlinux", 2, 512);
        let args = |c: &VmConfig| std::iter::once("husk-vmm".into()).chain(c.to_args());
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
        c.initramfs = Some("/k/initramfs.cpio.gz".into());
        c.cmdline_extra = "loglevel=7 quiet".into();
        c.serial_log = Some("/run/vm/serial.log".into());
        c.vsock_uds = Some("/run/vm/vsock.sock".into());
        c.api_sock = Some("/run/vm/api.sock".into());
        c.seccomp = SeccompMode::Off;
        c.guest_cid = 42;
        c.drives = vec![
            "id=rootfs,path=/r.ext4,ro=false".parse().unwrap(),
            "id=slot1,path=,ro=true".parse().unwrap(),
            DriveArg::layered("layers"),
        ];
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
        c.net = Some("fd=7,mac=02:00:00:00:00:01,mtu=1450".parse().unwrap());
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
        c.net = Some("tap=husk0".parse().unwrap());
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
        c.fs = vec![
            "tag=shared,socket=/run/vm/fs.sock".parse().unwrap(),
            "tag=b,socket=/x".parse().unwrap(),
        ];
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
        c.jail = Some("/run/vm/jail".into());
        c.uid = Some(1_600_000_007);
        c.gid = Some(1_600_000_007);
        assert_eq!(VmConfig::try_parse_from(args(&c)).unwrap(), c);
    }

    #[test]
    fn fs_args_parse() {
        let f: FsArg = "tag=husk-shared,socket=/run/fs.sock".parse().unwrap();
        assert_eq!(
            (f.tag.as_str(), f.socket.as_path()),
            ("husk-shared", std::path::Path::new("/run/fs.sock"))
        );
        assert_eq!(f.to_string(), "tag=husk-shared,socket=/run/fs.sock");
        for (bad, why) in [
            ("socket=/s", "a tag of 1 to 36 bytes"),
            ("tag=,socket=/s", "a tag of 1 to 36 bytes"),
            (
                &format!("tag={},socket=/s", "x".repeat(37)),
                "a tag of 1 to 36 bytes",
            ),
            ("tag=a", "socket is required"),
            ("tag=a,socket=/s,cache=auto", "unknown key"),
            ("tag", "is not key=value"),
        ] {
            let e = bad.parse::<FsArg>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A jail needs its user and group, neither of them root; a user needs a jail.
    #[test]
    fn a_jail_comes_with_an_unprivileged_user_and_group() {
        let parse = |extra: &[&str]| {
            let mut a = vec!["husk-vmm", "--kernel", "/k"];
            a.extend_from_slice(extra);
            VmConfig::try_parse_from(a)
        };
        assert!(parse(&["--jail", "/j", "--uid", "5", "--gid", "6"]).is_ok());
        for bad in [
            &["--jail", "/j"][..],
            &["--jail", "/j", "--uid", "5"],
            &["--uid", "5", "--gid", "6"],
            &["--jail", "/j", "--uid", "0", "--gid", "6"],
            &["--jail", "/j", "--uid", "5", "--gid", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A VM boots a kernel or is restored from a template, never both, and never neither;
    /// a restored one takes no kernel arguments.
    #[test]
    fn a_vm_boots_a_kernel_or_is_restored() {
        let parse = |a: &[&str]| VmConfig::try_parse_from([&["husk-vmm"][..], a].concat());
        let restored = parse(&["--restore", "/t", "--vsock-uds", "/v"]).unwrap();
        assert_eq!(
            restored.restore.as_deref(),
            Some(std::path::Path::new("/t"))
        );
        assert_eq!(restored.kernel, None);
        let again = parse(
            &restored
                .to_args()
                .iter()
                .map(|a| a.to_str().unwrap())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(again.restore, restored.restore);
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("--kernel"), "{e}");
        for bad in [
            &["--restore", "/t", "--kernel", "/k"][..],
            &["--restore", "/t", "--initramfs", "/i"],
            &["--restore", "/t", "--cmdline-extra", "quiet"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    /// One interface: a second --net is refused, not silently dropped.
    #[test]
    fn one_net_only() {
        let e = VmConfig::try_parse_from([
            "husk-vmm", "--kernel", "/k", "--net", "tap=a", "--net", "tap=b",
        ]);
        assert!(e.is_err());
        let e = VmConfig::try_parse_from(["husk-vmm", "--kernel", "/k", "--net", "fd=2"]);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("stdin, stdout or stderr"));
    }
}
