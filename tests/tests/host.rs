//! `husk run` on the host itself, outside the testbed: where /dev/kvm cannot boot a Linux
//! guest (these machines' PVM has no vmx/svm flag), husk says so in one line and leaves
//! nothing behind; where it can, husk does not claim otherwise.

use std::{path::Path, process::Command};

use husk_tests::{agent::workspace_bin, rootfs::busybox_rootfs};

fn hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    Path::new("/dev/kvm").exists()
        && cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn husk_run_names_a_kvm_that_cannot_boot_linux_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let runtime_dir = dir.path().join("run");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    let out = Command::new(workspace_bin("husk"))
        .args(["run", "--boot-timeout", "5"])
        .arg(&rootfs)
        .args(["--", "true"])
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let says_no_kvm =
        stderr.contains("no hardware virtualization") || stderr.contains("/dev/kvm does not exist");
    if hardware_virtualization() {
        assert!(!says_no_kvm, "husk denies a usable KVM: {stderr}");
        return;
    }
    assert!(!out.status.success(), "husk run succeeded without KVM");
    assert!(says_no_kvm, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains("testbed"), "no way out named: {stderr}");
    let left: Vec<_> = std::fs::read_dir(&runtime_dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
