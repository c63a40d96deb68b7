//! `husk install` and `husk uninstall` on the host, into temporary directories: install puts
//! husk, the shim, husk-vmm, the guest image and the RuntimeClass manifest in place and points
//! husk's config at that image; the installed husk works from there (its doctor finds what it
//! installed); uninstall removes exactly that, leaving both config files as they were.

use std::{fs, path::Path, process::Command};

use husk_tests::agent::workspace_bin;

fn husk(bin: &Path, args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .env("HUSK_CONFIG", config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(d)
        .into_iter()
        .map(|p| p.strip_prefix(d).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn install_stands_alone_and_uninstall_removes_exactly_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bin, share, etc) = (d.join("bin"), d.join("share"), d.join("etc"));
    fs::create_dir_all(&etc).unwrap();
    // A guest image to install (what doctor and install read of it: an ELF header, an
    // initramfs file).
    let src = d.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("vmlinux"), b"\x7fELF\x02\x01\x01\0kernel").unwrap();
    fs::write(src.join("initramfs.cpio.gz"), b"initramfs").unwrap();
    let husk_config = etc.join("husk.toml");
    let husk_before = format!(
        "# the operator's\n[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\nkernel_args = \"quiet\"\n",
        src.join("vmlinux").display(),
        src.join("initramfs.cpio.gz").display()
    );
    fs::write(&husk_config, &husk_before).unwrap();
    let containerd = etc.join("containerd.toml");
    let containerd_before = "version = 2\n# the operator's\n";
    fs::write(&containerd, containerd_before).unwrap();
    let before = listing(d);

    let args = [
        "install",
        "--config",
        containerd.to_str().unwrap(),
        "--bin-dir",
        bin.to_str().unwrap(),
        "--share-dir",
        share.to_str().unwrap(),
    ];
    let (ok, out) = husk(&workspace_bin("husk"), &args, &husk_config);
    assert!(ok, "{out}");
    for f in ["husk", "containerd-shim-husk-v2", "husk-vmm"] {
        assert!(bin.join(f).is_file(), "no {f}: {out}");
    }
    for f in [
        "vmlinux",
        "initramfs.cpio.gz",
        "runtimeclass.yaml",
        "install.json",
    ] {
        assert!(share.join(f).is_file(), "no {f}: {out}");
    }
    assert_eq!(
        fs::read(share.join("vmlinux")).unwrap(),
        fs::read(src.join("vmlinux")).unwrap()
    );
    let rc = fs::read_to_string(share.join("runtimeclass.yaml")).unwrap();
    assert!(
        rc.contains("handler: husk") && rc.contains("podFixed:"),
        "{rc}"
    );
    let cfg = fs::read_to_string(&husk_config).unwrap();
    assert!(cfg.starts_with("# the operator's"), "{cfg}");
    assert!(
        cfg.contains(&format!("kernel = \"{}\"", share.join("vmlinux").display())),
        "{cfg}"
    );
    assert!(cfg.contains("kernel_args = \"quiet\""), "{cfg}");
    let text = fs::read_to_string(&containerd).unwrap();
    assert!(text.contains("io.containerd.husk.v2"), "{text}");

    // The installed husk, with the source image gone, finds the installed one.
    fs::remove_dir_all(&src).unwrap();
    let (_, out) = husk(
        &bin.join("husk"),
        &[
            "doctor",
            "--containerd-config",
            containerd.to_str().unwrap(),
            "--path",
            bin.to_str().unwrap(),
        ],
        &husk_config,
    );
    let kernel = format!(
        "ok    guest kernel: {} (ELF)",
        share.join("vmlinux").display()
    );
    assert!(out.contains(&kernel), "{out}");
    assert!(out.contains("ok    runtime class:"), "{out}");
    let shim = format!(
        "ok    shim: {}",
        bin.join("containerd-shim-husk-v2").display()
    );
    assert!(out.contains(&shim), "{out}");

    // Installing again changes nothing but is fine.
    let (ok, out) = husk(&bin.join("husk"), &args, &husk_config);
    assert!(ok, "{out}");

    let (ok, out) = husk(
        &bin.join("husk"),
        &[
            "uninstall",
            "--config",
            containerd.to_str().unwrap(),
            "--share-dir",
            share.to_str().unwrap(),
            "--keep-cache",
        ],
        &husk_config,
    );
    assert!(ok, "{out}");
    assert_eq!(fs::read_to_string(&husk_config).unwrap(), husk_before);
    assert_eq!(fs::read_to_string(&containerd).unwrap(), containerd_before);
    let after: Vec<String> = listing(d);
    let expected: Vec<String> = before
        .into_iter()
        .filter(|p| !p.starts_with("src"))
        .chain(["bin".to_string()])
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(after, expected, "{out}");
}
