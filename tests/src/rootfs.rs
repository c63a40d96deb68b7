//! Root filesystems and OCI specs for tests, made from Debian's busybox-static.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use oci_spec::runtime::{LinuxNamespaceType, Process, ProcessBuilder, Spec, UserBuilder};

/// The busybox applets linked into a test rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "hostname", "ps", "ls", "sleep", "id", "mount", "grep", "true", "false",
    "touch", "stty", "uname", "head", "wc", "dd", "env", "kill", "tty", "pwd", "seq", "yes",
    "readlink", "test", "mkdir", "rm",
];

/// Where busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Makes a busybox rootfs in `dir` (which must exist): /bin/busybox, applet links, and the
/// usual empty directories. Panics, naming the package, without busybox-static.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (.ci/run does)"
    );
    let root = dir.join("rootfs");
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "etc", "root", "run", "var",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    root
}

/// An OCI process running `args` as root with a PATH.
pub fn process(args: &[&str]) -> Process {
    ProcessBuilder::default()
        .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec![
            "PATH=/bin".to_string(),
            "HOME=/root".to_string(),
            "TERM=xterm".to_string(),
        ])
        .cwd("/")
        .user(UserBuilder::default().uid(0u32).gid(0u32).build().unwrap())
        .build()
        .unwrap()
}

/// The default OCI spec (runc's defaults: pid, ipc, uts, mount namespaces, the usual
/// mounts and capabilities) running `args`, without a network namespace (containers share the
/// VM's).
pub fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut p = spec.process().clone().unwrap_or_default();
    let base = process(args);
    p.set_args(base.args().clone());
    p.set_env(base.env().clone());
    p.set_terminal(Some(false));
    spec.set_process(Some(p));
    spec.set_hostname(Some("husk-test".into()));
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces().clone() {
            let ns = ns
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect();
            linux.set_namespaces(Some(ns));
        }
    }
    spec
}
