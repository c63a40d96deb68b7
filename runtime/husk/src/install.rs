//! `husk install` / `husk uninstall`: put the containerd shim on containerd's PATH and
//! register husk with containerd's CRI plugin as the runtime classes `husk` and `untrusted`
//! (the runtime containerd 1.6 picks for a pod annotated
//! `io.kubernetes.cri.untrusted-workload: "true"`).
//!
//! It is a standalone install: husk, the shim and husk-vmm go to a bin directory
//! (/usr/local/bin), the guest image and a Kubernetes RuntimeClass manifest to a share
//! directory (/usr/local/share/husk), and husk's configuration file points at that image, so
//! husk works once the build tree is gone.
//!
//! The config files are edited, not rewritten: everything else in them (comments, order, other
//! runtimes) stays as it was, and `uninstall` removes exactly what `install` added (a manifest
//! in the share directory lists it).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use toml_edit::{DocumentMut, Item, Table};

/// The shim binary; containerd maps runtime_type `io.containerd.husk.v2` to it.
pub const SHIM_BINARY: &str = "containerd-shim-husk-v2";
/// The VMM, installed beside the shim (which looks for it there).
pub const VMM_BINARY: &str = "husk-vmm";
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
/// The runtime names husk registers.
pub const RUNTIMES: [&str; 2] = ["husk", "untrusted"];
/// Where containerd's CRI plugin keeps its runtimes (config version 2).
const RUNTIMES_PATH: [&str; 4] = [
    "plugins",
    "io.containerd.grpc.v1.cri",
    "containerd",
    "runtimes",
];

/// The per-pod overhead the RuntimeClass declares (`overhead.podFixed`), so that the scheduler
/// counts what a husk pod costs the node beyond its containers' limits (README, "Pod
/// overhead"; tests/bench/overhead.sh measures it). Memory: the guest memory a VM gets beyond
/// its containers' limits (`pod.overhead_mib`, 64 MiB by default, which the guest kernel, the
/// agent and the page cache may fill) and the host processes' own (shim, VMM, virtiofsd:
/// 7.6 MiB PSS idle, release builds), with room for them to grow under I/O: 80 MiB. An idle
/// pod measured 36 MiB above a runc pod of the same container. CPU: an idle pod took 48-69
/// millicores in the testbed, where every guest timer tick is emulated (runc's: 1-2): 100m.
pub const POD_OVERHEAD_MEMORY_MIB: u32 = 80;
pub const POD_OVERHEAD_CPU_MILLI: u32 = 100;

/// What `husk install` wrote, in the share directory: `husk uninstall` removes exactly that.
const MANIFEST: &str = "install.json";
/// The Kubernetes RuntimeClass manifest `husk install` writes into the share directory.
pub const RUNTIMECLASS: &str = "runtimeclass.yaml";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    config: PathBuf,
    /// Where husk, the shim and husk-vmm go (the shim on containerd's PATH).
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Where the guest image and the RuntimeClass manifest go.
    #[arg(long, default_value = "/usr/local/share/husk")]
    share_dir: PathBuf,
    /// husk's configuration file, pointed at the installed guest image (default:
    /// $HUSK_CONFIG, else /etc/husk/config.toml).
    #[arg(long)]
    husk_config: Option<PathBuf>,
    /// The shim to install (default: containerd-shim-husk-v2 next to husk).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// Replace an `untrusted` runtime that points at another runtime.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    config: PathBuf,
    /// Where the binaries were installed (used when the install left no manifest).
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Where the guest image and the install's manifest are.
    #[arg(long, default_value = "/usr/local/share/husk")]
    share_dir: PathBuf,
    /// Keep the layer cache (default: remove it; it is made again on demand).
    #[arg(long)]
    keep_cache: bool,
}

/// What one install wrote: the files it put in place, and the keys of husk's config it set
/// (with the values they had before, restored by uninstall).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Manifest {
    files: Vec<PathBuf>,
    husk_config: PathBuf,
    husk_config_created: bool,
    /// key ("guest.kernel") -> (the value install set, the value before it or none).
    keys: std::collections::BTreeMap<String, (String, Option<String>)>,
}

