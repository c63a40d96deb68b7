//! The pod's sysctls, applied in the guest. The guest has a kernel of its own, so every
//! sysctl a pod asks for (those Kubernetes calls safe and the unsafe ones it allows) is the
//! pod's alone, namespaced or not.

use std::{
    fs,
    path::{Component, Path, PathBuf},
};

/// Why a sysctl was not set.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {0:?} is not a sysctl name")]
    BadName(String),
    #[error("sysctl {name}: the guest kernel has no such setting")]
    Unknown { name: String },
    #[error("sysctl {name} = {value:?}: {source}")]
    Write {
        name: String,
        value: String,
        source: std::io::Error,
    },
}

/// The file of sysctl `name` (`kernel.shm_rmid_forced` or `kernel/shm_rmid_forced`) under
/// `proc_sys`; None for a name that could leave it.
pub fn path_of(proc_sys: &Path, name: &str) -> Option<PathBuf> {
    let rel = if name.contains('/') {
        name.to_string()
    } else {
        name.replace('.', "/")
    };
    let parts: Vec<&str> = rel.split('/').collect();
    let plain = parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    let rel = Path::new(&rel);
    let normal = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && normal).then(|| proc_sys.join(rel))
}

/// Writes each of `sysctls` under `proc_sys` (/proc/sys), in name order; stops at the first
/// that fails.
pub fn apply<'a>(
    proc_sys: &Path,
    sysctls: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), SysctlError> {
    let mut all: Vec<_> = sysctls.into_iter().collect();
    all.sort();
    for (name, value) in all {
        let path = path_of(proc_sys, name).ok_or_else(|| SysctlError::BadName(name.clone()))?;
        if !path.is_file() {
            return Err(SysctlError::Unknown { name: name.clone() });
        }
        fs::write(&path, value.as_bytes()).map_err(|source| SysctlError::Write {
            name: name.clone(),
            value: value.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_files_under_proc_sys_and_never_outside() {
        let p = Path::new("/proc/sys");
        assert_eq!(
            path_of(p, "kernel.shm_rmid_forced").unwrap(),
            Path::new("/proc/sys/kernel/shm_rmid_forced")
        );
        assert_eq!(
            path_of(p, "net/ipv4/conf/eth0.100/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "kernel",
            "..",
            "kernel/../../etc/passwd",
            "/etc/passwd",
            "a..b",
            "kernel/",
        ] {
            assert_eq!(path_of(p, bad), None, "{bad}");
        }
    }

    #[test]
    fn values_are_written_and_bad_names_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("kernel")).unwrap();
        fs::write(d.path().join("kernel/shmmax"), "0\n").unwrap();
        let set = [("kernel.shmmax".to_string(), "4096".to_string())];
        apply(d.path(), set.iter().map(|(a, b)| (a, b))).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("kernel/shmmax")).unwrap(),
            "4096"
        );
        let unknown = [("kernel.nope".to_string(), "1".to_string())];
        let e = apply(d.path(), unknown.iter().map(|(a, b)| (a, b))).unwrap_err();
        assert!(matches!(e, SysctlError::Unknown { .. }), "{e}");
        assert!(e.to_string().contains("kernel.nope"), "{e}");
        let bad = [("../x".to_string(), "1".to_string())];
        let e = apply(d.path(), bad.iter().map(|(a, b)| (a, b))).unwrap_err();
        assert!(matches!(e, SysctlError::BadName(_)), "{e}");
    }
}
