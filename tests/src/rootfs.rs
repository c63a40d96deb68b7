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

/// An OCI image layout of the busybox rootfs `root` (one uncompressed layer, plus a file
/// /etc/image-marker saying "from the image"), whose entrypoint prints "from the layout
/// entrypoint": the layout directory and the same layout as a tarball, both in `dir`. Uses
/// tar and sha256sum (coreutils).
pub fn oci_layout(dir: &Path, root: &Path) -> (PathBuf, PathBuf) {
    let layout = dir.join("oci-layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(root.join("etc/image-marker"), "from the image\n").unwrap();
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = blobs.join("tmp");
        fs::write(&tmp, bytes).unwrap();
        let hash = sh(&format!("sha256sum {} | cut -d' ' -f1", tmp.display()));
        fs::rename(&tmp, blobs.join(&hash)).unwrap();
        (hash, bytes.len())
    };
    let layer_tar = dir.join("layer.tar");
    sh(&format!(
        "tar -C {} --numeric-owner --owner=0 --group=0 -cf {} .",
        root.display(),
        layer_tar.display()
    ));
    fs::remove_file(root.join("etc/image-marker")).unwrap();
    let (layer, layer_size) = put(&fs::read(&layer_tar).unwrap());
    fs::remove_file(&layer_tar).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["sh", "-c", "echo from the layout entrypoint; cat /etc/image-marker"],
                   "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer}")]},
    });
    let (cfg, cfg_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{cfg}"), "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer}"), "size": layer_size}],
    });
    let (man, man_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{man}"), "size": man_size}],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tarball = dir.join("oci-layout.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        layout.display(),
        tarball.display()
    ));
    (layout, tarball)
}
