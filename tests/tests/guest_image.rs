//! The guest image build (guest-image/): the kernel config check names what olddefconfig
//! dropped, and the production initramfs holds the static agent as /init and nothing else.
//!
//! The initramfs test reads the built image ($HUSK_CACHE/current, default /var/cache/husk;
//! `guest-image/build.sh`, which scripts/test.sh runs before the tests) and needs cpio.

use std::{path::Path, process::Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Runs husk_kernel_check_config on a config and a fragment; (status, log).
fn check_config(config: &str, fragment: &str) -> (i32, String) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config"), config).unwrap();
    std::fs::write(d.path().join("fragment"), fragment).unwrap();
    let lib = repo().join("guest-image/lib");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". {0}/common.sh && . {0}/kernel.sh && husk_kernel_check_config {1}/config {1}/fragment",
            lib.display(),
            d.path().display()
        ))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_config_check_names_each_dropped_option() {
    let fragment = "CONFIG_VIRTIO_MMIO=y\nCONFIG_EROFS_FS=y\n# CONFIG_MODULES is not set\n";
    let good = "CONFIG_VIRTIO_MMIO=y\nCONFIG_EROFS_FS=y\n# CONFIG_MODULES is not set\n";
    assert_eq!(check_config(good, fragment), (0, String::new()));

    let dropped = "CONFIG_VIRTIO_MMIO=y\n# CONFIG_EROFS_FS is not set\nCONFIG_MODULES=y\n";
    let (rc, log) = check_config(dropped, fragment);
    assert_eq!(rc, 1, "{log}");
    assert!(
        log.contains(
            "CONFIG_EROFS_FS=y did not survive olddefconfig (got: # CONFIG_EROFS_FS is not set)"
        ),
        "{log}"
    );
    assert!(
        log.contains("CONFIG_MODULES should be unset but is CONFIG_MODULES=y"),
        "{log}"
    );
    assert!(!log.contains("VIRTIO_MMIO"), "{log}");
}

#[test]
fn the_initramfs_is_the_static_agent_and_nothing_else() {
    let cache = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    let img = Path::new(&cache).join("current/initramfs.cpio.gz");
    assert!(
        img.exists(),
        "{} missing: build the guest image with guest-image/build.sh",
        img.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} | cpio -t --quiet", img.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "listing {}: {out:?} (needs cpio)",
        img.display()
    );
    let mut entries: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "dev",
            "dev/console",
            "init",
            "proc",
            "run",
            "sys",
            "sys/fs",
            "sys/fs/cgroup",
            "tmp"
        ],
        "no shell or tools in the production image"
    );
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && gzip -dc {} | cpio -id --quiet init",
            d.path().display(),
            img.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let file = Command::new("file")
        .arg(d.path().join("init"))
        .output()
        .unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "/init is not a static binary: {file}"
    );
}