fn husk_config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("HUSK_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| husk::config::DEFAULT_PATH.into())
}

/// Copies `src` to `dest` through a temporary file renamed over it (a running binary is
/// replaced, not overwritten); nothing when they are the same file. Returns whether it copied.
fn put(src: &Path, dest: &Path, mode: u32) -> Result<bool> {
    if fs::canonicalize(src).ok() == fs::canonicalize(dest).ok() {
        return Ok(false);
    }
    let name = dest.file_name().context("a file name")?.to_string_lossy();
    let tmp = dest.with_file_name(format!(".{name}.husk-tmp"));
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok(true)
}

/// The RuntimeClass of handler `husk`, with the measured per-pod overhead.
pub fn runtimeclass_yaml() -> String {
    [
        "# The Kubernetes RuntimeClass of husk, written by `husk install`: kubectl apply -f this",
        "# file, then give a pod `runtimeClassName: husk` (or, without it, the annotation",
        "# io.kubernetes.cri.untrusted-workload: \"true\", which containerd maps to husk too).",
        "# overhead.podFixed is what a husk pod costs the node beyond its containers (measured:",
        "# husk's README, \"Pod overhead\"); the scheduler adds it to the pod's requests.",
        "apiVersion: node.k8s.io/v1",
        "kind: RuntimeClass",
        "metadata:",
        "  name: husk",
        "handler: husk",
        "overhead:",
        "  podFixed:",
        &format!("    memory: \"{POD_OVERHEAD_MEMORY_MIB}Mi\""),
        &format!("    cpu: \"{POD_OVERHEAD_CPU_MILLI}m\""),
        "",
    ]
    .join("\n")
}

