//! VM templates: a pod's VM restored from a snapshot of a booted, agent-ready VM instead of
//! booting a kernel.
//!
//! A template is made by booting a VM of the pod's shape (vCPUs, memory, its devices: the
//! layered drive, an empty scratch slot, an unconnected NIC if pods have a network, the
//! shared directory's virtio-fs device if they have one), waiting for its agent, telling the
//! agent it is a template (it then refuses container and network requests until a clone is
//! told it was restored), and snapshotting it to a file (husk-vmm's `snapshot` request). A
//! clone maps that file's memory privately (see husk-vmm's `--restore`; virtio-fs's backend
//! works on a bounce area of the VMM's, never on guest memory), gets the pod's scratch drive
//! and tap, is told `Restored` (fresh entropy for its RNG, the host's clock), and is a pod
//! like any other.
//!
//! The cache keeps one template per key, in `DIR/ID/` (`memory`, `manifest.json`), where the
//! key is everything a template depends on: the content hashes of the VMM, the kernel and
//! the initramfs (which holds the agent), the kernel's arguments, the VM's size and which
//! devices it has. Any change makes another key, and another template. A template is made on
//! its first use, by the first pod that needs it (one maker at a time: the others boot cold
//! meanwhile), or ahead of time (`husk template make`).
//!
//! Before each use, the template is checked: its manifest must name this key, and the file
//! must be the one the manifest describes (size, inode, modification time, and the
//! snapshot's end mark). A template that fails is removed and made again, never restored.
//! Content hashes are not recomputed for each pod: each input's hash is cached under
//! `DIR/hashes/`, keyed by its path, inode, size and modification time.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use husk_vmm_api::net::MacAddr;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    pod::{LAYERS_DRIVE, SCRATCH_DRIVE},
    vm::{BootError, Drive, NetDevice, Vm, VmImage, VmSize},
};

/// Bumped when what a template VM holds changes in a way its key does not show.
const FORMAT: u32 = 1;

/// The mark the VMM ends a template file with.
const END_MARK: &[u8; 8] = b"HUSKVMT1";

/// The devices of a pod's VM beyond the ones every pod has (the layered and scratch drives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// A NIC (the pod has a network).
    pub net: bool,
    /// The shared directory's virtio-fs device.
    pub fs: bool,
}

/// What a template depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub format: u32,
    pub vmm_sha256: String,
    pub kernel_sha256: String,
    /// The initramfs, whose /init is the agent.
    pub initramfs_sha256: String,
    pub kernel_args: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub shape: Shape,
}

impl Key {
    /// The key of a template of `image` for a VM of `size` and `shape`.
    pub fn of(cache: &TemplateCache, image: &VmImage, size: &VmSize, shape: Shape) -> Result<Key> {
        Ok(Key {
            format: FORMAT,
            vmm_sha256: cache.content_hash(&in_path(&image.vmm))?,
            kernel_sha256: cache.content_hash(&image.kernel)?,
            initramfs_sha256: cache.content_hash(&image.initramfs)?,
            kernel_args: image.kernel_args.clone(),
            vcpus: size.vcpus,
            mem_mib: size.mem_mib,
            shape,
        })
    }

    /// The template's directory name: the first 16 hex digits of the key's hash.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).expect("a key serializes");
        hex(&Sha256::digest(json))[..16].to_string()
    }
}

/// `program` as the VMM's spawn finds it: a bare name through `$PATH`.
fn in_path(program: &Path) -> PathBuf {
    if program.components().count() != 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
}

/// Which file a manifest describes: a template file replaced, or written to in place, is
/// not that file any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    size: u64,
    ino: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            size: meta.len(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// What `manifest.json` says of a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: Key,
    file: FileId,
    /// The MAC of the template's NIC, which its clones' guests have until told the pod's.
    pub mac: Option<String>,
    /// How long making it took, in ms.
    pub made_in_ms: u64,
}

