//! One microVM: a `husk-vmm` process, its sockets and logs in a private directory, and the
//! agent inside it. Dropping a `Vm` kills the VMM and removes the directory, so no VMM
//! process, socket or file outlives the `husk` command on any path.

use std::{
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use husk_client::{AgentAddr, AgentClient};
use husk_vmm_api::{
    files::VmDir,
    net::{MacAddr, NetArg, NetBackendArg},
    DriveArg, FsArg, VmConfig,
};

use crate::{
    cgroup::VmCgroup,
    uid_lease::UidLease,
    vmm_process::{VmmCommand, VmmKiller, VmmProcess},
};

/// The guest image and VMM to use.
#[derive(Debug, Clone)]
pub struct VmImage {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the VMM's kernel command line (e.g. `loglevel=7` to see the boot).
    pub kernel_args: String,
    /// Where the guest's serial console goes (default: `serial.log` in the VM's directory,
    /// removed with it).
    pub console_log: Option<PathBuf>,
    /// Confine the VMM (its jail, per-thread seccomp filters, cgroup); off only for
    /// debugging.
    pub confine: bool,
    /// The users a confined VMM runs as (one leased per VM).
    pub uids: crate::uid_lease::UidRange,
    /// The vhost-user-fs backend of a VM's shared directory.
    pub virtiofsd: PathBuf,
    /// The VM template cache (see [`crate::template`]): pods start from a template made of
    /// this image, not by booting; None boots every pod cold.
    pub templates: Option<PathBuf>,
}

/// How big the VM is.
#[derive(Debug, Clone)]
pub struct VmSize {
    pub vcpus: u8,
    pub mem_mib: u32,
}

/// A drive of the VM, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
#[derive(Debug)]
pub enum Drive {
    /// A file the caller opened (and may have unlinked already): the VMM inherits it, so
    /// the file's space goes with the VMM whatever kills it.
    File {
        id: String,
        file: fs::File,
        read_only: bool,
    },
    /// Read-only image layers, added and removed while the VM runs (see
    /// [`husk_vmm_api::Client::add_layer`]).
    Layered { id: String },
    /// An empty slot, filled while the VM runs (`update_drive`) with a file of at most
    /// `max_bytes`: a VM template's drive.
    Empty {
        id: String,
        read_only: bool,
        max_bytes: u64,
    },
}

/// The first fd number inherited drive files get in the VMM (after the tap's).
const FIRST_DRIVE_FD: i32 = NET_FD + 1;

/// The VM's network interface (virtio-net over a tap).
#[derive(Debug)]
pub enum NetDevice {
    /// A tap the caller opened (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): the VMM inherits it as
    /// its fd 3, and the caller's copy is closed once the VMM runs, so the tap goes with the
    /// VMM.
    Fd { fd: OwnedFd, mac: MacAddr, mtu: u16 },
    /// An existing tap the VMM attaches to by name.
    Tap {
        name: String,
        mac: Option<MacAddr>,
        mtu: Option<u16>,
    },
    /// A NIC with nothing behind it (a VM template's; its clones get a tap).
    Unconnected { mac: MacAddr },
}

impl NetDevice {
    /// The same NIC again (the tap's fd duplicated), for a second VMM once the first is gone.
    pub fn try_clone(&self) -> std::io::Result<NetDevice> {
        Ok(match self {
            NetDevice::Fd { fd, mac, mtu } => NetDevice::Fd {
                fd: fd.try_clone()?,
                mac: *mac,
                mtu: *mtu,
            },
            NetDevice::Tap { name, mac, mtu } => NetDevice::Tap {
                name: name.clone(),
                mac: *mac,
                mtu: *mtu,
            },
            NetDevice::Unconnected { mac } => NetDevice::Unconnected { mac: *mac },
        })
    }
}

/// The fd number a tap passed with [`NetDevice::Fd`] has in the VMM.
const NET_FD: i32 = 3;

/// A running microVM.
#[derive(Debug)]
pub struct Vm {
    pub dir: PathBuf,
    console: PathBuf,
    child: Option<VmmProcess>,
    /// Removed after the VMM is reaped.
    cgroup: Option<VmCgroup>,
    /// The user the VMM runs as, leased until it is reaped.
    uid: Option<UidLease>,
    /// The virtiofsd serving the shared directory, and that directory, if the VM has one.
    virtiofsd: Option<(VmmProcess, PathBuf)>,
}

/// The guest image and VMM to use: what husk's configuration file says (see
/// [`crate::config`]), else `$HUSK_CACHE/current` (as built by guest-image/build.sh) and the
/// `husk-vmm` next to this executable.
pub fn default_image() -> Result<VmImage> {
    Ok(image_from(crate::config::Config::load()?))
}

/// The guest image and VMM of an already loaded configuration (see [`default_image`]).
pub fn image_from(cfg: crate::config::Config) -> VmImage {
    let cache = std::env::var_os("HUSK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/husk".into());
    let vmm = cfg.vmm.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("husk-vmm")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "husk-vmm".into())
    });
    VmImage {
        vmm,
        kernel: cfg.kernel.unwrap_or_else(|| cache.join("current/vmlinux")),
        initramfs: cfg
            .initramfs
            .unwrap_or_else(|| cache.join("current/initramfs.cpio.gz")),
        kernel_args: cfg.kernel_args,
        console_log: None,
        confine: cfg.confine,
        uids: cfg.uids,
        virtiofsd: cfg.virtiofsd.clone(),
        templates: cfg.pod.templates.then(|| cfg.storage_dir.join("templates")),
    }
}

