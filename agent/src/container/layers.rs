//! A pod's image layers in the guest: each layer is a byte range of the pod's layered drive
//! (one virtio-blk device for all of them), made a partition of that drive with the BLKPG
//! ioctl and mounted read-only once per pod, whatever the count of containers that stack it.
//! A container's root is an overlay of its layers under an upper and work directory of its
//! own on the pod's scratch drive (ext4, mounted once). The last container to let go of a
//! layer unmounts it and deletes its partition.
//!
//! Paths under the store's root: `l/<n>` (layer mounts), `scratch` (the scratch drive),
//! `scratch/<container>/{upper,work}`. The partitions' device nodes are made in a directory
//! of their own on a file system that allows devices (the root is usually on a `nodev`
//! tmpfs), from sysfs, so that nothing depends on devtmpfs timing.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags},
    sys::stat::{Mode, SFlag},
};

use super::{syscall::Syscall, CreateError, DestroyError};

/// Partition numbers the kernel gives out per disk (DISK_MAX_PARTS is 256).
const MAX_PARTITIONS: u32 = 255;
/// Byte ranges must fall on the block size (BLKPG checks the logical block size; 4 KiB
/// keeps every filesystem block aligned).
const ALIGN: u64 = 4096;

/// One read-only layer: a byte range of the layered drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    pub key: String,
    pub start: u64,
    pub length: u64,
    pub fstype: String,
}

/// A container's root: `layers` (bottom first) on `device`, its upper on `scratch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layered {
    pub device: PathBuf,
    pub layers: Vec<LayerSpec>,
    pub scratch: PathBuf,
}