/// A template ready to restore.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub file: PathBuf,
    pub manifest: Manifest,
}

impl Template {
    /// The MAC its clones' guests have, if it has a NIC.
    pub fn mac(&self) -> Option<MacAddr> {
        self.manifest.mac.as_deref().and_then(|m| m.parse().ok())
    }
}

/// The template cache in a directory.
#[derive(Debug, Clone)]
pub struct TemplateCache {
    dir: PathBuf,
}

/// Why a template was refused.
#[derive(Debug)]
enum Refusal {
    Missing,
    Bad(String),
}

impl TemplateCache {
    pub fn new(dir: impl Into<PathBuf>) -> TemplateCache {
        TemplateCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sha256 of `path`'s content, from the hash cache when the file is the one it was
    /// computed of (same path, inode, size and modification time).
    pub fn content_hash(&self, path: &Path) -> Result<String> {
        let meta = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let id = FileId::of(&meta);
        let name = hex(&Sha256::digest(format!(
            "{}\0{}\0{}\0{}\0{}",
            path.display(),
            meta.dev(),
            id.ino,
            id.size,
            id.mtime_ns
        )));
        let cached = self.dir.join("hashes").join(&name[..32]);
        if let Ok(h) = fs::read_to_string(&cached) {
            if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(h);
            }
        }
        let mut f = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex(&hasher.finalize());
        // A cache: a failure to keep the hash costs only hashing again.
        if fs::create_dir_all(cached.parent().expect("in hashes/")).is_ok() {
            let _ = crate::layers::write_atomically(&cached, h.as_bytes());
        }
        Ok(h)
    }