/// A random locally administered unicast MAC (a VM's NIC when nobody gave one).
pub fn random_mac() -> std::io::Result<MacAddr> {
    let mut bytes = [0u8; 6];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(MacAddr::local_from(bytes))
}

/// Fails, in one line that says why, on a host whose KVM cannot boot a Linux guest.
pub fn check_kvm() -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or run inside the testbed: tests/testbed/run.sh)");
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        bail!("/dev/kvm here has no hardware virtualization (no vmx/svm CPU flag; e.g. PVM): it cannot boot a Linux guest; run husk inside the nested-KVM testbed (tests/testbed/run.sh -- husk run ...)");
    }
    Ok(())
}

impl Vm {
    fn console_path(image: &VmImage, dir: &Path) -> PathBuf {
        image
            .console_log
            .clone()
            .unwrap_or_else(|| VmDir::new(dir).serial_log())
    }

    /// The hybrid-vsock socket of the VM.
    pub fn vsock_path(dir: &Path) -> PathBuf {
        VmDir::new(dir).vsock_sock()
    }

    /// The VMM's control socket of the VM in `dir`.
    pub fn api_path(dir: &Path) -> PathBuf {
        VmDir::new(dir).api_sock()
    }

    /// The VMM's control socket, waiting at most `timeout` for each answer.
    pub fn control(&self, timeout: Duration) -> husk_vmm_api::Client {
        husk_vmm_api::Client::new(VmDir::new(&self.dir).api_sock(), timeout)
    }

