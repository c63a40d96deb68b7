//! A container's root filesystem on the host side: its OCI spec made fit for the guest, and
//! its rootfs as the layers the pod engine stacks in the VM.
//!
//! containerd's overlay snapshotter hands the shim the container's snapshot as one overlay
//! mount: committed snapshots as lowerdirs (the image's layers, immutable) and an upperdir
//! (the container's active snapshot, usually empty). The shim never mounts it: each lowerdir
//! comes from the layer cache (converted on the first use on this node, shared after), and
//! a non-empty upperdir becomes a small layer of the container's own on top. Other
//! snapshotters' mounts are mounted, packed into the container's own layer (a copy, in
//! proportion to the image) and unmounted.
//!
//! What CRI bind-mounts from the host (volumes; /etc/hosts, /etc/resolv.conf, /etc/hostname,
//! the termination log) is shared live with the guest through the pod's shared directory
//! (virtio-fs, see [`husk::share`]): the spec's mount is rewritten to bind the guest's view
//! of it. /dev/shm becomes a tmpfs.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use containerd_shim::protos::types::mount::Mount;
use husk::{
    layers::{make_layer_image, LayerCache},
    pod::PodLayer,
    share::{writable_submounts, Propagation, ReadOnly, Volume},
};
use nix::mount::{umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Mount as OciMount, MountBuilder, Spec};

/// Rewrites containerd's spec for a container that runs in the guest:
/// - namespaces with a path (the pod's, from the pause process on the host) are the VM's own
///   for network, ipc and uts, so they are dropped (the container shares the guest's, which
///   is the pod's); a pid namespace with a path (the sandbox's: a pod that shares its
///   processes) becomes the pod's PID namespace in the guest, never the agent's; the network
///   namespace is always the VM's;
/// - bind mounts of host files and directories become volumes of container `id` (returned,
///   for the pod's shared directory), each bound from its place in the guest's share with
///   the options the spec gives; a bind of the pod's /dev/shm becomes a tmpfs. A read-only
///   (not `rro`) rbind leaves the host's writable mounts under its source writable, as runc
///   does: the guest sees the whole volume as one virtio-fs mount, so each of them gets a
///   read-write bind of its own in the guest, after the volume's.
pub fn guest_spec(spec: &mut Spec, id: &str) -> Result<Vec<Volume>> {
    // CRI's device requests name the host's devices (husk install sets
    // privileged_without_host_devices, so only requests come here): none of them exists in
    // the VM, so a request is refused rather than left to make a dead node.
    if let Some(devices) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .filter(|d| !d.is_empty())
    {
        let paths: Vec<_> = devices
            .iter()
            .map(|d| d.path().display().to_string())
            .collect();
        bail!(
            "host devices cannot be passed into the pod's VM (the guest has its own devices): {}",
            paths.join(", ")
        );
    }
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
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for mut m in spec.mounts().clone().unwrap_or_default() {
        let options = m.options().clone().unwrap_or_default();
        let has = |o: &str| options.iter().any(|x| x == o);
        let bind = m.typ().as_deref() == Some("bind") || has("bind") || has("rbind");
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
        let name = volumes.len().to_string();
        let volume = Volume {
            source: src,
            name: name.clone(),
            // containerd gives rbind; a bare "bind" type without it is not recursive.
            recursive: has("rbind"),
            read_only: if has("rro") {
                ReadOnly::Recursive
            } else if has("ro") {
                ReadOnly::Top
            } else {
                ReadOnly::No
            },
            propagation: if ["rslave", "slave", "rshared", "shared"]
                .iter()
                .any(|o| has(o))
            {
                Propagation::Slave
            } else {
                Propagation::Private
            },
        };
        let guest_src = Path::new(husk_proto::SHARED_DIR).join(id).join(&name);
        m.set_typ(Some("bind".into()));
        m.set_source(Some(guest_src.clone()));
        mounts.push(m.clone());
        if volume.recursive && volume.read_only == ReadOnly::Top {
            let sub_options: Vec<String> = options
                .iter()
                .filter(|o| *o != "ro")
                .cloned()
                .chain(["rw".to_string()])
                .collect();
            let submounts = writable_submounts(&volume.source)
                .with_context(|| format!("the bind mount at {dest}"))?;
            for rel in submounts {
                let mut sub = m.clone();
                sub.set_destination(m.destination().join(&rel));
                sub.set_source(Some(guest_src.join(&rel)));
                sub.set_options(Some(sub_options.clone()));
                mounts.push(sub);
            }
        }
        volumes.push(volume);
    }
    spec.set_mounts(Some(mounts));
    Ok(volumes)
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
    work: PathBuf,
    id: String,
) -> Result<LayersMade> {
    tokio::task::spawn_blocking(move || make_layers(&cache, &mounts, &bundle_rootfs, &work, &id))
        .await
        .context("making the container's layers")?
}

