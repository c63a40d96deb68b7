//! `husk doctor`: whether this host can run husk pods, one line per check, each problem with
//! its fix. Exits 0 only when nothing fails (warnings do not stop a pod).
//!
//! Checks: root; /dev/kvm, its API and whether the CPU has hardware virtualization (PVM named
//! as such); whether the host is itself a VM and nests; the kernel features husk uses on the
//! host (tun, the ingress qdisc, u32 filters, the mirred action, cgroup v2 with memory and
//! pids); the tools the shim runs; containerd (version, running, its config registering husk,
//! started after that config changed); the shim and husk-vmm on containerd's PATH and of
//! husk's version; the guest image (present, an ELF kernel, an initramfs whose agent is this
//! version's); free space where husk writes.

use std::{
    fs,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::install;

/// What husk's own components report as their version.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// containerd's PATH when it runs under systemd and we cannot read its environment.
const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Below this much free space where husk writes, a pod's scratch drive or layers may not fit.
const SPACE_FAIL: u64 = 512 << 20;
const SPACE_WARN: u64 = 2 << 30;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// The PATH the shim and the tools are looked up in (default: the running containerd's
    /// PATH, else systemd's default).
    #[arg(long)]
    path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug)]
struct Check {
    status: Status,
    name: &'static str,
    what: String,
    fix: Option<String>,
}

fn ok(name: &'static str, what: impl Into<String>) -> Check {
    Check {
        status: Status::Ok,
        name,
        what: what.into(),
        fix: None,
    }
}

