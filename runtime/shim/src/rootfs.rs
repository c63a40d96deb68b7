//! A container's root filesystem on the host side: its OCI spec made fit for the guest, and
//! its rootfs packed into the block image the pod engine hands to the VM.
//!
//! containerd hands the shim the container's snapshot as mounts (usually one overlay). The
//! shim mounts them, packs the tree into an ext4 image (`mkfs.ext4 -d`), unmounts, and gives
//! the image to the VM through an empty drive slot; the agent mounts it as the rootfs. Files
//! CRI bind-mounts from the host (/etc/hosts, /etc/resolv.conf, /etc/hostname, the termination
//! log, and volumes) cannot be shared into the VM yet: they are copied into the image at their
//! destination (a snapshot taken at create time), and /dev/shm becomes a tmpfs.

use std::{
    fmt::Write as _,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use containerd_shim::protos::types::mount::Mount;
use nix::mount::{umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Mount as OciMount, MountBuilder, Spec};

/// Room left in a container's image for what the container writes, in MiB (the image file is
/// sparse: it costs only what is used).
pub const SCRATCH_MIB: u64 = 256;

/// A host file or directory to copy into the image at `dest` (an absolute container path).
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub src: PathBuf,
    pub dest: String,
}

/// Rewrites containerd's spec for a container that runs in the guest:
/// - namespaces with a path (the pod's, from the pause process on the host) are the VM's own
///   for network, ipc and uts, so they are dropped (the container shares the guest's, which
///   is the pod's); a pid namespace with a path becomes a new one (the guest's holds the
///   agent); the network namespace is always the VM's;
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

/// A container's rootfs as containerd hands it out (`mounts`, or already in place when
/// empty) at `target`, packed with `copies` into the ext4 image `img`: mounted, packed and
/// unmounted again. The image's size in bytes.
pub async fn pack(
    mounts: Vec<Mount>,
    target: PathBuf,
    copies: Vec<Copy>,
    img: PathBuf,
) -> Result<u64> {
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        let mounted = !mounts.is_empty();
        if mounted {
            mount_rootfs(&mounts, &target)?;
        }
        let r = make_image(&target, &copies, &img);
        if mounted {
            unmount(&target);
        }
        r
    })
    .await
    .context("packing the rootfs")?
}

/// Packs `rootfs` and `copies` into the ext4 image `img`; returns its size in bytes.
pub fn make_image(rootfs: &Path, copies: &[Copy], img: &Path) -> Result<u64> {
    let size = husk::image::make_ext4(rootfs, img, SCRATCH_MIB)
        .with_context(|| format!("packing the rootfs {} into an image", rootfs.display()))?;
    if copies.is_empty() {
        return Ok(size);
    }
    let script = debugfs_script(copies)?;
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg("-")
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .context("running debugfs (e2fsprogs) to copy the pod's files into the image")?;
    if !out.status.success() {
        bail!(
            "debugfs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // debugfs reports failed commands on stderr but still exits 0.
    let errors: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .filter(|l| !l.contains("already exists") && !l.contains("File not found by ext2_lookup"))
        .collect();
    if !errors.is_empty() {
        bail!(
            "copying the pod's files into the image: {}",
            errors.join("; ")
        );
    }
    Ok(size)
}

/// debugfs commands that put each copy at its destination, replacing what the image has there,
/// with the source's mode and owner.
fn debugfs_script(copies: &[Copy]) -> Result<String> {
    fn quote(p: &str) -> Result<String> {
        if p.contains('"') || p.contains('\n') {
            bail!("cannot copy {p:?} into the image (quote or newline in the path)");
        }
        Ok(format!("\"{p}\""))
    }
    fn add(s: &mut String, src: &Path, dest: &str) -> Result<()> {
        let md = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
        let q = quote(dest)?;
        if md.is_dir() {
            let _ = writeln!(s, "mkdir {q}");
            let mut entries: Vec<_> = std::fs::read_dir(src)
                .with_context(|| format!("reading {}", src.display()))?
                .collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                let child = format!("{}/{}", dest.trim_end_matches('/'), name.to_string_lossy());
                add(s, &e.path(), &child)?;
            }
        } else if md.is_file() {
            let _ = writeln!(s, "rm {q}");
            let _ = writeln!(s, "write {} {q}", quote(&src.to_string_lossy())?);
        } else {
            return Ok(()); // sockets, devices: nothing to copy
        }
        let kind = if md.is_dir() { 0o040000 } else { 0o100000 };
        let mode = kind | (md.permissions().mode() & 0o7777);
        let _ = writeln!(s, "sif {q} mode 0{mode:o}");
        let _ = writeln!(s, "sif {q} uid {}", md.uid());
        let _ = writeln!(s, "sif {q} gid {}", md.gid());
        Ok(())
    }
    let mut s = String::new();
    for c in copies {
        // Parents first (errors for existing ones are expected and filtered).
        let mut parent = String::new();
        let parts: Vec<&str> = c.dest.split('/').filter(|p| !p.is_empty()).collect();
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            parent.push('/');
            parent.push_str(p);
            let _ = writeln!(s, "mkdir {}", quote(&parent)?);
        }
        add(&mut s, &c.src, &c.dest)?;
    }
    Ok(s)
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

        // A shared pid namespace (shareProcessNamespace) is a new one, never the agent's.
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}
        }));
        guest_spec(&mut s).unwrap();
        let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(
            (ns[0].typ(), ns[0].path()),
            (LinuxNamespaceType::Pid, &None)
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

    #[test]
    fn copies_land_in_the_image_with_mode_and_content() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "image\n").unwrap();
        let host = d.path().join("hostname");
        std::fs::write(&host, "pod-a\n").unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o640)).unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/f"), "in a volume\n").unwrap();
        let img = d.path().join("img.ext4");
        let copies = [
            Copy {
                src: host,
                dest: "/etc/hostname".into(),
            },
            Copy {
                src: vol,
                dest: "/mnt/deep/vol".into(),
            },
        ];
        make_image(&root, &copies, &img).unwrap();
        let cat = |p: &str| {
            let o = Command::new("debugfs")
                .args(["-R", &format!("cat {p}")])
                .arg(&img)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).to_string()
        };
        assert_eq!(cat("/etc/hostname"), "pod-a\n");
        assert_eq!(cat("/mnt/deep/vol/sub/f"), "in a volume\n");
        let o = Command::new("debugfs")
            .args(["-R", "stat /etc/hostname"])
            .arg(&img)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&o.stdout);
        assert!(stat.contains("Mode:  0640"), "{stat}");
    }
}
