//! What a pod's shim tells the rest of the node about its pod: `pod.json` in the pod's run
//! directory (`/run/husk/shim/NS/ID/`), written when the VM is up and again when a container
//! comes or goes, read by `husk monitor`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The file in a pod's run directory.
pub const FILE: &str = "pod.json";
/// Where the shims keep their pods' run directories.
pub const SHIM_RUN_DIR: &str = "/run/husk/shim";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The CRI sandbox id (the shim's task id).
    pub sandbox_id: String,
    /// containerd's namespace (`k8s.io` for CRI).
    pub containerd_namespace: String,
    /// The Kubernetes pod name and namespace (CRI's sandbox annotations), when known.
    pub name: String,
    pub namespace: String,
    pub shim_pid: u32,
    pub vmm_pid: u32,
    /// The VMM's control socket and hybrid-vsock socket (the agent).
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// From the shim's Create to the agent answering, in milliseconds.
    pub boot_ms: u64,
    /// The ids of the pod's containers (not the sandbox's own).
    pub containers: Vec<String>,
}

impl PodInfo {
    /// Writes `dir/pod.json` (aside, then renamed over it: a reader never sees half).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(".pod.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, dir.join(FILE))
    }

    /// Every pod under `root` (`root/NS/ID/pod.json`); a file that cannot be read (a pod
    /// going away) is skipped.
    pub fn all(root: &Path) -> Vec<PodInfo> {
        let mut out = Vec::new();
        for ns in fs::read_dir(root).into_iter().flatten().flatten() {
            for pod in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if let Some(info) = fs::read(pod.path().join(FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a: &PodInfo, b| a.sandbox_id.cmp(&b.sandbox_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pods_are_found() {
        let root = tempfile::tempdir().unwrap();
        let mut found = Vec::new();
        for id in ["b", "a"] {
            let dir = root.path().join("k8s.io").join(id);
            fs::create_dir_all(&dir).unwrap();
            let info = PodInfo {
                sandbox_id: id.into(),
                containers: vec![id.into(), "c1".into()],
                ..Default::default()
            };
            info.write(&dir).unwrap();
            found.push(info);
        }
        // A pod whose file is not there yet, or broken, is not one.
        fs::create_dir_all(root.path().join("k8s.io/booting")).unwrap();
        fs::write(root.path().join("k8s.io/booting/pod.json"), b"{").unwrap();
        found.reverse();
        assert_eq!(PodInfo::all(root.path()), found);
    }
}