    fn template_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The template of `key`, checked: its manifest names this key and describes the file.
    fn check(&self, key: &Key) -> Result<Template, Refusal> {
        let id = key.id();
        let dir = self.template_dir(&id);
        let text = match fs::read_to_string(dir.join("manifest.json")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Refusal::Missing),
            Err(e) => return Err(Refusal::Bad(format!("reading its manifest: {e}"))),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Refusal::Bad(format!("its manifest is not one: {e}")))?;
        if manifest.key != *key {
            return Err(Refusal::Bad(format!(
                "its manifest is of another key: {}",
                serde_json::to_string(&manifest.key).unwrap_or_default()
            )));
        }
        let file = dir.join("memory");
        let mut f = fs::File::open(&file)
            .map_err(|e| Refusal::Bad(format!("opening {}: {e}", file.display())))?;
        let meta = f
            .metadata()
            .map_err(|e| Refusal::Bad(format!("{}: {e}", file.display())))?;
        let now = FileId::of(&meta);
        if now != manifest.file {
            return Err(Refusal::Bad(format!(
                "{} changed since it was made (size, inode, mtime now {:?}, made {:?})",
                file.display(),
                (now.size, now.ino, now.mtime_ns),
                (
                    manifest.file.size,
                    manifest.file.ino,
                    manifest.file.mtime_ns
                )
            )));
        }
        let mut mark = [0u8; 8];
        f.seek(SeekFrom::End(-8))
            .and_then(|_| f.read_exact(&mut mark))
            .map_err(|e| Refusal::Bad(format!("reading {}'s end: {e}", file.display())))?;
        if &mark != END_MARK {
            return Err(Refusal::Bad(format!(
                "{} does not end with a template's mark",
                file.display()
            )));
        }
        Ok(Template { id, file, manifest })
    }

    /// The template of `key`, if it is there and sound; one that is not sound is removed
    /// (and logged), so the next [`TemplateCache::get_or_make`] makes it again.
    pub fn lookup(&self, key: &Key) -> Option<Template> {
        match self.check(key) {
            Ok(t) => Some(t),
            Err(Refusal::Missing) => None,
            Err(Refusal::Bad(why)) => {
                let id = key.id();
                tracing::warn!(template = %id, "refusing the VM template: {why}; removing it, to make it again");
                let _ = fs::remove_dir_all(self.template_dir(&id));
                None
            }
        }
    }

    /// The template for pods of `image`, `size` and `shape`: the cached one, or one made now
    /// ([`Got::Made`]), or none while another process makes it ([`Got::Busy`]: the caller
    /// boots cold meanwhile). A VMM that
    /// does not start, or a guest that does not boot, is [`MakeError::Start`] or
    /// [`MakeError::Boot`]: a cold boot of the same image would fail the same way.
    pub async fn get_or_make(
        &self,
        image: &VmImage,
        size: &VmSize,
        shape: Shape,
        cgroup: &str,
        boot_timeout: Duration,
    ) -> Result<Got, MakeError> {
        let key = Key::of(self, image, size, shape).map_err(MakeError::Other)?;
        if let Some(t) = self.lookup(&key) {
            return Ok(Got::Cached(t));
        }
        let id = key.id();
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))
            .map_err(MakeError::Other)?;
        // Held until the template is made; released when dropped.
        let Some(lock) = self.try_lock(&id).map_err(MakeError::Other)? else {
            tracing::info!(template = %id, "another process is making the VM template; booting cold");
            return Ok(Got::Busy);
        };
        // Made while we waited for the lock?
        if let Some(t) = self.lookup(&key) {
            return Ok(Got::Cached(t));
        }
        let t = self.make(&key, image, size, cgroup, boot_timeout).await?;
        drop(lock);
        Ok(Got::Made(t))
    }

    /// Makes the template of `key` (the caller holds its lock).
    async fn make(
        &self,
        key: &Key,
        image: &VmImage,
        size: &VmSize,
        cgroup: &str,
        boot_timeout: Duration,
    ) -> Result<Template, MakeError> {
        let id = key.id();
        let t0 = Instant::now();
        let dir = self.template_dir(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating {}", dir.display()))
            .map_err(MakeError::Other)?;
        // Removed unless the template is made: on an error, and when this future is dropped
        // (the caller interrupted) with its VM half made.
        let unfinished = RemoveOnDrop(Some(dir.clone()));
        let manifest = self
            .make_in(key, &dir, image, size, cgroup, boot_timeout)
            .await?;
        let manifest = Manifest {
            made_in_ms: t0.elapsed().as_millis() as u64,
            ..manifest
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        crate::layers::write_atomically(&dir.join("manifest.json"), &json)
            .context("writing the template's manifest")
            .map_err(MakeError::Other)?;
        unfinished.keep();
        tracing::info!(template = %id, ms = manifest.made_in_ms, "made the VM template");
        Ok(Template {
            id,
            file: dir.join("memory"),
            manifest,
        })
    }

    async fn make_in(
        &self,
        key: &Key,
        dir: &Path,
        image: &VmImage,
        size: &VmSize,
        cgroup: &str,
        boot_timeout: Duration,
    ) -> Result<Manifest, MakeError> {
        let other = MakeError::Other;
        let drives = [
            Drive::Layered {
                id: LAYERS_DRIVE.into(),
            },
            Drive::Empty {
                id: SCRATCH_DRIVE.into(),
                read_only: false,
                max_bytes: 0,
            },
        ];
        let mac = match key.shape.net {
            true => Some(
                crate::vm::random_mac()
                    .context("a MAC for the template's NIC")
                    .map_err(other)?,
            ),
            false => None,
        };
        let net = mac.map(|mac| NetDevice::Unconnected { mac });
        let vm_dir = dir.join("vm");
        let share = vm_dir.join("share");
        let image = VmImage {
            // The template's console is its VM's, removed with it.
            console_log: None,
            ..image.clone()
        };
        let mut vm = Vm::start(
            &image,
            size,
            &drives,
            net,
            &vm_dir,
            &format!("{cgroup}-template"),
            key.shape.fs.then_some(share.as_path()),
            None,
        )
        .map_err(|e| MakeError::Start(format!("{e:#}")))?;
        let agent = vm
            .connect_agent(boot_timeout)
            .await
            .map_err(MakeError::Boot)?;
        agent
            .prepare_template(husk_client::pb::Empty::new())
            .await
            .context("telling the template's agent it is one")
            .map_err(other)?;
        let tmp = dir.join("memory.tmp");
        let file = fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))
            .map_err(other)?;
        let control = vm.control(Duration::from_secs(60));
        let snap = tokio::task::spawn_blocking(move || control.snapshot(&file).map(|()| file))
            .await
            .expect("the snapshot task does not panic");
        let file = snap
            .map_err(|e| anyhow::anyhow!("{}", crate::vm::error_chain(&e)))
            .context("snapshotting the template's VM")
            .map_err(other)?;
        match vm.wait_exit(Duration::from_secs(10)).await {
            Ok(Some(s)) if s.success() => {}
            Ok(s) => {
                return Err(other(anyhow::anyhow!(
                    "the template's VMM ended with {s:?} after its snapshot"
                )))
            }
            Err(e) => return Err(other(e)),
        }
        file.sync_all()
            .context("syncing the template")
            .map_err(other)?;
        drop(vm);
        let path = dir.join("memory");
        fs::rename(&tmp, &path)
            .context("naming the template")
            .map_err(other)?;
        let meta = fs::metadata(&path).context("the template").map_err(other)?;
        Ok(Manifest {
            key: key.clone(),
            file: FileId::of(&meta),
            mac: mac.map(|m| m.to_string()),
            made_in_ms: 0,
        })
    }

    /// Every template in the cache: its id and manifest, or why it is not sound.
    pub fn list(&self) -> Vec<(String, Result<Manifest, String>)> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name == "hashes" || !e.path().is_dir() {
                continue;
            }
            let m = fs::read_to_string(e.path().join("manifest.json"))
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Manifest>(&t).map_err(|e| e.to_string()))
                .and_then(|m| match self.check(&m.key) {
                    Ok(_) => Ok(m),
                    Err(Refusal::Missing) => Err("no manifest".into()),
                    Err(Refusal::Bad(why)) => Err(why),
                });
            out.push((name, m));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The lock of template `id`'s making, or none while another process holds it.
    fn try_lock(&self, id: &str) -> Result<Option<Flock<fs::File>>> {
        let lock_path = self.dir.join(format!("{id}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
    }

    /// Removes `t`, which a VMM refused to restore, if it is still the file that was refused
    /// and no process is making it again meanwhile (then it is that process's to replace).
    pub fn remove_refused(&self, t: &Template) -> Result<()> {
        let Some(_lock) = self.try_lock(&t.id)? else {
            return Ok(());
        };
        match fs::metadata(&t.file) {
            Ok(meta) if FileId::of(&meta) == t.manifest.file => self.remove(&t.id),
            _ => Ok(()),
        }
    }

    /// Removes the template `id`; the VMs restored from it keep their mapping.
    pub fn remove(&self, id: &str) -> Result<()> {
        if id.is_empty() || id.contains('/') || id == "hashes" {
            bail!("{id:?} is not a template id");
        }
        let dir = self.template_dir(id);
        if !dir.is_dir() {
            bail!("there is no template {id} in {}", self.dir.display());
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
    }
}

/// What [`TemplateCache::get_or_make`] found.
#[derive(Debug)]
pub enum Got {
    /// The cached template, checked.
    Cached(Template),
    /// A template this process made now.
    Made(Template),
    /// Another process is making it.
    Busy,
}

/// Why a template could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    /// Its VMM did not start (a missing kernel, a VMM that does not run): neither would a
    /// cold-booted pod's.
    #[error("{0}")]
    Start(String),
    /// Its VM did not boot: a cold boot of the same image would not either.
    #[error("{0}")]
    Boot(BootError),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// A directory removed when this is dropped, unless kept.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cache: &TemplateCache, files: &Path) -> Key {
        let image = VmImage {
            vmm: files.join("vmm"),
            kernel: files.join("kernel"),
            initramfs: files.join("initramfs"),
            kernel_args: String::new(),
            console_log: None,
            confine: true,
            uids: Default::default(),
            virtiofsd: "/v".into(),
            templates: None,
        };
        let size = VmSize {
            vcpus: 1,
            mem_mib: 128,
        };
        Key::of(
            cache,
            &image,
            &size,
            Shape {
                net: true,
                fs: false,
            },
        )
        .unwrap()
    }

    /// A template whose manifest matches the key and whose file is the one it describes.
    fn plant(cache: &TemplateCache, key: &Key) -> PathBuf {
        let dir = cache.dir().join(key.id());
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("memory");
        let mut data = vec![0u8; 4096];
        data.extend_from_slice(END_MARK);
        fs::write(&file, &data).unwrap();
        let m = Manifest {
            key: key.clone(),
            file: FileId::of(&fs::metadata(&file).unwrap()),
            mac: Some("02:00:00:00:00:07".into()),
            made_in_ms: 1,
        };
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        file
    }

    /// A directory with a VMM, a kernel and an initramfs, and a cache in it.
    fn inputs() -> (tempfile::TempDir, TemplateCache) {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["vmm", "kernel", "initramfs"] {
            fs::write(tmp.path().join(f), f).unwrap();
        }
        let cache = TemplateCache::new(tmp.path().join("templates"));
        (tmp, cache)
    }

    #[test]
    fn any_input_changed_is_another_key() {
        let (tmp, cache) = inputs();
        let files = tmp.path();
        let k = key(&cache, files);
        assert_eq!(key(&cache, files), k, "the same inputs, the same key");
        std::thread::sleep(Duration::from_millis(10));
        fs::write(files.join("initramfs"), "another agent").unwrap();
        let k2 = key(&cache, files);
        assert_ne!(k2.initramfs_sha256, k.initramfs_sha256);
        assert_ne!(k2.id(), k.id());
        let other_size = Key {
            mem_mib: 256,
            ..k2.clone()
        };
        assert_ne!(other_size.id(), k2.id());
    }

    #[test]
    fn a_sound_template_is_found_and_a_changed_one_refused_and_removed() {
        let (tmp, cache) = inputs();
        let k = key(&cache, tmp.path());
        assert!(cache.lookup(&k).is_none());
        let file = plant(&cache, &k);
        let t = cache.lookup(&k).expect("a sound template");
        assert_eq!(t.mac().unwrap().to_string(), "02:00:00:00:00:07");
        // Written to in place (a byte of its memory changed): refused, and removed.
        std::thread::sleep(Duration::from_millis(10));
        let mut data = fs::read(&file).unwrap();
        data[100] = 1;
        fs::write(&file, &data).unwrap();
        assert!(matches!(cache.check(&k), Err(Refusal::Bad(w)) if w.contains("changed since")));
        assert!(cache.lookup(&k).is_none());
        assert!(
            !file.parent().unwrap().exists(),
            "a refused template is removed"
        );
        // A manifest of another key, and a file without the end mark.
        let file = plant(&cache, &k);
        let other = Key {
            mem_mib: 256,
            ..k.clone()
        };
        let dir = file.parent().unwrap();
        let mut m: Manifest =
            serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        m.key = other;
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(cache.check(&k), Err(Refusal::Bad(w)) if w.contains("another key")));
        let file = plant(&cache, &k);
        fs::write(&file, vec![0u8; 4096]).unwrap();
        let dir = file.parent().unwrap();
        let mut m: Manifest =
            serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        m.file = FileId::of(&fs::metadata(&file).unwrap());
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(cache.check(&k), Err(Refusal::Bad(w)) if w.contains("mark")));
        assert_eq!(cache.list().len(), 1);
        assert!(cache.list()[0].1.is_err());
        cache.remove(&k.id()).unwrap();
        assert!(cache.remove("../x").is_err());
    }
}