    /// Starts a VMM for `image` with `drives` and `net`, in `dir` (created, and removed on
    /// drop) and, when the image says to confine it, jailed in `dir/jail` as a user of its
    /// own, in the cgroup `cgroup` (made, and removed on drop). With `shared`, the guest
    /// gets that directory as virtio-fs tag [`husk_proto::SHARED_FS_TAG`], served by a
    /// virtiofsd started here (and killed on drop). With `template`, the VM is restored from
    /// that template (see [`crate::template`]), whose devices must be these, instead of
    /// booting the image's kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        image: &VmImage,
        size: &VmSize,
        drives: &[Drive],
        net: Option<NetDevice>,
        dir: &Path,
        cgroup: &str,
        shared: Option<&Path>,
        template: Option<&Path>,
    ) -> Result<Vm> {
        for (what, p) in [("kernel", &image.kernel), ("initramfs", &image.initramfs)] {
            if template.is_none() && !p.exists() {
                bail!(
                    "the guest {what} {} does not exist: build the guest image with guest-image/build.sh (or pass --{what})",
                    p.display()
                );
            }
        }
        let files = VmDir::new(dir);
        fs::create_dir_all(files.jail())
            .with_context(|| format!("creating {}", files.jail().display()))?;
        let mut cfg = VmConfig::new(&image.kernel, size.vcpus, size.mem_mib);
        cfg.initramfs = Some(image.initramfs.clone());
        cfg.cmdline_extra = image.kernel_args.clone();
        cfg.serial_log = Some(Self::console_path(image, dir));
        cfg.vsock_uds = Some(files.vsock_sock());
        cfg.api_sock = Some(files.api_sock());
        let uid = match image.confine {
            true => {
                let lease = UidLease::acquire(image.uids)?;
                cfg.jail = Some(files.jail());
                cfg.uid = Some(lease.uid);
                cfg.gid = Some(lease.uid);
                Some(lease)
            }
            false => {
                cfg.seccomp = husk_vmm_api::SeccompMode::Off;
                None
            }
        };
        // Files the VMM inherits: (our fd, its number in the VMM).
        let mut inherit: Vec<(i32, i32)> = Vec::new();
        for d in drives {
            cfg.drives.push(match d {
                Drive::File {
                    id,
                    file,
                    read_only,
                } => {
                    let n = FIRST_DRIVE_FD + inherit.len() as i32;
                    inherit.push((file.as_raw_fd(), n));
                    DriveArg {
                        id: id.clone(),
                        path: Some(format!("/proc/self/fd/{n}").into()),
                        read_only: *read_only,
                        layered: false,
                    }
                }
                Drive::Layered { id } => DriveArg::layered(id.clone()),
                Drive::Empty {
                    id,
                    read_only,
                    max_bytes,
                } => {
                    if !read_only {
                        cfg.max_drive_bytes = cfg.max_drive_bytes.max(*max_bytes);
                    }
                    DriveArg {
                        id: id.clone(),
                        path: None,
                        read_only: *read_only,
                        layered: false,
                    }
                }
            });
        }
        // A template the VMM maps: inherited, so a jailed VMM needs no path to it.
        let template_file = match template {
            Some(t) => {
                let f = fs::File::open(t)
                    .with_context(|| format!("opening the VM template {}", t.display()))?;
                let n = FIRST_DRIVE_FD + inherit.len() as i32;
                inherit.push((f.as_raw_fd(), n));
                cfg.kernel = None;
                cfg.initramfs = None;
                cfg.cmdline_extra = String::new();
                cfg.restore = Some(format!("/proc/self/fd/{n}").into());
                Some(f)
            }
            None => None,
        };
        // The next free number after the drives'.
        let next_fd = FIRST_DRIVE_FD + inherit.len() as i32;
        let mut tap_fd = None;
        cfg.net = net.map(|n| match n {
            NetDevice::Fd { fd, mac, mtu } => {
                tap_fd = Some(fd);
                NetArg {
                    backend: NetBackendArg::Fd(NET_FD),
                    mac: Some(mac),
                    mtu: Some(mtu),
                }
            }
            NetDevice::Tap { name, mac, mtu } => NetArg {
                backend: NetBackendArg::Tap(name),
                mac,
                mtu,
            },
            NetDevice::Unconnected { mac } => NetArg {
                backend: NetBackendArg::None,
                mac: Some(mac),
                mtu: None,
            },
        });
        let virtiofsd = match shared {
            Some(share) => {
                let socket = dir.join(VIRTIOFSD_SOCKET);
                let p = start_virtiofsd(&image.virtiofsd, share, &socket, dir)?;
                cfg.fs.push(FsArg {
                    tag: husk_proto::SHARED_FS_TAG.into(),
                    socket,
                });
                Some((p, share.to_path_buf()))
            }
            None => None,
        };
        let log = fs::File::create(files.vmm_log()).context("creating vmm.log")?;
        if let Some(f) = &tap_fd {
            inherit.push((f.as_raw_fd(), NET_FD));
        }
        // The VMM holds its user's lease too (it knows nothing of it): a VMM that outlives
        // its caller for a moment (killed with it) keeps its user until it is gone.
        if let Some(l) = &uid {
            inherit.push((l.file().as_raw_fd(), next_fd));
        }
        // Born in a PID namespace of its own, dying with whoever started it (husk run, the
        // shim) even when that is SIGKILLed, in its own process group (a Ctrl-C at the
        // terminal is husk's to handle: stop the container, power the VM off).
        let cgroup = match image.confine {
            true => Some(VmCgroup::create(cgroup, size.mem_mib, size.vcpus)?),
            false => None,
        };
        let child = VmmProcess::spawn(VmmCommand {
            program: &image.vmm,
            args: cfg.to_args(),
            log,
            inherit,
            cgroup: cgroup.as_ref().map(VmCgroup::dir),
        })
        .with_context(|| format!("starting the VMM {}", image.vmm.display()))?;
        // The VMM holds the tap now; ours goes, so that the tap goes with the VMM.
        drop(tap_fd);
        drop(template_file);
        Ok(Vm {
            dir: dir.to_path_buf(),
            console: Self::console_path(image, dir),
            child: Some(child),
            cgroup,
            uid,
            virtiofsd,
        })
    }

    /// Waits until the agent answers, or fails with what the VMM and the guest said.
    pub async fn connect_agent(&mut self, timeout: Duration) -> Result<AgentClient, BootError> {
        let addr = AgentAddr::HybridVsock(Self::vsock_path(&self.dir));
        let Some(child) = self.child.as_mut() else {
            return Err(BootError::Ended("the VMM is gone".into()));
        };
        tokio::select! {
            r = AgentClient::connect_when_ready(&addr, timeout) => match r {
                Ok(c) => Ok(c),
                Err(e) => Err(BootError::Hung(format!(
                    "the guest agent did not become ready within {:.0} s: {e}\n--- VMM status\n{}\n{}",
                    timeout.as_secs_f64(),
                    self.vmm_status(),
                    self.logs_tail()
                ))),
            },
            status = child.wait() => {
                self.child = None;
                Err(match status {
                    Ok(status) if status.code() == Some(husk_vmm_api::EXIT_TEMPLATE_REFUSED) => {
                        BootError::TemplateRefused(format!(
                            "the VMM refused its template\n{}",
                            self.logs_tail()
                        ))
                    }
                    Ok(status) => BootError::Ended(format!(
                        "the VMM {} before the agent was ready\n{}",
                        describe_exit(&status),
                        self.logs_tail()
                    )),
                    Err(e) => BootError::Ended(format!("waiting for the VMM: {e}")),
                })
            }
        }
    }

    /// The VMM's answer to a status request on its control socket (vCPU exits, how far the
    /// guest's drivers got with each device), or why there is none.
    pub fn vmm_status(&self) -> String {
        match self.control(Duration::from_secs(3)).status() {
            Ok(status) => serde_json::to_string(&status).expect("a status serializes"),
            Err(e) => format!("no answer: {}", error_chain(&e)),
        }
    }

    /// The last lines of the VMM log and the serial console, for error messages.
    pub fn logs_tail(&self) -> String {
        let mut s = String::new();
        for (name, path) in [
            ("vmm.log", VmDir::new(&self.dir).vmm_log()),
            ("guest console", self.console.clone()),
        ] {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            if !tail.is_empty() {
                s.push_str(&format!("--- {name} (last lines)\n{}\n", tail.join("\n")));
            }
        }
        s
    }

    /// The shared directory, served by this VM's virtiofsd, if it has one.
    pub fn shared_dir(&self) -> Result<Option<crate::share::SharedDir>> {
        let Some((p, share)) = &self.virtiofsd else {
            return Ok(None);
        };
        let pidfd = p.pidfd().context("virtiofsd's pidfd")?;
        Ok(Some(crate::share::SharedDir::new(share.clone(), pidfd)))
    }

    /// A handle that kills the VMM, and never another process (see [`VmmKiller`]).
    pub fn killer(&self) -> Option<VmmKiller> {
        self.child.as_ref().and_then(|c| c.killer().ok())
    }

    /// The file the guest's serial console goes to (the agent's log is there too).
    pub fn console(&self) -> &Path {
        &self.console
    }

    /// The VMM's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(VmmProcess::id)
    }

    /// Waits for the VMM to exit, however long that takes; its exit status.
    pub async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the VMM is gone")?;
        let status = child.wait().await.context("waiting for the VMM")?;
        self.child = None;
        Ok(status)
    }

    /// The VMM's own log (boot timings).
    pub fn vmm_log(&self) -> String {
        fs::read_to_string(VmDir::new(&self.dir).vmm_log()).unwrap_or_default()
    }

    /// Waits up to `timeout` for the VMM to exit (after the guest powered off), then kills it.
    /// Its exit status, if it exited here (None: it was already reaped).
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(r) => {
                self.child = None;
                Ok(Some(r.context("waiting for the VMM")?))
            }
            Err(_) => {
                let _ = child.kill().await;
                self.child = None;
                bail!(
                    "the VMM did not exit within {:.0} s of the guest's shutdown; killed it",
                    timeout.as_secs_f64()
                );
            }
        }
    }
}