fn bad(
    status: Status,
    name: &'static str,
    what: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        status,
        name,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn fail(name: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Check {
    bad(Status::Fail, name, what, fix)
}

fn warn(name: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Check {
    bad(Status::Warn, name, what, fix)
}

pub fn doctor(a: DoctorArgs) -> Result<i32> {
    let containerd = running_containerd();
    let path = a
        .path
        .clone()
        .or_else(|| containerd.as_ref().and_then(|c| c.path.clone()))
        .unwrap_or_else(|| SYSTEMD_PATH.to_string());
    let cfg = husk::config::Config::load()?;
    let image = husk::vm::image_from(cfg.clone());

    let mut checks = vec![root()];
    checks.extend(kvm());
    checks.push(nested());
    checks.extend(kernel_features());
    checks.push(cgroups());
    checks.extend(tools(&path, &cfg.virtiofsd));
    checks.extend(containerd_checks(
        &path,
        containerd.as_ref(),
        &a.containerd_config,
    ));
    checks.extend(shim_and_vmm(&path));
    checks.push(kernel_image(&image.kernel));
    checks.push(initramfs_image(&image.initramfs));
    let cache = std::env::var_os("HUSK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/husk".into());
    checks.extend([
        space(
            &cfg.storage_dir,
            "the layer cache and pods' scratch drives grow there",
        ),
        space(&cache, "the guest image and build caches"),
        space(Path::new("/run"), "pods' run directories, sockets and logs"),
    ]);

    println!("husk doctor {VERSION}: can this host run husk pods?");
    for c in &checks {
        let tag = match c.status {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        println!("{tag:<5} {}: {}", c.name, c.what);
        if let Some(f) = &c.fix {
            println!("      fix: {f}");
        }
    }
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    if fails > 0 {
        println!(
            "husk doctor: {fails} problem{} (and {warns} warning{}): a pod cannot start here",
            if fails == 1 { "" } else { "s" },
            if warns == 1 { "" } else { "s" }
        );
        Ok(1)
    } else {
        println!(
            "husk doctor: a pod can start here ({warns} warning{})",
            if warns == 1 { "" } else { "s" }
        );
        Ok(0)
    }
}

fn root() -> Check {
    if nix::unistd::geteuid().is_root() {
        ok("root", "running as root")
    } else {
        fail(
            "root",
            "not root: husk makes namespaces, mounts, cgroups and taps, and containerd runs its shim as root",
            "run husk doctor (and containerd) as root",
        )
    }
}

fn cpu_flags() -> Vec<String> {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The CPU's hardware virtualization, by its flag: its name and KVM's module for it.
fn hardware_virtualization(flags: &[String]) -> Option<(&'static str, &'static str)> {
    if flags.iter().any(|f| f == "vmx") {
        Some(("Intel VT-x (vmx)", "kvm_intel"))
    } else if flags.iter().any(|f| f == "svm") {
        Some(("AMD-V (svm)", "kvm_amd"))
    } else {
        None
    }
}

fn module_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// KVM_GET_API_VERSION, _IO(KVMIO, 0x00).
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
/// The only KVM API version there is.
const KVM_API_VERSION: libc::c_int = 12;

fn kvm() -> Vec<Check> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return vec![fail(
            "kvm",
            "/dev/kvm does not exist: this host has no KVM",
            "enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (modprobe kvm_intel); on a cloud VM, pick one with nested virtualization",
        )];
    }
    let f = match fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => {
            return vec![fail(
                "kvm",
                format!("/dev/kvm cannot be opened for reading and writing: {e}"),
                "run as root, or give the user the kvm group",
            )]
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let api = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), KVM_GET_API_VERSION, 0) };
    if api != KVM_API_VERSION {
        return vec![fail(
            "kvm",
            format!("/dev/kvm answers KVM_GET_API_VERSION with {api}, not {KVM_API_VERSION}: not a KVM husk-vmm can use"),
            "use a Linux host with the upstream KVM modules",
        )];
    }
    let virt = hardware_virtualization(&cpu_flags());
    let hw = virt.map(|(name, _)| name);
    // The module of this CPU's kind (a kernel may have both built in), or PVM's.
    let module = if module_loaded("kvm_pvm") {
        Some("kvm_pvm")
    } else {
        virt.map(|(_, m)| m).filter(|m| module_loaded(m))
    };
    match (hw, module) {
        (_, Some("kvm_pvm")) => vec![fail(
            "kvm",
            format!(
                "/dev/kvm is PVM (module kvm_pvm{}): it runs guests without hardware virtualization and boots only PVM-aware guest kernels; husk's guest kernel is a plain one, so it would not boot",
                if hw.is_none() { ", no vmx/svm CPU flag" } else { "" }
            ),
            "run husk on a host with Intel VT-x or AMD-V (a cloud VM with nested virtualization will do), or inside the nested-KVM testbed (tests/testbed/run.sh)",
        )],
        (None, _) => vec![fail(
            "kvm",
            "/dev/kvm is there (API 12) but the CPU shows no vmx/svm flag: KVM without hardware virtualization cannot boot husk's guest",
            "enable VT-x/AMD-V in the firmware (or nested virtualization for this VM) and load kvm_intel or kvm_amd",
        )],
        (Some(hw), m) => vec![ok(
            "kvm",
            format!(
                "/dev/kvm usable, API 12, {hw}{}",
                m.map(|m| format!(", module {m}")).unwrap_or_default()
            ),
        )],
    }
}

/// Informational: whether the host is itself a VM, and whether KVM lets guests nest.
fn nested() -> Check {
    let flags = cpu_flags();
    let host = if flags.iter().any(|f| f == "hypervisor") {
        "this host is itself a VM: husk's microVMs run nested (they work; boots are slower)"
    } else {
        "this host is not a VM"
    };
    let nest = hardware_virtualization(&flags).and_then(|(_, m)| {
        fs::read_to_string(format!("/sys/module/{m}/parameters/nested"))
            .ok()
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
    });
    let nest = match nest {
        Some(true) => "; KVM lets guests nest (a pod could run its own VMs)",
        Some(false) => "; KVM does not let guests nest (nobody in a pod runs VMs)",
        None => "",
    };
    ok("nested", format!("{host}{nest}"))
}

/// Where a kernel feature is: loaded (or built in, with parameters), built in, a module
/// (loaded on first use), set in the kernel's config; None when the sources that could tell
/// say it is absent; Err when there is nothing to tell by.
fn kernel_feature(
    kernel: &KernelLists,
    module: &str,
    config: &str,
) -> Result<Option<&'static str>, ()> {
    if module_loaded(module) {
        return Ok(Some("loaded"));
    }
    let mut known = false;
    let ko = format!("/{module}.ko");
    for (list, what) in [(&kernel.builtin, "built in"), (&kernel.dep, "a module")] {
        if let Some(text) = list {
            known = true;
            let has = text.lines().any(|l| {
                let name = l.split(':').next().unwrap_or("");
                name.ends_with(&ko) || name.contains(&format!("{ko}."))
            });
            if has {
                return Ok(Some(what));
            }
        }
    }
    if let Some(text) = &kernel.config {
        known = true;
        for l in text.lines() {
            if l == format!("{config}=y") {
                return Ok(Some("built in"));
            }
            if l == format!("{config}=m") {
                return Ok(Some("a module"));
            }
        }
    }
    if known {
        Ok(None)
    } else {
        Err(())
    }
}

