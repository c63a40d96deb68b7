//! husk's configuration file, `/etc/husk/config.toml` (or the file `$HUSK_CONFIG` names).
//! Every key is optional; a missing file means all defaults.
//!
//! ```toml
//! [guest]
//! kernel = "/var/cache/husk/current/vmlinux"          # default: $HUSK_CACHE/current/vmlinux
//! initramfs = "/var/cache/husk/current/initramfs.cpio.gz"
//! kernel_args = "loglevel=7"                          # appended to the guest command line
//!
//! [vmm]
//! path = "/usr/local/bin/husk-vmm"                    # default: husk-vmm next to the caller
//! confine = true     # the VMM's jail, seccomp filters and cgroup; false only to debug it
//! uids = "1600000000-1600065535"  # the users (and groups) confined VMMs run as, one each
//! virtiofsd = "/usr/local/libexec/husk/virtiofsd"  # serves each pod's shared directory
//!
//! [pod]              # a containerd pod's VM when CRI gives no sandbox sizes
//! vcpus = 1
//! memory_mib = 256
//! overhead_mib = 64  # added to the CRI sandbox memory (guest kernel and agent)
//! scratch_gib = 10   # each pod's scratch drive (sparse: containers' writes), in GiB
//! templates = true   # start pods from VM templates (storage dir's templates/); false: boot
//!                    # each pod's kernel (no memory pages shared between pods' VMs)
//!
//! [storage]
//! dir = "/var/lib/husk"  # the layer cache (layers/), pods' scratch drives (scratch/) and
//!                        # VM templates (templates/)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml_edit::{DocumentMut, Item};

/// The default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";

/// What the configuration file says (or the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub kernel_args: String,
    pub vmm: Option<PathBuf>,
    /// Confine the VMM (jail, seccomp filters per thread, cgroup); off only for debugging.
    pub confine: bool,
    /// The user ids (each also a group id) confined VMMs run as, one per VM.
    pub uids: crate::uid_lease::UidRange,
    /// The vhost-user-fs backend each pod's shared directory is served by.
    pub virtiofsd: PathBuf,
    pub pod: PodDefaults,
    /// The layer cache is `<storage_dir>/layers`, pods' scratch drives `<storage_dir>/scratch`.
    pub storage_dir: PathBuf,
}

/// The size of a pod's VM.
#[derive(Debug, Clone, PartialEq)]
pub struct PodDefaults {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub overhead_mib: u32,
    pub scratch_gib: u32,
    /// Start pods' VMs from templates (see [`crate::template`]).
    pub templates: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: None,
            initramfs: None,
            kernel_args: String::new(),
            vmm: None,
            confine: true,
            uids: Default::default(),
            virtiofsd: "/usr/local/libexec/husk/virtiofsd".into(),
            pod: PodDefaults {
                vcpus: 1,
                memory_mib: 256,
                overhead_mib: 64,
                scratch_gib: 10,
                templates: true,
            },
            storage_dir: "/var/lib/husk".into(),
        }
    }
}

