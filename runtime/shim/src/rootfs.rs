//! A container's root filesystem on the host side: its OCI spec made fit for the guest, and
//! its rootfs as the layers the pod engine stacks in the VM.
//!
//! containerd's overlay snapshotter hands the shim the container's snapshot as one overlay
//! mount: committed snapshots as lowerdirs (the image's layers, immutable) and an upperdir
//! (the container's active snapshot, usually empty). The shim never mounts it: each lowerdir
//! comes from the layer cache (converted on the first use on this node, shared after), and
//! what is the container's alone (a non-empty upperdir; the files CRI bind-mounts from the
//! host: /etc/hosts, /etc/resolv.conf, /etc/hostname, the termination log, and volumes)
//! becomes a small layer of its own on top. Volumes cannot be shared into the VM yet: they
//! are copied at create time, each an opaque directory as a bind mount hides what is under
//! it, and /dev/shm becomes a tmpfs. Other snapshotters' mounts are mounted, packed into the
//! container's own layer (a copy, in proportion to the image) and unmounted.

use std::{
    fs,
    os::unix::fs::{chown, MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use containerd_shim::protos::types::mount::Mount;
use husk::{
    layers::{make_layer_image, LayerCache},
    pod::PodLayer,
};
use nix::mount::{umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Mount as OciMount, MountBuilder, Spec};

/// A host file or directory to copy into the container's own layer at `dest` (an absolute
/// container path).
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub src: PathBuf,
    pub dest: String,
}

/// Rewrites containerd's spec for a container that runs in the guest:
/// - namespaces with a path (the pod's, from the pause process on the host) are the VM's own
///   for network, ipc and uts, so they are dropped (the container shares the guest's, which
///   is the pod's); a pid namespace with a path (the sandbox's: a pod that shares its
///   processes) becomes the pod's PID namespace in the guest, never the agent's; the network
///   namespace is always the VM's;
/// - bind mounts of host files and directories become copies into the image (returned), and
///   a bind of the pod's /dev/shm becomes a tmpfs.
pub fn guest_spec(spec: &mut Spec) -> Result<Vec<Copy>> {
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces().clone() {
            let kept = ns
                .into_iter()
                .filter_map(|mut n| {
                    let joined = n.path().is_some();
                    match n.typ() {
                        LinuxNamespaceType::Network => None,
                        LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts if joined => None,
                        // The sandbox's PID namespace (shareProcessNamespace): the pod's in
                        // the guest, whose PID 1 is the pod's pause process there.
                        LinuxNamespaceType::Pid if joined => {
                            n.set_path(Some(husk_proto::POD_PID_NAMESPACE.into()));
                            Some(n)
                        }
                        _ => {
                            n.set_path(None);
                            Some(n)
                        }
                    }
                })
                .collect();
            linux.set_namespaces(Some(kept));
        }
        // The agent puts every container in its own cgroup under the pod's.
        linux.set_cgroups_path(None);
    }
    let mut copies = Vec::new();
    let mut mounts = Vec::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
        if !bind {
            mounts.push(m);
            continue;
        }
        let dest = m.destination().to_string_lossy().to_string();
        if dest == "/dev/shm" {
            mounts.push(shm_tmpfs()?);
            continue;
        }
        let src = m
            .source()
            .clone()
            .with_context(|| format!("the bind mount at {dest} has no source"))?;
        if !src.exists() {
            bail!(
                "the bind mount at {dest}: its source {} does not exist",
                src.display()
            );
        }
        copies.push(Copy { src, dest });
    }
    spec.set_mounts(Some(mounts));
    Ok(copies)
}

fn shm_tmpfs() -> Result<OciMount> {
    Ok(MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(
            ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        )
        .build()?)
}

/// Mounts containerd's rootfs mounts on `target` (one overlay or bind, as the snapshotters
/// hand them out).
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<()> {
    for m in mounts {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                other => data.push(other),
            }
        }
        let data = data.join(",");
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            Some(m.type_.as_str()).filter(|t| !t.is_empty() && *t != "bind"),
            flags,
            Some(data.as_str()).filter(|d| !d.is_empty()),
        )
        .with_context(|| {
            format!(
                "mounting the rootfs ({} {} -o {}) on {}",
                m.type_,
                m.source,
                m.options.join(","),
                target.display()
            )
        })?;
    }
    Ok(())
}