/// Why a VM's agent never became ready.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The VMM runs, but the agent did not answer in time: the guest is stuck in its boot.
    #[error("{0}")]
    Hung(String),
    /// The VMM ended (killed, or the guest panicked or crashed) before the agent answered.
    #[error("{0}")]
    Ended(String),
    /// The VMM could not restore the VM from its template (it exited with
    /// [`husk_vmm_api::EXIT_TEMPLATE_REFUSED`]).
    #[error("{0}")]
    TemplateRefused(String),
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Kills and reaps the VMM: no zombie or running VMM outlives us. Then its cgroup,
        // empty now, goes.
        drop(self.child.take());
        // virtiofsd ends when its VMM does; it is killed if not.
        drop(self.virtiofsd.take());
        drop(self.cgroup.take());
        drop(self.uid.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The socket virtiofsd listens on, in the VM's directory (outside the jail: the VMM
/// connects before it enters it).
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";

/// Starts `program` (virtiofsd) serving `share` on `socket`, its log `virtiofsd.log` in
/// `dir`: through the VMM's own spawn (a PID namespace of its own, dying with its caller,
/// killed through a pidfd). It runs as root in its own sandbox (namespaces, pivot_root into
/// the share, seccomp) and keeps no CAP_DAC_READ_SEARCH (no file handles). The VMM waits for
/// it to listen.
fn start_virtiofsd(program: &Path, share: &Path, socket: &Path, dir: &Path) -> Result<VmmProcess> {
    if !program.exists() {
        bail!(
            "virtiofsd {} does not exist (scripts/setup.sh builds it; [vmm] virtiofsd names another)",
            program.display()
        );
    }
    fs::create_dir_all(share).with_context(|| format!("creating {}", share.display()))?;
    let log_path = dir.join("virtiofsd.log");
    let log = fs::File::create(&log_path).context("creating virtiofsd.log")?;
    let args: Vec<std::ffi::OsString> = vec![
        "--socket-path".into(),
        socket.into(),
        "--shared-dir".into(),
        share.into(),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        "--cache=auto".into(),
        "--inode-file-handles=never".into(),
    ];
    let mut p = VmmProcess::spawn(VmmCommand {
        program,
        args,
        log,
        inherit: Vec::new(),
        cgroup: None,
    })
    .with_context(|| format!("starting virtiofsd {}", program.display()))?;
    // It binds its socket before anything else; the VMM connects to it at once.
    let t0 = std::time::Instant::now();
    while !socket.exists() {
        if let Some(status) = p.try_wait()? {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "virtiofsd {} {}: {}",
                program.display(),
                describe_exit(&status),
                log.trim()
            );
        }
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("virtiofsd made no socket {} in 5 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(p)
}

/// How the VMM ended, in words: "exited with status N", "was killed by its seccomp filter
/// (SIGSYS) ...", "was killed by signal N (NAME)".
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(libc::SIGSYS)) => "was killed by its seccomp filter (SIGSYS): one of its \
             threads made a syscall outside its allowlist (the kernel log names it)"
            .to_string(),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("?");
            format!("was killed by signal {sig} ({name})")
        }
        _ => format!("ended ({status})"),
    }
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}