pub fn install(a: InstallArgs) -> Result<i32> {
    let husk_bin = std::env::current_exe().context("finding husk's own path")?;
    let shim = a
        .shim
        .unwrap_or_else(|| husk_bin.with_file_name(SHIM_BINARY));
    if !shim.is_file() {
        bail!(
            "the shim {} does not exist: build it (cargo build) or pass --shim",
            shim.display()
        );
    }
    // The shim finds husk-vmm next to itself.
    let vmm = shim.with_file_name(VMM_BINARY);
    if !vmm.is_file() {
        bail!("{} does not exist: build it (cargo build)", vmm.display());
    }
    let husk_config = husk_config_path(a.husk_config);
    let husk_text = match fs::read_to_string(&husk_config) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", husk_config.display())),
    };
    let cfg = match &husk_text {
        Some(t) => {
            husk::config::Config::parse(t).with_context(|| husk_config.display().to_string())?
        }
        None => husk::config::Config::default(),
    };
    let image = husk::vm::image_from(cfg);
    for (what, p) in [
        ("guest kernel", &image.kernel),
        ("initramfs", &image.initramfs),
    ] {
        if !p.is_file() {
            bail!(
                "the {what} {} does not exist: build the guest image with guest-image/build.sh",
                p.display()
            );
        }
    }
    // Everything that can be refused is checked before anything is written.
    let text = read_config(&a.config)?;
    let new =
        add_runtimes(&text, a.force).with_context(|| format!("editing {}", a.config.display()))?;
    let kernel = a.share_dir.join("vmlinux");
    let initramfs = a.share_dir.join("initramfs.cpio.gz");
    let (husk_new, mut keys) =
        point_at_image(husk_text.as_deref().unwrap_or(""), &kernel, &initramfs)
            .with_context(|| format!("editing {}", husk_config.display()))?;
    // Installed again over an install: what was there before the first one is what
    // uninstall restores.
    let mut created = husk_text.is_none();
    if let Some(old) = fs::read(a.share_dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        .filter(|m| m.husk_config == husk_config)
    {
        created = old.husk_config_created;
        for (key, (set, before)) in keys.iter_mut() {
            if let Some((old_set, old_before)) = old.keys.get(key) {
                if before.as_deref() == Some(old_set.as_str()) && old_set == set {
                    *before = old_before.clone();
                }
            }
        }
    }

    let mut manifest = Manifest {
        husk_config: husk_config.clone(),
        husk_config_created: created,
        keys,
        ..Default::default()
    };
    // What this run wrote (removed again if it fails), and the files the install consists of.
    let mut written = Vec::new();
    let mut files = Vec::new();
    let done = (|| -> Result<()> {
        for d in [&a.bin_dir, &a.share_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        for (src, dest, mode) in [
            (&husk_bin, a.bin_dir.join("husk"), 0o755),
            (&shim, a.bin_dir.join(SHIM_BINARY), 0o755),
            (&vmm, a.bin_dir.join(VMM_BINARY), 0o755),
            (&image.kernel, kernel.clone(), 0o644),
            (&image.initramfs, initramfs.clone(), 0o644),
        ] {
            if put(src, &dest, mode)? {
                written.push(dest.clone());
            }
            files.push(dest);
        }
        let rc = a.share_dir.join(RUNTIMECLASS);
        fs::write(&rc, runtimeclass_yaml()).with_context(|| format!("writing {}", rc.display()))?;
        written.push(rc.clone());
        files.push(rc);
        write_file(&husk_config, &husk_new)?;
        manifest.files = files.clone();
        let m = a.share_dir.join(MANIFEST);
        fs::write(&m, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| format!("writing {}", m.display()))?;
        written.push(m);
        write_config(&a.config, &new)
    })();
    if let Err(e) = done {
        // Nothing half installed: what this run wrote goes, husk's config goes back.
        for f in &written {
            let _ = fs::remove_file(f);
        }
        match &husk_text {
            Some(t) => {
                let _ = write_file(&husk_config, t);
            }
            None => {
                let _ = fs::remove_file(&husk_config);
            }
        }
        return Err(e);
    }
    println!(
        "installed husk, {SHIM_BINARY} and {VMM_BINARY} in {}, the guest image and {RUNTIMECLASS} in {}; {} points at that image; runtimes {} in {} (restart containerd to use them)",
        a.bin_dir.display(),
        a.share_dir.display(),
        husk_config.display(),
        RUNTIMES.join(" and "),
        a.config.display()
    );
    Ok(0)
}

/// husk's config text with guest.kernel and guest.initramfs set to the installed image, and
/// the keys set, each with the value it had.
#[allow(clippy::type_complexity)]
fn point_at_image(
    text: &str,
    kernel: &Path,
    initramfs: &Path,
) -> Result<(
    String,
    std::collections::BTreeMap<String, (String, Option<String>)>,
)> {
    let mut doc: DocumentMut = text.parse().context("not valid TOML")?;
    if !doc.contains_key("guest") {
        doc.insert("guest", Item::Table(Table::new()));
    }
    let guest = doc["guest"]
        .as_table_mut()
        .context("`guest` is not a table")?;
    let mut keys = std::collections::BTreeMap::new();
    for (key, p) in [("kernel", kernel), ("initramfs", initramfs)] {
        let value = p.to_string_lossy().into_owned();
        let before = guest.get(key).and_then(Item::as_str).map(str::to_string);
        guest.insert(key, toml_edit::value(value.clone()));
        keys.insert(format!("guest.{key}"), (value, before));
    }
    Ok((doc.to_string(), keys))
}

/// Undoes [`point_at_image`] where the keys still hold what install set; the text, and
/// whether nothing of substance is left in it.
fn restore_keys(
    text: &str,
    keys: &std::collections::BTreeMap<String, (String, Option<String>)>,
) -> Result<(String, bool)> {
    let mut doc: DocumentMut = text.parse().context("not valid TOML")?;
    for (name, (set, before)) in keys {
        let Some((table, key)) = name.split_once('.') else {
            continue;
        };
        let Some(t) = doc.get_mut(table).and_then(Item::as_table_mut) else {
            continue;
        };
        if t.get(key).and_then(Item::as_str) != Some(set.as_str()) {
            continue; // changed since: the operator's now
        }
        match before {
            Some(v) => {
                t.insert(key, toml_edit::value(v.clone()));
            }
            None => {
                t.remove(key);
            }
        }
        if t.is_empty() {
            doc.remove(table);
        }
    }
    let empty = doc.is_empty();
    Ok((doc.to_string(), empty))
}

pub fn uninstall(a: UninstallArgs) -> Result<i32> {
    if a.config.exists() {
        let text = read_config(&a.config)?;
        let new =
            remove_runtimes(&text).with_context(|| format!("editing {}", a.config.display()))?;
        if new != text {
            write_config(&a.config, &new)?;
        }
    }
    let manifest_path = a.share_dir.join(MANIFEST);
    let manifest: Option<Manifest> = match fs::read(&manifest_path) {
        Ok(b) => Some(
            serde_json::from_slice(&b)
                .with_context(|| format!("reading {}", manifest_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", manifest_path.display())),
    };
    // The layer cache's place comes from husk's config, read before it is restored.
    let cfg = husk::config::Config::load()?;
    let files = match &manifest {
        Some(m) => m.files.clone(),
        // An install from before the manifest: the binaries it put in bin_dir.
        None => [SHIM_BINARY, VMM_BINARY]
            .iter()
            .map(|n| a.bin_dir.join(n))
            .collect(),
    };
    for f in files
        .iter()
        .chain(manifest.as_ref().map(|_| &manifest_path))
    {
        match fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
        }
    }
    if let Some(m) = &manifest {
        match fs::read_to_string(&m.husk_config) {
            Ok(text) => {
                let (new, empty) = restore_keys(&text, &m.keys)
                    .with_context(|| format!("editing {}", m.husk_config.display()))?;
                if empty && m.husk_config_created {
                    fs::remove_file(&m.husk_config)
                        .with_context(|| format!("removing {}", m.husk_config.display()))?;
                    if let Some(d) = m.husk_config.parent() {
                        let _ = fs::remove_dir(d);
                    }
                } else if new != text {
                    write_file(&m.husk_config, &new)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", m.husk_config.display()))
            }
        }
        let _ = fs::remove_dir(&a.share_dir);
    }
    if !a.keep_cache {
        let cache = cfg.layer_cache();
        cache
            .remove_all()
            .with_context(|| format!("removing the layer cache {}", cache.dir().display()))?;
        // Empty unless a pod is running (its scratch file is unlinked at once).
        let _ = fs::remove_dir(cfg.scratch_dir());
        let _ = fs::remove_dir(&cfg.storage_dir);
    }
    println!(
        "removed {} file{} husk install put in place and husk's runtimes from {}",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        a.config.display()
    );
    Ok(0)
}

fn read_config(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes next to the file and renames over it: containerd never sees half a config.
fn write_config(path: &Path, text: &str) -> Result<()> {
    write_file(path, text)
}

/// Writes `text` next to `path` and renames it over `path` (parents made as needed).
fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.husk-tmp"));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn parse(text: &str) -> Result<DocumentMut> {
    let doc: DocumentMut = text.parse().context("not valid TOML")?;
    match doc.get("version").and_then(Item::as_integer) {
        Some(2) => Ok(doc),
        None if doc.is_empty() => Ok(doc),
        Some(v) => bail!("config version {v}: husk knows containerd's version 2 format"),
        None => bail!(
            "no `version = 2`: this is containerd's version 1 format; convert it with `containerd config migrate`"
        ),
    }
}

/// The runtimes table, created (with implicit parents) when `create`.
fn runtimes_table(doc: &mut DocumentMut, create: bool) -> Result<Option<&mut Table>> {
    let mut t = doc.as_table_mut();
    for key in &RUNTIMES_PATH {
        if !t.contains_key(key) {
            if !create {
                return Ok(None);
            }
            let mut n = Table::new();
            n.set_implicit(true);
            t.insert(key, Item::Table(n));
        }
        t = t[*key]
            .as_table_mut()
            .with_context(|| format!("`{key}` in {:?} is not a table", RUNTIMES_PATH))?;
    }
    Ok(Some(t))
}

fn is_ours(t: &Item) -> bool {
    t.get("runtime_type").and_then(Item::as_str) == Some(RUNTIME_TYPE)
}

/// The config text with husk's runtimes added (idempotent).
pub fn add_runtimes(text: &str, force: bool) -> Result<String> {
    let mut doc = parse(text)?;
    if doc.is_empty() {
        doc.insert("version", toml_edit::value(2));
    }
    let runtimes = runtimes_table(&mut doc, true)?.expect("created");
    for name in RUNTIMES {
        if let Some(existing) = runtimes.get(name) {
            if !is_ours(existing) && !force {
                bail!(
                    "containerd already has a runtime {name:?} (runtime_type {}); pass --force to make it husk",
                    existing
                        .get("runtime_type")
                        .and_then(Item::as_str)
                        .unwrap_or("unset")
                );
            }
        }
        let mut t = Table::new();
        t.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
        // A privileged container's devices would be the host's (containerd lists the host's
        // /dev): inside the VM they are other devices or none. The guest's own devices are
        // its /dev, as Kata has it.
        t.insert("privileged_without_host_devices", toml_edit::value(true));
        t.decor_mut().set_prefix(
            "
# Added by `husk install`; `husk uninstall` removes it.
",
        );
        runtimes.insert(name, Item::Table(t));
    }
    Ok(doc.to_string())
}

/// The config text without husk's runtimes (and without parent tables left empty by them).
pub fn remove_runtimes(text: &str) -> Result<String> {
    let mut doc = parse(text)?;
    let Some(runtimes) = runtimes_table(&mut doc, false)? else {
        return Ok(text.to_string());
    };
    for name in RUNTIMES {
        if runtimes.get(name).is_some_and(is_ours) {
            runtimes.remove(name);
        }
    }
    // Parents that only existed for our runtimes go too.
    prune_empty(doc.as_table_mut(), &RUNTIMES_PATH);
    Ok(doc.to_string())
}

/// The runtimes of `text` (a containerd config) whose runtime_type is husk's, by name.
pub fn registered(text: &str) -> Result<Vec<String>> {
    let mut doc = parse(text)?;
    let Some(runtimes) = runtimes_table(&mut doc, false)? else {
        return Ok(Vec::new());
    };
    Ok(runtimes
        .iter()
        .filter(|(_, t)| is_ours(t))
        .map(|(n, _)| n.to_string())
        .collect())
}

/// Removes the tables along `path` that are empty and were only implied by their children.
fn prune_empty(t: &mut Table, path: &[&str]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(child) = t.get_mut(first).and_then(Item::as_table_mut) else {
        return;
    };
    prune_empty(child, rest);
    if child.is_empty() && child.is_implicit() {
        t.remove(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's containerd 1.6 package ships.
    const DEBIAN: &str = r#"version = 2
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

    fn runtime_type(text: &str, name: &str) -> Option<String> {
        let v: toml_edit::DocumentMut = text.parse().unwrap();
        v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][name]["runtime_type"]
            .as_str()
            .map(str::to_string)
    }

    #[test]
    fn install_adds_both_runtimes_and_keeps_the_rest() {
        let out = add_runtimes(DEBIAN, false).unwrap();
        let v: toml_edit::DocumentMut = out.parse().unwrap();
        for name in RUNTIMES {
            assert_eq!(
                runtime_type(&out, name).as_deref(),
                Some(RUNTIME_TYPE),
                "{out}"
            );
            let r = &v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][name];
            assert_eq!(r["privileged_without_host_devices"].as_bool(), Some(true));
        }
        // Everything that was there is still there, byte for byte, in order.
        let mut rest = out.as_str();
        for line in DEBIAN.lines() {
            let i = rest
                .find(line)
                .unwrap_or_else(|| panic!("lost {line:?}:\n{out}"));
            rest = &rest[i + line.len()..];
        }
        // Idempotent.
        assert_eq!(add_runtimes(&out, false).unwrap(), out);
    }

    #[test]
    fn uninstall_restores_the_original() {
        let out = add_runtimes(DEBIAN, false).unwrap();
        assert_eq!(remove_runtimes(&out).unwrap(), DEBIAN);
        assert_eq!(remove_runtimes(DEBIAN).unwrap(), DEBIAN);
    }

    #[test]
    fn empty_or_missing_config_gets_a_version_2_file() {
        let out = add_runtimes("", false).unwrap();
        assert!(out.starts_with("version = 2"), "{out}");
        assert_eq!(
            runtime_type(&out, "untrusted").as_deref(),
            Some(RUNTIME_TYPE)
        );
        let back = remove_runtimes(&out).unwrap();
        assert_eq!(back.trim(), "version = 2");
    }

    #[test]
    fn another_untrusted_runtime_is_kept_unless_forced() {
        let mine = format!(
            "{DEBIAN}[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.untrusted]\n  runtime_type = \"io.containerd.kata.v2\"\n"
        );
        let e = add_runtimes(&mine, false).unwrap_err().to_string();
        assert!(e.contains("untrusted") && e.contains("kata"), "{e}");
        let out = add_runtimes(&mine, true).unwrap();
        assert_eq!(
            runtime_type(&out, "untrusted").as_deref(),
            Some(RUNTIME_TYPE)
        );
        // Uninstall never removes a runtime that is not husk's.
        assert_eq!(remove_runtimes(&mine).unwrap(), mine);
    }

    #[test]
    fn husk_config_points_at_the_image_and_goes_back() {
        let mine = "# mine\n[guest]\nkernel_args = \"loglevel=7\"\ninitramfs = \"/old/initrd\"\n\n[pod]\nvcpus = 2\n";
        let (new, keys) = point_at_image(
            mine,
            Path::new("/s/vmlinux"),
            Path::new("/s/initramfs.cpio.gz"),
        )
        .unwrap();
        let c = husk::config::Config::parse(&new).unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/s/vmlinux")));
        assert_eq!(
            c.initramfs.as_deref(),
            Some(Path::new("/s/initramfs.cpio.gz"))
        );
        assert_eq!(c.kernel_args, "loglevel=7");
        assert_eq!(c.pod.vcpus, 2);
        let (back, empty) = restore_keys(&new, &keys).unwrap();
        assert!(!empty);
        let c = husk::config::Config::parse(&back).unwrap();
        assert_eq!(c.kernel, None);
        assert_eq!(c.initramfs.as_deref(), Some(Path::new("/old/initrd")));
        assert!(back.starts_with("# mine"), "{back}");
        // A key the operator changed since is theirs: kept.
        let changed = new.replace("/s/vmlinux", "/mine/vmlinux");
        let (back, _) = restore_keys(&changed, &keys).unwrap();
        assert!(back.contains("/mine/vmlinux"), "{back}");
        // A config install created is empty again.
        let (new, keys) = point_at_image("", Path::new("/s/k"), Path::new("/s/i")).unwrap();
        let (back, empty) = restore_keys(&new, &keys).unwrap();
        assert!(empty, "{back}");
    }

    #[test]
    fn the_runtimeclass_declares_the_overhead() {
        let y = runtimeclass_yaml();
        for line in [
            "apiVersion: node.k8s.io/v1",
            "kind: RuntimeClass",
            "  name: husk",
            "handler: husk",
            "  podFixed:",
            &format!("    memory: \"{POD_OVERHEAD_MEMORY_MIB}Mi\""),
            &format!("    cpu: \"{POD_OVERHEAD_CPU_MILLI}m\""),
        ] {
            assert!(y.lines().any(|l| l == line), "no {line:?} in:\n{y}");
        }
    }

    #[test]
    fn version_1_configs_are_refused_with_the_way_out() {
        let e = add_runtimes("[plugins.cri]\n  sandbox_image = \"x\"\n", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("containerd config migrate"), "{e}");
        assert!(add_runtimes("version = 3\n", false).is_err());
        assert!(add_runtimes("not toml [", false).is_err());
    }
}
