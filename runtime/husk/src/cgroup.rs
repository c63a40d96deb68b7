//! The VMM's cgroup (v2): a leaf made for one VM, with memory and pids limits derived from the
//! VM's size, which the VMM is born in (see [`crate::vmm_process`]) and which goes once the
//! VMM has been reaped. For a containerd pod it is the sandbox's cgroup path, so the pod's
//! cgroup (kubelet's, with the RuntimeClass overhead) accounts for its VM, as it accounts for
//! a runc pod's pause process.

use std::{
    fs::{self, File},
    io,
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Where the cgroup v2 hierarchy is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

/// What a VMM needs beyond its guest's memory (its own heap and stacks, the kernel's page
/// tables and KVM structures charged to it, the tap's and sockets' buffers), in MiB. Measured
/// VMM overhead is 3-20 MiB (README, "Numbers"); the rest is margin: hitting the limit kills
/// the pod.
pub const MEMORY_OVERHEAD_MIB: u64 = 96;

/// Tasks a VMM may have: its threads (main, I/O, signals, exit, one per vCPU), with room.
/// Its seccomp filters refuse clone anyway; this is the second line.
pub fn pids_max(vcpus: u8) -> u64 {
    u64::from(vcpus) + 8
}

/// A VMM's cgroup; removed on drop (which must come after the VMM was reaped).
#[derive(Debug)]
pub struct VmCgroup {
    path: PathBuf,
    dir: File,
}

impl VmCgroup {
    /// Makes the cgroup `rel` (a cgroupfs path such as `/k8s.io/ID`, or systemd's
    /// `SLICE:PREFIX:NAME`) under [`ROOT`], enabling the memory and pids controllers on the
    /// way, with `memory.max` = `mem_mib` + [`MEMORY_OVERHEAD_MIB`] and `pids.max` =
    /// [`pids_max`]. An empty leaf of that name left by a killed owner is replaced; one with
    /// processes is refused.
    pub fn create(rel: &str, mem_mib: u32, vcpus: u8) -> Result<VmCgroup> {
        let root = Path::new(ROOT);
        if !root.join("cgroup.controllers").exists() {
            bail!("no cgroup v2 hierarchy at {ROOT}: husk confines each VMM in a cgroup of its own (set [vmm] confine = false to run without, for debugging only)");
        }
        let rel = cgroupfs_path(rel)?;
        let path = root.join(&rel);
        // Every level above the leaf delegates memory and pids to its children.
        let mut at = root.to_path_buf();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            enable_controllers(&at)?;
            at.push(c);
            match fs::create_dir(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating cgroup {}", at.display()))
                }
            }
        }
        enable_controllers(&at)?;
        if let Err(e) = fs::create_dir(&path) {
            // A leaf left by a VMM whose owner was SIGKILLed (a `husk run` of the same pid):
            // empty, it goes; one with processes is refused.
            if e.kind() != io::ErrorKind::AlreadyExists || fs::remove_dir(&path).is_err() {
                return Err(e).with_context(|| format!("creating cgroup {}", path.display()));
            }
            fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        }
        let dir = match File::open(&path) {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_dir(&path);
                return Err(e).with_context(|| format!("opening cgroup {}", path.display()));
            }
        };
        let cg = VmCgroup { dir, path };
        let mem = (u64::from(mem_mib) + MEMORY_OVERHEAD_MIB) << 20;
        cg.write("memory.max", &mem.to_string())?;
        cg.write("memory.swap.max", "0").ok();
        cg.write("pids.max", &pids_max(vcpus).to_string())?;
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        fs::write(&p, value).with_context(|| format!("writing {value} to {}", p.display()))
    }

    /// The cgroup's directory, open (for `CLONE_INTO_CGROUP`).
    pub fn dir(&self) -> &File {
        &self.dir
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        // Empty once the VMM is reaped; the directories above are shared and stay.
        let _ = fs::remove_dir(&self.path);
    }
}

/// Removes the cgroup `rel` left by a VMM whose owner died (its VMM dies with it, and may take
/// a moment to be gone: EBUSY is retried for up to 2 s). Nothing there is fine.
pub fn remove(rel: &str) -> Result<()> {
    let path = Path::new(ROOT).join(cgroupfs_path(rel)?);
    for _ in 0..50 {
        match fs::remove_dir(&path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(40))
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", path.display())),
        }
    }
    bail!("cgroup {} still has processes", path.display())
}

/// `+memory +pids` in `dir`'s `cgroup.subtree_control`, unless already there.
fn enable_controllers(dir: &Path) -> Result<()> {
    let p = dir.join("cgroup.subtree_control");
    let have = fs::read_to_string(&p).unwrap_or_default();
    for c in ["memory", "pids"] {
        if !have.split_whitespace().any(|h| h == c) {
            fs::write(&p, format!("+{c}"))
                .with_context(|| format!("enabling the {c} controller in {}", p.display()))?;
        }
    }
    Ok(())
}

/// A relative cgroupfs path for `rel`: `/a/b` as it is; systemd's `SLICE:PREFIX:NAME` as the
/// slice's directories (`a-b.slice` is `a.slice/a-b.slice`) and `PREFIX-NAME.scope`. Refuses
/// `..` and empty paths.
pub fn cgroupfs_path(rel: &str) -> Result<PathBuf> {
    let path = match rel.split(':').collect::<Vec<_>>().as_slice() {
        [slice, prefix, name] if !rel.starts_with('/') => {
            let mut p = PathBuf::new();
            if !slice.is_empty() {
                let parts: Vec<&str> = slice.trim_end_matches(".slice").split('-').collect();
                for i in 1..=parts.len() {
                    p.push(format!("{}.slice", parts[..i].join("-")));
                }
            }
            p.push(format!("{prefix}-{name}.scope"));
            p
        }
        _ => PathBuf::from(rel.trim_start_matches('/')),
    };
    if path.as_os_str().is_empty()
        || rel.split(['/', ':']).any(|s| s == "." || s == "..")
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("cgroup path {rel:?} is not one husk can use");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_in_both_notations() {
        assert_eq!(
            cgroupfs_path("/k8s.io/abc").unwrap(),
            Path::new("k8s.io/abc")
        );
        assert_eq!(
            cgroupfs_path("kubepods-besteffort-pod12.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
            )
        );
        for bad in ["", "/", "/a/../b", "a/./b"] {
            assert!(cgroupfs_path(bad).is_err(), "{bad:?}");
        }
    }
}