fn make_layers(
    cache: &LayerCache,
    mounts: &[Mount],
    bundle_rootfs: &Path,
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
            if let Some(u) = upper.filter(|u| has_entries(u)) {
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
    made.took = t0.elapsed();
    Ok(made)
}

fn has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

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
        guest_spec(&mut s, "c1").unwrap();
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
        guest_spec(&mut s, "c1").unwrap();
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
    fn a_read_only_rbind_keeps_the_hosts_writable_submounts_writable() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it mounts a tmpfs)"
        );
        let d = tempfile::tempdir().unwrap();
        let (rw, ro) = (d.path().join("rw"), d.path().join("ro"));
        for (p, flags) in [(&rw, MsFlags::empty()), (&ro, MsFlags::MS_RDONLY)] {
            std::fs::create_dir(p).unwrap();
            nix::mount::mount(Some("none"), p, Some("tmpfs"), flags, None::<&str>).unwrap();
        }
        let _unmount = scopeguard(|| {
            for p in [&rw, &ro] {
                let _ = umount2(p, MntFlags::MNT_DETACH);
            }
        });
        let bind = |o: &[&str]| serde_json::json!({"destination": "/data", "type": "bind", "source": d.path(), "options": o});
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [bind(&["rbind", "rprivate", "ro"]), bind(&["rbind", "rprivate", "ro", "rro"]), bind(&["bind", "ro"])]
        }));
        let volumes = guest_spec(&mut s, "c1").unwrap();
        assert_eq!(
            volumes.iter().map(|v| v.read_only).collect::<Vec<_>>(),
            [ReadOnly::Top, ReadOnly::Recursive, ReadOnly::Top]
        );
        let m: Vec<_> = s
            .mounts()
            .clone()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{} {} {}",
                    m.destination().display(),
                    m.source().clone().unwrap().display(),
                    m.options().clone().unwrap_or_default().join(",")
                )
            })
            .collect();
        assert_eq!(
            m,
            [
                "/data /run/husk/shared/c1/0 rbind,rprivate,ro",
                // The host's read-only submount needs nothing: the top's flag covers it.
                "/data/rw /run/husk/shared/c1/0/rw rbind,rprivate,rw",
                "/data /run/husk/shared/c1/1 rbind,rprivate,ro,rro",
                "/data /run/husk/shared/c1/2 bind,ro",
            ]
        );
    }

    /// Runs `f` when dropped.
    fn scopeguard(f: impl FnOnce()) -> impl Drop {
        struct Guard<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for Guard<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f()
                }
            }
        }
        Guard(Some(f))
    }

    #[test]
    fn host_binds_become_shared_volumes_and_shm_a_tmpfs() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind"]},
                {"destination": "/data", "type": "bind", "source": d.path(), "options": ["rbind", "rslave", "ro"]}
            ]
        }));
        let volumes = guest_spec(&mut s, "c1").unwrap();
        assert_eq!(
            volumes,
            vec![
                Volume {
                    source: hosts.clone(),
                    name: "0".into(),
                    recursive: true,
                    read_only: ReadOnly::No,
                    propagation: Propagation::Private,
                },
                Volume {
                    source: d.path().to_path_buf(),
                    name: "1".into(),
                    recursive: true,
                    read_only: ReadOnly::Top,
                    propagation: Propagation::Slave,
                }
            ]
        );
        let m = s.mounts().clone().unwrap();
        let kinds: Vec<_> = m
            .iter()
            .map(|m| {
                (
                    m.destination().to_str().unwrap(),
                    m.typ().clone().unwrap(),
                    m.source().clone().unwrap().display().to_string(),
                    m.options().clone().unwrap_or_default().join(","),
                )
            })
            .collect();
        let kind = |d: &'static str, t: &str, s: &str, o: &str| (d, t.into(), s.into(), o.into());
        assert_eq!(
            kinds,
            vec![
                kind("/proc", "proc", "proc", ""),
                kind(
                    "/etc/hosts",
                    "bind",
                    "/run/husk/shared/c1/0",
                    "rbind,rprivate,rw"
                ),
                kind(
                    "/dev/shm",
                    "tmpfs",
                    "shm",
                    "nosuid,noexec,nodev,mode=1777,size=65536k"
                ),
                kind("/data", "bind", "/run/husk/shared/c1/1", "rbind,rslave,ro"),
            ]
        );

        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]}
        }));
        let e = guest_spec(&mut s, "c1").unwrap_err().to_string();
        assert!(
            e.contains("host devices cannot be passed") && e.contains("/dev/kvm"),
            "{e}"
        );

        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/data", "type": "bind", "source": "/nonexistent/husk"}]
        }));
        let e = guest_spec(&mut s, "c1").unwrap_err().to_string();
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
    fn image_layers_come_from_the_cache_and_an_upperdir_makes_a_layer_of_its_own() {
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
        fs::create_dir_all(app.join("app")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        let cache = LayerCache::new(d.path().join("cache"));
        let mounts = vec![overlay(&[&app, &base], &upper)];
        let work = d.path().join("work");
        let none = Path::new("/nonexistent");
        let made = make_layers(&cache, &mounts, none, &work, "c1").unwrap();
        assert_eq!((made.converted, made.cached, made.own), (2, 0, 0));
        assert_eq!(made.layers.len(), 2);
        assert!(!made.layers[0].unlink && !made.layers[1].unlink);
        assert!(debugfs(&made.layers[0].image, "ls /").contains("etc"));
        assert!(debugfs(&made.layers[1].image, "ls /").contains("app"));

        // A second container of the image: the layers are there.
        let made = make_layers(&cache, &mounts, none, &work, "c2").unwrap();
        assert_eq!((made.converted, made.cached, made.own), (0, 2, 0));
        // A non-empty upperdir is a layer of its own.
        fs::write(upper.join("written"), "by containerd").unwrap();
        let made = make_layers(&cache, &mounts, none, &work, "c3").unwrap();
        assert_eq!((made.cached, made.own), (2, 1));
        assert!(made.layers[2].unlink);
        assert!(debugfs(&made.layers[2].image, "ls /").contains("written"));
    }
}