/// The running kernel's module lists and config, each read once for every feature looked up.
struct KernelLists {
    builtin: Option<String>,
    dep: Option<String>,
    config: Option<String>,
}

impl KernelLists {
    fn read() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let modules = Path::new("/lib/modules").join(&release);
        KernelLists {
            builtin: fs::read_to_string(modules.join("modules.builtin")).ok(),
            dep: fs::read_to_string(modules.join("modules.dep")).ok(),
            config: fs::read_to_string(format!("/boot/config-{release}")).ok(),
        }
    }
}

fn kernel_features() -> Vec<Check> {
    let kernel = KernelLists::read();
    let mut out = Vec::new();
    for (name, module, config, why) in [
        ("tun", "tun", "CONFIG_TUN", "a pod's tap device"),
        (
            "tc ingress",
            "sch_ingress",
            "CONFIG_NET_SCH_INGRESS",
            "the qdisc on a pod's veth and tap",
        ),
        (
            "tc u32",
            "cls_u32",
            "CONFIG_NET_CLS_U32",
            "the filter that takes every frame",
        ),
        (
            "tc mirred",
            "act_mirred",
            "CONFIG_NET_ACT_MIRRED",
            "the action that moves frames between veth and tap",
        ),
    ] {
        out.push(match kernel_feature(&kernel, module, config) {
            Ok(Some(where_)) => ok(name, format!("{module}: {where_} ({why})")),
            Ok(None) => fail(
                name,
                format!("the kernel has no {module} ({config}), which husk needs for {why}"),
                format!("use a kernel built with {config}=y or =m"),
            ),
            Err(()) => warn(
                name,
                format!("cannot tell whether the kernel has {module}: no /lib/modules for it, no /boot/config"),
                format!("make sure the kernel has {config} ({why})"),
            ),
        });
    }
    if let Some(tun) = out.first_mut() {
        if tun.status != Status::Fail && !Path::new("/dev/net/tun").exists() {
            *tun = fail(
                "tun",
                "/dev/net/tun does not exist",
                "modprobe tun (or mknod /dev/net/tun c 10 200)",
            );
        }
    }
    out
}

fn cgroups() -> Check {
    let root = Path::new(husk::cgroup::ROOT);
    let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) else {
        return fail(
            "cgroups",
            format!("no cgroup v2 hierarchy at {}: husk confines each VMM in a cgroup of its own", root.display()),
            "boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1; the default since systemd 247)",
        );
    };
    let have: Vec<&str> = controllers.split_whitespace().collect();
    let missing: Vec<&str> = ["memory", "pids"]
        .into_iter()
        .filter(|c| !have.contains(c))
        .collect();
    if missing.is_empty() {
        ok(
            "cgroups",
            format!("cgroup v2 at {}, with memory and pids", root.display()),
        )
    } else {
        fail(
            "cgroups",
            format!("cgroup v2 at {} lacks the {} controller{}", root.display(), missing.join(" and "), if missing.len() == 1 { "" } else { "s" }),
            "enable them in the kernel (CONFIG_MEMCG, CONFIG_CGROUP_PIDS) and do not disable them on the command line (cgroup_disable=)",
        )
    }
}