impl Layered {
    /// Checks what the host sent before anything is touched.
    pub fn validate(&self) -> Result<(), String> {
        if self.layers.is_empty() {
            return Err("no layers".into());
        }
        if self.layers.len() > MAX_PARTITIONS as usize {
            return Err(format!(
                "{} layers; a pod holds at most {MAX_PARTITIONS} at once",
                self.layers.len()
            ));
        }
        for (what, p) in [("device", &self.device), ("scratch", &self.scratch)] {
            if !p.starts_with("/dev/") || p.file_name().is_none() {
                return Err(format!("{what} {} is not a /dev path", p.display()));
            }
        }
        let mut keys = BTreeSet::new();
        for l in &self.layers {
            if l.key.is_empty() || !keys.insert(&l.key) {
                return Err(format!("layer key {:?} is empty or repeated", l.key));
            }
            if l.length == 0 || l.start % ALIGN != 0 || l.length % ALIGN != 0 {
                return Err(format!(
                    "layer {}: bytes {}+{} are not whole 4 KiB blocks",
                    l.key, l.start, l.length
                ));
            }
            if l.start
                .checked_add(l.length)
                .is_none_or(|e| e > i64::MAX as u64)
            {
                return Err(format!("layer {}: its range overflows", l.key));
            }
            if !matches!(l.fstype.as_str(), "ext4" | "erofs") {
                return Err(format!(
                    "layer {}: fstype {:?} (ext4 or erofs)",
                    l.key, l.fstype
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Mounted {
    pno: u32,
    device: PathBuf,
    refs: usize,
}

#[derive(Debug, Default)]
struct Inner {
    layers: HashMap<String, Mounted>,
    /// The scratch device mounted at `<root>/scratch`, once the first container came.
    scratch: Option<PathBuf>,
}

/// What one container holds: given back with [`LayerStore::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    keys: Vec<String>,
    scratch_dir: PathBuf,
}

/// The pod's layers and scratch drive.
#[derive(Debug)]
pub struct LayerStore {
    root: PathBuf,
    sys_block: PathBuf,
    nodes: PathBuf,
    inner: Mutex<Inner>,
}

fn layers_err(what: impl Into<String>) -> CreateError {
    CreateError::Layers(what.into())
}

impl LayerStore {
    /// A store under `root`, reading partitions' device numbers from `sys_block`
    /// (/sys/class/block in the guest) and making their nodes in `nodes`.
    pub fn new(
        root: impl Into<PathBuf>,
        sys_block: impl Into<PathBuf>,
        nodes: impl Into<PathBuf>,
    ) -> Self {
        LayerStore {
            root: root.into(),
            sys_block: sys_block.into(),
            nodes: nodes.into(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mounts container `id`'s root at `target`: the layers it lacks, the scratch drive if
    /// it is the first container, its upper and work directories, and the overlay. On
    /// failure everything it took is given back.
    pub fn mount(
        &self,
        sys: &dyn Syscall,
        id: &str,
        l: &Layered,
        target: &Path,
    ) -> Result<Held, CreateError> {
        l.validate()
            .map_err(|e| layers_err(format!("the layered rootfs: {e}")))?;
        let mut inner = self.lock();
        let scratch = self.mount_scratch(sys, &mut inner, &l.scratch)?;
        let mut held = Held {
            keys: Vec::new(),
            scratch_dir: scratch.join(id),
        };
        let r = self.mount_locked(sys, &mut inner, id, l, target, &mut held);
        if let Err(e) = r {
            self.release_locked(sys, &mut inner, &held);
            return Err(e);
        }
        Ok(held)
    }

    fn mount_locked(
        &self,
        sys: &dyn Syscall,
        inner: &mut Inner,
        id: &str,
        l: &Layered,
        target: &Path,
        held: &mut Held,
    ) -> Result<(), CreateError> {
        let mut dirs = Vec::with_capacity(l.layers.len());
        for layer in &l.layers {
            let pno = self.acquire(sys, inner, &l.device, layer)?;
            held.keys.push(layer.key.clone());
            dirs.push(self.root.join("l").join(pno.to_string()));
        }
        // A directory left by a container of this id that died with the agent's state.
        let _ = fs::remove_dir_all(&held.scratch_dir);
        let (upper, work) = (
            held.scratch_dir.join("upper"),
            held.scratch_dir.join("work"),
        );
        for d in [&upper, &work, &target.to_path_buf()] {
            fs::create_dir_all(d)
                .map_err(|e| layers_err(format!("creating {}: {e}", d.display())))?;
        }
        // overlayfs lists lower directories top first.
        let lower: Vec<String> = dirs.iter().rev().map(|d| d.display().to_string()).collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        sys.mount(
            Some(Path::new("overlay")),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(&data),
        )
        .map_err(|e| CreateError::MountRootfs {
            source_dev: format!("overlay of {} layers", dirs.len()).into(),
            fstype: "overlay".into(),
            target: target.to_path_buf(),
            source: e,
        })?;
        tracing::debug!(
            container = id,
            layers = dirs.len(),
            "layered rootfs mounted"
        );
        Ok(())
    }

    fn mount_scratch(
        &self,
        sys: &dyn Syscall,
        inner: &mut Inner,
        dev: &Path,
    ) -> Result<PathBuf, CreateError> {
        let dir = self.root.join("scratch");
        match &inner.scratch {
            Some(d) if d == dev => return Ok(dir),
            Some(d) => {
                return Err(layers_err(format!(
                    "the scratch drive is {}, not {}",
                    d.display(),
                    dev.display()
                )))
            }
            None => {}
        }
        fs::create_dir_all(&dir)
            .map_err(|e| layers_err(format!("creating {}: {e}", dir.display())))?;
        wait_for_size(dev);
        // noinit_itable: the host made the filesystem sparse; zeroing its inode tables in
        // the background would only fill the host's file.
        sys.mount(
            Some(dev),
            &dir,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            Some("noinit_itable"),
        )
        .map_err(|e| CreateError::MountRootfs {
            source_dev: dev.to_path_buf(),
            fstype: "ext4".into(),
            target: dir.clone(),
            source: e,
        })?;
        inner.scratch = Some(dev.to_path_buf());
        Ok(dir)
    }

    /// The partition number of `layer`, mounting it first if no container holds it.
    fn acquire(
        &self,
        sys: &dyn Syscall,
        inner: &mut Inner,
        device: &Path,
        layer: &LayerSpec,
    ) -> Result<u32, CreateError> {
        if let Some(m) = inner.layers.get_mut(&layer.key) {
            m.refs += 1;
            return Ok(m.pno);
        }
        let used: BTreeSet<u32> = inner.layers.values().map(|m| m.pno).collect();
        let pno = (1..=MAX_PARTITIONS)
            .find(|n| !used.contains(n))
            .ok_or_else(|| layers_err(format!("{MAX_PARTITIONS} layers are mounted already")))?;
        let what = |step: &str, e: &dyn std::fmt::Display| {
            layers_err(format!(
                "layer {} (bytes {}+{} of {}): {step}: {e}",
                layer.key,
                layer.start,
                layer.length,
                device.display()
            ))
        };
        sys.add_partition(device, pno, layer.start, layer.length)
            .map_err(|e| what(&format!("adding partition {pno}"), &e))?;
        let mounted = self.mount_partition(sys, device, pno, layer);
        if let Err(e) = mounted {
            let _ = sys.del_partition(device, pno);
            return Err(what("mounting it", &e));
        }
        inner.layers.insert(
            layer.key.clone(),
            Mounted {
                pno,
                device: device.to_path_buf(),
                refs: 1,
            },
        );
        Ok(pno)
    }

    fn mount_partition(
        &self,
        sys: &dyn Syscall,
        device: &Path,
        pno: u32,
        layer: &LayerSpec,
    ) -> Result<(), String> {
        let disk = device.file_name().expect("validated").to_string_lossy();
        let part = if disk.ends_with(|c: char| c.is_ascii_digit()) {
            format!("{disk}p{pno}")
        } else {
            format!("{disk}{pno}")
        };
        let dev_file = self.sys_block.join(&part).join("dev");
        let text = fs::read_to_string(&dev_file)
            .map_err(|e| format!("reading {}: {e}", dev_file.display()))?;
        let (major, minor) = text
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("{} says {:?}", dev_file.display(), text.trim()))?;
        let nodes = &self.nodes;
        fs::create_dir_all(nodes).map_err(|e| format!("creating {}: {e}", nodes.display()))?;
        let node = nodes.join(pno.to_string());
        let _ = fs::remove_file(&node);
        sys.mknod(
            &node,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(|e| format!("making {}: {e}", node.display()))?;
        let dir = self.root.join("l").join(pno.to_string());
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let data = (layer.fstype == "ext4").then_some("noload");
        sys.mount(
            Some(&node),
            &dir,
            Some(&layer.fstype),
            MsFlags::MS_RDONLY,
            data,
        )
        .map_err(|e| {
            let _ = fs::remove_file(&node);
            format!("mounting {} ({})", node.display(), e)
        })
    }

    /// Gives back what container `held` took (its overlay must be unmounted): its upper and
    /// work directories, and the layers no other container holds.
    pub fn release(&self, sys: &dyn Syscall, held: &Held) -> Result<(), DestroyError> {
        let mut inner = self.lock();
        self.release_locked(sys, &mut inner, held);
        match fs::remove_dir_all(&held.scratch_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DestroyError::StateDir {
                path: held.scratch_dir.clone(),
                source,
            }),
        }
    }

    fn release_locked(&self, sys: &dyn Syscall, inner: &mut Inner, held: &Held) {
        for key in &held.keys {
            let Some(m) = inner.layers.get_mut(key) else {
                continue;
            };
            m.refs -= 1;
            if m.refs > 0 {
                continue;
            }
            let m = inner.layers.remove(key).expect("just seen");
            let dir = self.root.join("l").join(m.pno.to_string());
            if let Err(Errno::EBUSY) = sys.umount2(&dir, MntFlags::empty()) {
                let _ = sys.umount2(&dir, MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir(&dir);
            let _ = fs::remove_file(self.nodes.join(m.pno.to_string()));
            // A lazily unmounted layer keeps its partition busy until its last user goes;
            // the number is free again either way (a new partition with it fails loudly).
            if let Err(e) = sys.del_partition(&m.device, m.pno) {
                tracing::warn!(layer = %key, pno = m.pno, "deleting the layer's partition: {e}");
            }
        }
    }

    /// How many layers are mounted (for tests and stats).
    pub fn mounted(&self) -> usize {
        self.lock().layers.len()
    }
}

/// Waits, at most 2 s, until the guest's kernel sees `dev` with a size: a drive filled after
/// the VM started (the scratch drive of a template's clone) has none until its driver took
/// the config change the VMM raised. A device with no size in sysfs is not waited for.
fn wait_for_size(dev: &Path) {
    let Some(name) = dev.file_name() else {
        return;
    };
    let size = Path::new("/sys/class/block").join(name).join("size");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < until {
        match fs::read_to_string(&size) {
            Ok(s) if s.trim() == "0" => std::thread::sleep(std::time::Duration::from_millis(5)),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::syscall::test::{Call, Recorder};
    use super::*;

    fn layer(key: &str, start: u64) -> LayerSpec {
        LayerSpec {
            key: key.into(),
            start,
            length: 8192,
            fstype: "ext4".into(),
        }
    }

    fn root(keys: &[(&str, u64)]) -> Layered {
        Layered {
            device: "/dev/vda".into(),
            layers: keys.iter().map(|(k, s)| layer(k, *s)).collect(),
            scratch: "/dev/vdb".into(),
        }
    }

    /// A store whose sysfs says partition N of vda is 259:N.
    fn store(d: &Path) -> LayerStore {
        for n in 1..=8 {
            let p = d.join("sys").join(format!("vda{n}"));
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("dev"), format!("259:{n}\n")).unwrap();
        }
        LayerStore::new(d.join("state"), d.join("sys"), d.join("nodes"))
    }

    fn partitions(sys: &Recorder) -> Vec<Call> {
        sys.calls
            .borrow()
            .iter()
            .filter(|c| matches!(c, Call::AddPartition { .. } | Call::DelPartition { .. }))
            .cloned()
            .collect()
    }

    #[test]
    fn layers_are_mounted_once_per_pod_and_stacked_top_first() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let sys = Recorder::default();
        let a = s
            .mount(
                &sys,
                "c1",
                &root(&[("base", 1 << 20), ("app", 2 << 20)]),
                &d.path().join("r1"),
            )
            .unwrap();
        let b = s
            .mount(
                &sys,
                "c2",
                &root(&[("base", 1 << 20), ("other", 3 << 20)]),
                &d.path().join("r2"),
            )
            .unwrap();
        assert_eq!(s.mounted(), 3);
        assert_eq!(
            partitions(&sys),
            vec![
                Call::AddPartition {
                    pno: 1,
                    start: 1 << 20,
                    length: 8192
                },
                Call::AddPartition {
                    pno: 2,
                    start: 2 << 20,
                    length: 8192
                },
                Call::AddPartition {
                    pno: 3,
                    start: 3 << 20,
                    length: 8192
                },
            ]
        );
        let st = d.path().join("state");
        let mounts = sys.mounts();
        // The scratch drive once, then the layers, then each overlay with its top layer first.
        let data: Vec<Option<String>> = mounts
            .iter()
            .map(|m| match m {
                Call::Mount { data, .. } => data.clone(),
                _ => None,
            })
            .collect();
        assert_eq!(data[0].as_deref(), Some("noinit_itable"));
        assert_eq!(
            data.iter()
                .filter(|d| d.as_deref() == Some("noload"))
                .count(),
            3
        );
        let l = |n: u32| st.join("l").join(n.to_string()).display().to_string();
        let overlay = |id: &str, lower: String| {
            Some(format!(
                "lowerdir={lower},upperdir={}/scratch/{id}/upper,workdir={}/scratch/{id}/work",
                st.display(),
                st.display()
            ))
        };
        assert_eq!(data[3], overlay("c1", format!("{}:{}", l(2), l(1))));
        assert_eq!(data[5], overlay("c2", format!("{}:{}", l(3), l(1))));
        assert!(st.join("scratch/c1/upper").is_dir() && st.join("scratch/c2/work").is_dir());

        // c1 goes: "app" is unmounted and its partition deleted; "base" stays for c2.
        s.release(&sys, &a).unwrap();
        assert_eq!(s.mounted(), 2);
        assert!(!st.join("scratch/c1").exists());
        assert_eq!(
            partitions(&sys).last(),
            Some(&Call::DelPartition { pno: 2 })
        );
        // A new container reuses the freed number.
        let c = s
            .mount(&sys, "c3", &root(&[("new", 4 << 20)]), &d.path().join("r3"))
            .unwrap();
        assert_eq!(
            partitions(&sys).last(),
            Some(&Call::AddPartition {
                pno: 2,
                start: 4 << 20,
                length: 8192
            })
        );
        s.release(&sys, &b).unwrap();
        s.release(&sys, &c).unwrap();
        assert_eq!(s.mounted(), 0);
        assert_eq!(
            partitions(&sys)
                .iter()
                .filter(|c| matches!(c, Call::DelPartition { .. }))
                .count(),
            4
        );
    }

    #[test]
    fn a_failed_mount_gives_back_what_it_took() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let sys = Recorder::default();
        s.mount(
            &sys,
            "c1",
            &root(&[("base", 1 << 20)]),
            &d.path().join("r1"),
        )
        .unwrap();
        // Partition 3's sysfs entry is missing: the second layer of c2 cannot be mounted.
        fs::remove_dir_all(d.path().join("sys/vda3")).unwrap();
        let e = s
            .mount(
                &sys,
                "c2",
                &root(&[("base", 1 << 20), ("mid", 2 << 20), ("top", 3 << 20)]),
                &d.path().join("r2"),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer top") && e.contains("vda3"), "{e}");
        // base is still held by c1 only; mid was mounted for c2 and given back.
        assert_eq!(s.mounted(), 1);
        assert!(partitions(&sys).contains(&Call::DelPartition { pno: 2 }));
        assert!(partitions(&sys).contains(&Call::DelPartition { pno: 3 }));
        assert!(!d.path().join("state/scratch/c2").exists());
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_touched() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let sys = Recorder::default();
        let mut bad = root(&[("a", 1 << 20)]);
        bad.layers[0].start = 1000;
        let mut dup = root(&[("a", 1 << 20), ("a", 2 << 20)]);
        let mut fstype = root(&[("a", 1 << 20)]);
        fstype.layers[0].fstype = "vfat".into();
        let mut dev = root(&[("a", 1 << 20)]);
        dev.device = "/etc/passwd".into();
        let none = root(&[]);
        let mut over = root(&[("a", 1 << 20)]);
        over.layers[0].start = u64::MAX - 4095;
        for (r, want) in [
            (&bad, "4 KiB"),
            (&dup, "repeated"),
            (&fstype, "vfat"),
            (&dev, "not a /dev path"),
            (&none, "no layers"),
            (&over, "overflows"),
        ] {
            let e = s.mount(&sys, "c", r, &d.path().join("r")).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        dup.layers.clear();
        assert!(sys.calls.borrow().is_empty(), "{:?}", sys.calls.borrow());
    }
}