/// Unmounts `target` (lazily if busy); no error if nothing is mounted there.
pub fn unmount(target: &Path) {
    if umount2(target, MntFlags::empty()).is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
}

/// The overlay's lowerdirs (bottom first) and upperdir, if `mounts` is one overlay.
fn overlay_dirs(mounts: &[Mount]) -> Option<(Vec<PathBuf>, Option<PathBuf>)> {
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let mut lower = None;
    let mut upper = None;
    for o in &m.options {
        if let Some(l) = o.strip_prefix("lowerdir=") {
            lower = Some(l.split(':').map(PathBuf::from).rev().collect::<Vec<_>>());
        } else if let Some(u) = o.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(u));
        }
    }
    let lower = lower.filter(|l| !l.is_empty() && l.iter().all(|p| p.is_absolute()))?;
    Some((lower, upper))
}

/// What making a container's layers took.
#[derive(Debug, Default)]
pub struct LayersMade {
    pub layers: Vec<PodLayer>,
    /// Image layers found in the cache, and converted now.
    pub cached: usize,
    pub converted: usize,
    /// The container's own layers (made now, whatever the cache holds).
    pub own: usize,
    pub took: Duration,
}

/// The container's layers, bottom first: its image's from the layer cache, then its own
/// (a tree that is not an overlay of snapshots, a non-empty upperdir, the copies), made in
/// `work` (files that the pod engine unlinks once the VM holds them).
pub async fn layers(
    cache: LayerCache,
    mounts: Vec<Mount>,
    bundle_rootfs: PathBuf,
    copies: Vec<Copy>,
    work: PathBuf,
    id: String,
) -> Result<LayersMade> {
    tokio::task::spawn_blocking(move || {
        make_layers(&cache, &mounts, &bundle_rootfs, &copies, &work, &id)
    })
    .await
    .context("making the container's layers")?
}

fn make_layers(
    cache: &LayerCache,
    mounts: &[Mount],
    bundle_rootfs: &Path,
    copies: &[Copy],
    work: &Path,
    id: &str,
) -> Result<LayersMade> {
    let t0 = Instant::now();
    let mut made = LayersMade::default();
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let nonce = t0.elapsed().as_nanos() ^ u128::from(std::process::id());
    let own = |dir: &Path, made: &mut LayersMade| -> Result<()> {
        let n = made.own;
        let image = work.join(format!("{id}.{n}.layer"));
        make_layer_image(dir, &image).map_err(|why| {
            anyhow::anyhow!("packing {} into a layer of its own: {why}", dir.display())
        })?;
        made.layers.push(PodLayer {
            key: format!("own/{id}/{n}/{nonce:x}"),
            image,
            unlink: true,
        });
        made.own += 1;
        Ok(())
    };
    let mut lowers_top_first = Vec::new();
    match overlay_dirs(mounts) {
        Some((lower, upper)) => {
            for dir in &lower {
                let l = cache.snapshot(dir)?;
                if l.converted {
                    made.converted += 1;
                } else {
                    made.cached += 1;
                }
                made.layers.push(l.into());
            }
            lowers_top_first = lower.iter().rev().cloned().collect();
            if let Some(u) = upper.filter(|u| has_entries(u)) {
                lowers_top_first.insert(0, u.clone());
                own(&u, &mut made)?;
            }
        }
        None if mounts.is_empty() => own(bundle_rootfs, &mut made)?,
        None => {
            // Another snapshotter's mounts: mount, pack, unmount.
            fs::create_dir_all(bundle_rootfs)
                .with_context(|| format!("creating {}", bundle_rootfs.display()))?;
            mount_rootfs(mounts, bundle_rootfs)?;
            let r = own(bundle_rootfs, &mut made);
            unmount(bundle_rootfs);
            r?;
        }
    }
    if !copies.is_empty() {
        let staging = work.join(format!("{id}.copies"));
        let _ = fs::remove_dir_all(&staging);
        let r = stage_copies(copies, &lowers_top_first, &staging)
            .and_then(|()| own(&staging, &mut made));
        let _ = fs::remove_dir_all(&staging);
        r?;
    }
    made.took = t0.elapsed();
    Ok(made)
}