fn find_in(path: &str, name: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn tools(path: &str, virtiofsd: &Path) -> Vec<Check> {
    let missing: Vec<&str> = ["mkfs.ext4", "debugfs"]
        .into_iter()
        .filter(|t| find_in(path, t).is_none())
        .collect();
    let tools = if missing.is_empty() {
        ok(
            "tools",
            "mkfs.ext4 and debugfs (for a pod's scratch drive) on containerd's PATH",
        )
    } else {
        fail(
            "tools",
            format!("{} not on containerd's PATH ({path}): the shim makes each pod's scratch drive with them", missing.join(" and ")),
            "apt-get install e2fsprogs",
        )
    };
    let fs = if is_executable(virtiofsd) {
        ok(
            "virtiofsd",
            format!("{} (shares a pod's volumes)", virtiofsd.display()),
        )
    } else {
        fail(
            "virtiofsd",
            format!("{} is missing or not executable: every pod shares its volumes and files through it", virtiofsd.display()),
            "husk install (or scripts/setup.sh, which builds it), or set vmm.virtiofsd in husk's config",
        )
    };
    vec![tools, fs]
}

/// The running containerd: its pid, PATH, config file and when it started.
#[derive(Debug)]
struct Containerd {
    pid: u32,
    path: Option<String>,
    config: Option<PathBuf>,
    started: Option<std::time::SystemTime>,
}

fn running_containerd() -> Option<Containerd> {
    let pid = fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "containerd")
        })?;
    let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let path = env
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"PATH="))
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let config = args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a
            .strip_prefix("--config=")
            .or_else(|| a.strip_prefix("-c="))
        {
            return Some(PathBuf::from(v));
        }
        matches!(a.as_str(), "--config" | "-c")
            .then(|| args.get(i + 1).map(PathBuf::from))
            .flatten()
    });
    Some(Containerd {
        pid,
        path,
        config,
        started: process_start(pid),
    })
}

/// When process `pid` started: its start time in clock ticks since boot, plus the boot time.
fn process_start(pid: u32) -> Option<std::time::SystemTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), from field 3 on: starttime is 22.
    let ticks: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let btime: u64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(btime * 1000 + ticks * 1000 / hz))
}

/// "1.6.20" of `containerd --version`'s "containerd github.com/containerd/containerd 1.6.20 ...".
fn containerd_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .map(|v| v.trim_start_matches('v').to_string())
}

fn containerd_checks(path: &str, running: Option<&Containerd>, config: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let bin = find_in(path, "containerd")
        .or_else(|| find_in(&std::env::var("PATH").unwrap_or_default(), "containerd"));
    out.push(match bin.as_deref().map(|b| (b, containerd_version(b))) {
        None => fail(
            "containerd",
            "containerd is not installed (husk run works without it; pods from Kubernetes or crictl need it)",
            "apt-get install containerd (1.6 or later)",
        ),
        Some((b, None)) => fail(
            "containerd",
            format!("{} --version says no version", b.display()),
            "reinstall containerd (1.6 or later)",
        ),
        Some((b, Some(v))) => {
            let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
            let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            if (major, minor) >= (1, 6) {
                ok("containerd", format!("{} {v}", b.display()))
            } else {
                fail(
                    "containerd",
                    format!("{} is {v}: husk's shim speaks the task API v2 of containerd 1.6 and later", b.display()),
                    "upgrade containerd to 1.6 or later",
                )
            }
        }
    });
    out.push(match running {
        Some(c) => ok("containerd running", format!("pid {}", c.pid)),
        None => fail(
            "containerd running",
            "containerd is not running",
            "systemctl start containerd",
        ),
    });
    let text = match fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            out.push(fail(
                "runtime class",
                format!("{}: {e}", config.display()),
                "husk install (it writes containerd's config; or pass --containerd-config)",
            ));
            return out;
        }
    };
    match install::registered(&text) {
        Err(e) => out.push(fail(
            "runtime class",
            format!("{}: {e:#}", config.display()),
            "fix containerd's config (containerd config default shows a valid one), then husk install",
        )),
        Ok(names) if names.is_empty() => out.push(fail(
            "runtime class",
            format!("{} registers no runtime of husk's (runtime_type {})", config.display(), install::RUNTIME_TYPE),
            format!("husk install --config {}, then restart containerd", config.display()),
        )),
        Ok(names) => {
            let missing: Vec<&str> = install::RUNTIMES
                .into_iter()
                .filter(|n| !names.iter().any(|m| m == n))
                .collect();
            out.push(if missing.is_empty() {
                ok("runtime class", format!("{} registers {}", config.display(), names.join(" and ")))
            } else {
                warn(
                    "runtime class",
                    format!("{} registers {} but not {}", config.display(), names.join(" and "), missing.join(" and ")),
                    format!("husk install --config {} (untrusted is the runtime of pods annotated io.kubernetes.cri.untrusted-workload)", config.display()),
                )
            });
        }
    }
    if let Some(c) = running {
        let reads = c
            .config
            .clone()
            .unwrap_or_else(|| "/etc/containerd/config.toml".into());
        if fs::canonicalize(&reads).ok() != fs::canonicalize(config).ok() {
            out.push(warn(
                "containerd config",
                format!(
                    "the running containerd (pid {}) reads {}, not {}",
                    c.pid,
                    reads.display(),
                    config.display()
                ),
                format!("husk doctor --containerd-config {}", reads.display()),
            ));
        } else if let (Some(started), Ok(changed)) =
            (c.started, fs::metadata(config).and_then(|m| m.modified()))
        {
            // The boot time is in whole seconds: a config written just before containerd
            // started could look newer by up to that much.
            if changed > started + std::time::Duration::from_secs(2) {
                out.push(fail(
                    "containerd config",
                    format!("containerd (pid {}) started before {} last changed: it runs without what changed, husk's runtimes perhaps", c.pid, config.display()),
                    "systemctl restart containerd",
                ));
            }
        }
    }
    out
}