impl Config {
    /// Reads `$HUSK_CONFIG`, else `/etc/husk/config.toml`; defaults when the file does not
    /// exist. A file that exists but is wrong is an error that names the file and the key.
    pub fn load() -> Result<Config> {
        let path = std::env::var_os("HUSK_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_PATH.into());
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Parses the file's text.
    /// The layer cache's directory.
    pub fn layer_cache(&self) -> crate::layers::LayerCache {
        crate::layers::LayerCache::new(self.storage_dir.join("layers"))
    }

    /// Where pods' scratch drives are made.
    pub fn scratch_dir(&self) -> PathBuf {
        self.storage_dir.join("scratch")
    }

    pub fn parse(text: &str) -> Result<Config> {
        let doc: DocumentMut = text.parse().context("not valid TOML")?;
        let mut c = Config::default();
        for (table, item) in doc.iter() {
            let Some(t) = item.as_table() else {
                bail!("{table}: expected a table ([{table}])");
            };
            for (key, v) in t.iter() {
                let name = format!("{table}.{key}");
                match name.as_str() {
                    "guest.kernel" => c.kernel = Some(path(&name, v)?),
                    "guest.initramfs" => c.initramfs = Some(path(&name, v)?),
                    "guest.kernel_args" => c.kernel_args = string(&name, v)?,
                    "vmm.path" => c.vmm = Some(path(&name, v)?),
                    "vmm.confine" => {
                        c.confine = v
                            .as_bool()
                            .with_context(|| format!("{name}: expected true or false"))?
                    }
                    "vmm.uids" => {
                        c.uids = string(&name, v)?
                            .parse()
                            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
                    }
                    "vmm.virtiofsd" => c.virtiofsd = path(&name, v)?,
                    "pod.vcpus" => c.pod.vcpus = int(&name, v, 1, 64)? as u8,
                    "pod.memory_mib" => c.pod.memory_mib = int(&name, v, 64, 3072)? as u32,
                    "pod.overhead_mib" => c.pod.overhead_mib = int(&name, v, 0, 1024)? as u32,
                    "pod.scratch_gib" => c.pod.scratch_gib = int(&name, v, 1, 4096)? as u32,
                    "pod.templates" => {
                        c.pod.templates = v
                            .as_bool()
                            .with_context(|| format!("{name}: expected true or false"))?
                    }
                    "storage.dir" => c.storage_dir = path(&name, v)?,
                    _ => bail!(
                        "unknown key {name} (known: guest.kernel, guest.initramfs, guest.kernel_args, vmm.path, vmm.confine, vmm.uids, vmm.virtiofsd, pod.vcpus, pod.memory_mib, pod.overhead_mib, pod.scratch_gib, pod.templates, storage.dir)"
                    ),
                }
            }
        }
        Ok(c)
    }
}

fn string(name: &str, v: &Item) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .with_context(|| format!("{name}: expected a string"))
}

fn path(name: &str, v: &Item) -> Result<PathBuf> {
    let s = string(name, v)?;
    if !Path::new(&s).is_absolute() {
        bail!("{name}: expected an absolute path, got {s:?}");
    }
    Ok(s.into())
}

fn int(name: &str, v: &Item, min: i64, max: i64) -> Result<i64> {
    let n = v
        .as_integer()
        .with_context(|| format!("{name}: expected an integer"))?;
    if !(min..=max).contains(&n) {
        bail!("{name}: {n} is out of range ({min} to {max})");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn every_key() {
        let c = Config::parse(
            r#"
[guest]
kernel = "/k/vmlinux"
initramfs = "/k/initrd"
kernel_args = "loglevel=7"
[vmm]
path = "/opt/husk-vmm"
confine = false
uids = "5000-5999"
virtiofsd = "/opt/virtiofsd"
[pod]
vcpus = 2
memory_mib = 512
overhead_mib = 32
scratch_gib = 20
templates = false
[storage]
dir = "/srv/husk"
"#,
        )
        .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k/vmlinux")));
        assert_eq!(c.initramfs.as_deref(), Some(Path::new("/k/initrd")));
        assert_eq!(c.kernel_args, "loglevel=7");
        assert_eq!(c.vmm.as_deref(), Some(Path::new("/opt/husk-vmm")));
        assert!(!c.confine && Config::default().confine);
        assert_eq!(c.uids.to_string(), "5000-5999");
        assert_eq!(c.virtiofsd, Path::new("/opt/virtiofsd"));
        assert_eq!(
            c.pod,
            PodDefaults {
                vcpus: 2,
                memory_mib: 512,
                overhead_mib: 32,
                scratch_gib: 20,
                templates: false,
            }
        );
        assert_eq!(c.storage_dir, Path::new("/srv/husk"));
        assert_eq!(c.layer_cache().dir(), Path::new("/srv/husk/layers"));
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        assert!(e("[pod]\nmemory = 5").contains("unknown key pod.memory"));
        assert!(e("[pod]\nvcpus = 0").contains("pod.vcpus: 0 is out of range"));
        assert!(e("[pod]\nvcpus = \"2\"").contains("pod.vcpus: expected an integer"));
        assert!(
            e("[guest]\nkernel = \"vmlinux\"").contains("guest.kernel: expected an absolute path")
        );
        assert!(e("kernel = \"/x\"").contains("kernel: expected a table"));
        assert!(e("[guest").contains("not valid TOML"));
        assert!(e("[vmm]\nconfine = 1").contains("vmm.confine: expected true or false"));
        assert!(e("[vmm]\nuids = \"0-10\"").contains("vmm.uids: \"0-10\": expected FIRST-LAST"));
    }
}