fn has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Puts each copy under `staging` at its destination: a file with its content, mode and
/// owner; a directory copied whole (`cp -a`) and marked opaque, so that it hides what the
/// image has there as a bind mount would. Directories made on the way take their mode and
/// owner from the image's layers (`lowers`, top first) where the image has them.
fn stage_copies(copies: &[Copy], lowers: &[PathBuf], staging: &Path) -> Result<()> {
    fs::create_dir_all(staging)?;
    for c in copies {
        let rel = relative(&c.dest)?;
        let dest = staging.join(&rel);
        let mut parent = PathBuf::new();
        for comp in rel.parent().into_iter().flat_map(Path::components) {
            parent.push(comp);
            let d = staging.join(&parent);
            if d.is_dir() {
                continue;
            }
            fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            let like = lowers.iter().map(|l| l.join(&parent)).find(|p| p.is_dir());
            let (mode, uid, gid) = like
                .and_then(|p| p.metadata().ok())
                .map(|m| (m.mode() & 0o7777, m.uid(), m.gid()))
                .unwrap_or((0o755, 0, 0));
            fs::set_permissions(&d, fs::Permissions::from_mode(mode))?;
            chown(&d, Some(uid), Some(gid))?;
        }
        let md = fs::metadata(&c.src).with_context(|| format!("reading {}", c.src.display()))?;
        if md.is_dir() {
            let _ = fs::remove_dir_all(&dest);
            fs::create_dir(&dest).with_context(|| format!("creating {}", dest.display()))?;
            let out = Command::new("cp")
                .arg("-a")
                .arg(c.src.join("."))
                .arg(&dest)
                .output()
                .context("running cp")?;
            if !out.status.success() {
                bail!(
                    "copying {} into the container: {}",
                    c.src.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            husk::image::lsetxattr(&dest, c"trusted.overlay.opaque", b"y")
                .with_context(|| format!("marking {} opaque", dest.display()))?;
        } else if md.is_file() {
            let _ = fs::remove_dir_all(&dest);
            fs::copy(&c.src, &dest)
                .with_context(|| format!("copying {} into the container", c.src.display()))?;
        } else {
            continue; // sockets, devices: nothing to copy
        }
        fs::set_permissions(&dest, fs::Permissions::from_mode(md.mode() & 0o7777))?;
        chown(&dest, Some(md.uid()), Some(md.gid()))?;
    }
    Ok(())
}

/// `dest` (an absolute container path) as a relative path of plain names.
fn relative(dest: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in Path::new(dest).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            _ => bail!("the mount destination {dest:?} leaves the container's root"),
        }
    }
    if rel.as_os_str().is_empty() {
        bail!("a mount at the container's root ({dest:?}) cannot be copied");
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pod_namespaces_become_the_vms() {
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {
                "cgroupsPath": "/kubepods/x",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/proc/42/ns/net"}
                ]
            }
        }));
        guest_spec(&mut s).unwrap();
        let linux = s.linux().as_ref().unwrap();
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            ns,
            vec![
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Mount, None)
            ]
        );
        assert_eq!(linux.cgroups_path(), &None);

        // A shared pid namespace (shareProcessNamespace) is the pod's in the guest, never
        // the agent's.
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}
        }));
        guest_spec(&mut s).unwrap();
        let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(
            (ns[0].typ(), ns[0].path().as_deref()),
            (
                LinuxNamespaceType::Pid,
                Some(Path::new(husk_proto::POD_PID_NAMESPACE))
            )
        );
    }

    #[test]
    fn host_binds_become_copies_and_shm_a_tmpfs() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind"]}
            ]
        }));
        let copies = guest_spec(&mut s).unwrap();
        assert_eq!(
            copies,
            vec![Copy {
                src: hosts.clone(),
                dest: "/etc/hosts".into()
            }]
        );
        let m = s.mounts().clone().unwrap();
        let kinds: Vec<_> = m
            .iter()
            .map(|m| (m.destination().to_str().unwrap(), m.typ().clone().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("/proc", "proc".to_string()),
                ("/dev/shm", "tmpfs".to_string())
            ]
        );

        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/data", "type": "bind", "source": "/nonexistent/husk"}]
        }));
        let e = guest_spec(&mut s).unwrap_err().to_string();
        assert!(
            e.contains("/data") && e.contains("/nonexistent/husk"),
            "{e}"
        );
    }

    fn debugfs(image: &Path, cmd: &str) -> String {
        let o = Command::new("debugfs")
            .args(["-R", cmd])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    fn overlay(lower_top_first: &[&Path], upper: &Path) -> Mount {
        let lower: Vec<String> = lower_top_first
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}/work", upper.display()),
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.join(":")),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn overlay_mounts_give_their_lowerdirs_bottom_first() {
        let m = overlay(
            &[Path::new("/s/3/fs"), Path::new("/s/1/fs")],
            Path::new("/s/4/fs"),
        );
        let (lower, upper) = overlay_dirs(&[m]).unwrap();
        assert_eq!(lower, [PathBuf::from("/s/1/fs"), PathBuf::from("/s/3/fs")]);
        assert_eq!(upper, Some(PathBuf::from("/s/4/fs")));
        let bind = Mount {
            type_: "bind".into(),
            source: "/s/1/fs".into(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        assert_eq!(overlay_dirs(&[bind]), None);
        assert_eq!(overlay_dirs(&[]), None);
    }

    #[test]
    fn image_layers_come_from_the_cache_and_copies_make_a_layer_of_their_own() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (chown, trusted.* xattrs)"
        );
        let d = tempfile::tempdir().unwrap();
        let (base, app, upper) = (
            d.path().join("s/1/fs"),
            d.path().join("s/2/fs"),
            d.path().join("s/3/fs"),
        );
        fs::create_dir_all(base.join("etc")).unwrap();
        fs::write(base.join("etc/hostname"), "image\n").unwrap();
        fs::create_dir_all(base.join("mnt")).unwrap();
        fs::set_permissions(base.join("mnt"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all(app.join("app")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        let host = d.path().join("hostname");
        fs::write(&host, "pod-a\n").unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(0o640)).unwrap();
        let vol = d.path().join("vol");
        fs::create_dir_all(vol.join("sub")).unwrap();
        fs::write(vol.join("sub/f"), "in a volume\n").unwrap();
        let copies = vec![
            Copy {
                src: host,
                dest: "/etc/hostname".into(),
            },
            Copy {
                src: vol,
                dest: "/mnt/deep/vol".into(),
            },
        ];
        let cache = LayerCache::new(d.path().join("cache"));
        let mounts = vec![overlay(&[&app, &base], &upper)];
        let work = d.path().join("work");
        let made = make_layers(
            &cache,
            &mounts,
            Path::new("/nonexistent"),
            &copies,
            &work,
            "c1",
        )
        .unwrap();
        assert_eq!((made.converted, made.cached, made.own), (2, 0, 1));
        assert_eq!(made.layers.len(), 3);
        assert!(!made.layers[0].unlink && made.layers[2].unlink);
        assert!(debugfs(&made.layers[0].image, "ls /").contains("etc"));
        assert!(debugfs(&made.layers[1].image, "ls /").contains("app"));
        let own = &made.layers[2].image;
        assert_eq!(debugfs(own, "cat /etc/hostname"), "pod-a\n");
        assert_eq!(debugfs(own, "cat /mnt/deep/vol/sub/f"), "in a volume\n");
        assert!(debugfs(own, "stat /etc/hostname").contains("Mode:  0640"));
        // /mnt takes the image's mode; the volume hides what the image has there.
        assert!(
            debugfs(own, "stat /mnt").contains("Mode:  0700"),
            "{}",
            debugfs(own, "stat /mnt")
        );
        assert!(debugfs(own, "ea_get /mnt/deep/vol trusted.overlay.opaque").contains("= \"y\""));
        assert!(
            !work.join("c1.copies").exists(),
            "the staging directory is left"
        );

        // A second container of the image: the layers are there; only its own is made.
        let made = make_layers(
            &cache,
            &mounts,
            Path::new("/nonexistent"),
            &copies,
            &work,
            "c2",
        )
        .unwrap();
        assert_eq!((made.converted, made.cached, made.own), (0, 2, 1));
        // A non-empty upperdir is a layer of its own too.
        fs::write(upper.join("written"), "by containerd").unwrap();
        let made =
            make_layers(&cache, &mounts, Path::new("/nonexistent"), &[], &work, "c3").unwrap();
        assert_eq!((made.cached, made.own), (2, 1));
        assert!(debugfs(&made.layers[2].image, "ls /").contains("written"));
        assert!(relative("/").is_err() && relative("/a/../../b").is_err());
    }
}