/// The "Version: X" line of a shim's -v.
fn shim_version(shim: &Path) -> Option<String> {
    let out = Command::new(shim).arg("-v").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

fn shim_and_vmm(path: &str) -> Vec<Check> {
    let Some(shim) = find_in(path, install::SHIM_BINARY) else {
        return vec![fail(
            "shim",
            format!(
                "{} is not on containerd's PATH ({path})",
                install::SHIM_BINARY
            ),
            "husk install",
        )];
    };
    let mut out = vec![match shim_version(&shim) {
        Some(v) if v == VERSION => ok("shim", format!("{} {v}", shim.display())),
        Some(v) => fail(
            "shim",
            format!("{} is version {v}, husk is {VERSION}: containerd would start pods with another husk than this one", shim.display()),
            "husk install (it installs the shim and husk-vmm of this husk)",
        ),
        None => fail(
            "shim",
            format!("{} answers -v with no version: a shim older than husk {VERSION}, or not husk's", shim.display()),
            "husk install",
        ),
    }];
    // The shim starts the husk-vmm next to itself.
    let vmm = shim.with_file_name(install::VMM_BINARY);
    let v = Command::new(&vmm)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(str::to_string)
        });
    out.push(match v {
        _ if !is_executable(&vmm) => fail(
            "vmm",
            format!(
                "{} is missing: the shim starts the husk-vmm next to itself",
                vmm.display()
            ),
            "husk install",
        ),
        Some(v) if v == VERSION => ok("vmm", format!("{} {v}", vmm.display())),
        v => fail(
            "vmm",
            format!(
                "{} is version {}, husk is {VERSION}",
                vmm.display(),
                v.as_deref().unwrap_or("unknown")
            ),
            "husk install",
        ),
    });
    out
}

fn kernel_image(kernel: &Path) -> Check {
    let mut magic = [0u8; 4];
    match fs::File::open(kernel).and_then(|mut f| f.read_exact(&mut magic)) {
        Err(e) => fail(
            "guest kernel",
            format!("{}: {e}", kernel.display()),
            "build the guest image (guest-image/build.sh) and husk install, or set guest.kernel in husk's config",
        ),
        Ok(()) if &magic != b"\x7fELF" => fail(
            "guest kernel",
            format!("{} is not an ELF vmlinux (husk-vmm boots the uncompressed ELF kernel, not a bzImage)", kernel.display()),
            "point guest.kernel at the vmlinux guest-image/build.sh builds",
        ),
        Ok(()) => ok("guest kernel", format!("{} (ELF)", kernel.display())),
    }
}

/// The most of an initramfs read, decompressed: a guard against a wrong file, not a limit
/// any real one comes near.
const INITRAMFS_MAX: u64 = 512 << 20;

fn initramfs_image(initramfs: &Path) -> Check {
    let fix = "build the guest image (guest-image/build.sh) and husk install, or set guest.initramfs in husk's config";
    let data = match read_initramfs(initramfs) {
        Ok(d) => d,
        Err(e) => return fail("guest image", format!("{}: {e}", initramfs.display()), fix),
    };
    let Some(init) = cpio_file(&data, "init") else {
        return fail(
            "guest image",
            format!(
                "{} has no /init (not a newc cpio archive, or not husk's)",
                initramfs.display()
            ),
            fix,
        );
    };
    let want = husk_proto::AGENT_MARK.trim_end_matches('\0');
    match agent_mark(init) {
        Some(m) if m == want => ok(
            "guest image",
            format!("{}: its /init is husk-agent {VERSION} (API {})", initramfs.display(), husk_proto::API_VERSION),
        ),
        Some(m) => fail(
            "guest image",
            format!("{}: its /init says {m}, husk wants {want}", initramfs.display()),
            fix,
        ),
        None => fail(
            "guest image",
            format!("{}: its /init carries no husk-agent version: an agent older than husk {VERSION}, or not husk's", initramfs.display()),
            fix,
        ),
    }
}

