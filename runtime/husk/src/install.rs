//! `husk install` / `husk uninstall`: put the containerd shim on containerd's PATH and
//! register husk with containerd's CRI plugin as the runtime classes `husk` and `untrusted`
//! (the runtime containerd 1.6 picks for a pod annotated
//! `io.kubernetes.cri.untrusted-workload: "true"`).
//!
//! The config file is edited, not rewritten: everything else in it (comments, order, other
//! runtimes) stays as it was, and `uninstall` removes exactly what `install` added.

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

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    config: PathBuf,
    /// Where the shim goes (on containerd's PATH).
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
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
    /// Where the shim was installed.
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Keep the layer cache (default: remove it; it is made again on demand).
    #[arg(long)]
    keep_cache: bool,
}

pub fn install(a: InstallArgs) -> Result<i32> {
    let shim = match a.shim {
        Some(s) => s,
        None => std::env::current_exe()
            .context("finding husk's own path")?
            .with_file_name(SHIM_BINARY),
    };
    if !shim.is_file() {
        bail!(
            "the shim {} does not exist: build it (cargo build) or pass --shim",
            shim.display()
        );
    }
    let text = read_config(&a.config)?;
    let new =
        add_runtimes(&text, a.force).with_context(|| format!("editing {}", a.config.display()))?;
    // The shim finds husk-vmm next to itself.
    let vmm = shim.with_file_name(VMM_BINARY);
    if !vmm.is_file() {
        bail!("{} does not exist: build it (cargo build)", vmm.display());
    }
    fs::create_dir_all(&a.bin_dir).with_context(|| format!("creating {}", a.bin_dir.display()))?;
    for (src, name) in [(&shim, SHIM_BINARY), (&vmm, VMM_BINARY)] {
        let dest = a.bin_dir.join(name);
        let tmp = a.bin_dir.join(format!(".{name}.tmp"));
        fs::copy(src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        fs::rename(&tmp, &dest).with_context(|| format!("installing {}", dest.display()))?;
    }
    let dest = a.bin_dir.join(SHIM_BINARY);
    write_config(&a.config, &new)?;
    println!(
        "installed {} and {VMM_BINARY}; runtimes {} in {} (restart containerd to use them)",
        dest.display(),
        RUNTIMES.join(" and "),
        a.config.display()
    );
    Ok(0)
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
    for name in [SHIM_BINARY, VMM_BINARY] {
        let dest = a.bin_dir.join(name);
        match fs::remove_file(&dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dest.display())),
        }
    }
    if !a.keep_cache {
        let cfg = husk::config::Config::load()?;
        let cache = cfg.layer_cache();
        cache
            .remove_all()
            .with_context(|| format!("removing the layer cache {}", cache.dir().display()))?;
        // Empty unless a pod is running (its scratch file is unlinked at once).
        let _ = fs::remove_dir(cfg.scratch_dir());
        let _ = fs::remove_dir(&cfg.storage_dir);
    }
    let dest = a.bin_dir.join(SHIM_BINARY);
    println!(
        "removed {} and husk's runtimes from {}",
        dest.display(),
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
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.husk-tmp");
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
    fn version_1_configs_are_refused_with_the_way_out() {
        let e = add_runtimes("[plugins.cri]\n  sandbox_image = \"x\"\n", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("containerd config migrate"), "{e}");
        assert!(add_runtimes("version = 3\n", false).is_err());
        assert!(add_runtimes("not toml [", false).is_err());
    }
}