/// The initramfs, gunzipped when it is gzip.
fn read_initramfs(p: &Path) -> std::io::Result<Vec<u8>> {
    let f = fs::File::open(p)?;
    let mut head = [0u8; 2];
    let gz = fs::File::open(p)?.read_exact(&mut head).is_ok() && head == [0x1f, 0x8b];
    let mut data = Vec::new();
    if gz {
        flate2::read::MultiGzDecoder::new(f)
            .take(INITRAMFS_MAX)
            .read_to_end(&mut data)?;
    } else {
        f.take(INITRAMFS_MAX).read_to_end(&mut data)?;
    }
    Ok(data)
}

/// The contents of `name` in a newc ("070701") cpio archive.
fn cpio_file<'a>(data: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    let align = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while data.len() >= at + 110 && &data[at..at + 6] == b"070701" {
        let h = &data[at..at + 110];
        let filesize = hex(&h[54..62])?;
        let namesize = hex(&h[94..102])?;
        let name_end = at + 110 + namesize;
        let entry = data.get(at + 110..name_end.checked_sub(1)?)?;
        let body = align(name_end);
        let end = body.checked_add(filesize)?;
        let entry = std::str::from_utf8(entry).ok()?;
        if entry == "TRAILER!!!" {
            return None;
        }
        if entry.trim_start_matches("./").trim_start_matches('/') == name {
            return data.get(body..end);
        }
        at = align(end);
    }
    None
}

/// The version mark ([`husk_proto::AGENT_MARK`]) an agent binary carries, without its NUL.
fn agent_mark(bin: &[u8]) -> Option<String> {
    let start = memchr::memmem::find(bin, b"husk-agent-version=")?;
    let rest = &bin[start..];
    let end = rest
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(rest.len())
        .min(80);
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Free space on the filesystem of `dir` (or of its nearest existing ancestor).
fn space(dir: &Path, why: &str) -> Check {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    match nix::sys::statvfs::statvfs(at) {
        Err(e) => warn(
            "space",
            format!("{}: {e}", dir.display()),
            "check the filesystem",
        ),
        Ok(s) => {
            let free = s.blocks_available() * s.fragment_size();
            let what = format!("{} free for {} ({why})", human(free), dir.display());
            if free < SPACE_FAIL {
                fail("space", what, format!("free space under {}", at.display()))
            } else if free < SPACE_WARN {
                warn("space", what, format!("free space under {}", at.display()))
            } else {
                ok("space", what)
            }
        }
    }
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", b >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newc(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |name: &str, body: &[u8]| {
            let h = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1, 0o100755, 0, 0, 1, 0, body.len(), 0, 0, 0, 0, name.len() + 1, 0
            );
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(body);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (n, b) in entries {
            push(n, b);
        }
        push("TRAILER!!!", b"");
        out
    }

    #[test]
    fn the_agent_of_an_initramfs_is_found_and_read() {
        let mut agent = b"\x7fELF....".to_vec();
        agent.extend_from_slice(husk_proto::AGENT_MARK.as_bytes());
        agent.extend_from_slice(b"more");
        let a = newc(&[("dev", b""), ("init", &agent)]);
        let init = cpio_file(&a, "init").unwrap();
        assert_eq!(init, &agent[..]);
        assert_eq!(
            agent_mark(init).unwrap(),
            husk_proto::AGENT_MARK.trim_end_matches('\0')
        );
        assert!(cpio_file(&a, "nothing").is_none());
        assert!(agent_mark(b"no mark here").is_none());
        // Truncated or not cpio at all: nothing, no panic.
        assert!(cpio_file(&a[..120], "init").is_none());
        assert!(cpio_file(b"garbage", "init").is_none());
    }
}
