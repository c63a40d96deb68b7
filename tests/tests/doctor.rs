//! `husk doctor` on the host, outside the testbed: what it says of this machine's KVM, and
//! each check it makes of what an install puts in place failing when that is wrong (a guest
//! image missing or of another agent, husk not registered with containerd, a shim or VMM of
//! another version) and passing once `husk install` put it right. Inside the testbed, where
//! pods run, tests/cri.rs has it pass whole.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use husk_tests::agent::workspace_bin;

struct Doctor {
    code: i32,
    out: String,
}

impl Doctor {
    /// The line of check `name` ("ok    NAME: ...", "FAIL  NAME: ..."), with its fix line.
    fn line(&self, name: &str) -> String {
        let mut lines = self.out.lines();
        while let Some(l) = lines.next() {
            if l.get(6..)
                .is_some_and(|r| r.starts_with(&format!("{name}: ")))
            {
                let fix = lines
                    .next()
                    .filter(|f| f.trim_start().starts_with("fix:"))
                    .unwrap_or("");
                return format!("{l}\n{fix}");
            }
        }
        panic!("no check {name}: {}", self.out)
    }

    fn status(&self, name: &str) -> String {
        self.line(name)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
}

/// `husk doctor` with husk's config `config` (kernel and initramfs), containerd's config
/// `containerd_config` and the shim looked up in `path`.
fn doctor(config: &Path, containerd_config: &Path, path: &Path) -> Doctor {
    let out = Command::new(workspace_bin("husk"))
        .arg("doctor")
        .arg("--containerd-config")
        .arg(containerd_config)
        .arg("--path")
        .arg(path)
        .env("HUSK_CONFIG", config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "doctor wrote to stderr: {stderr}");
    let d = Doctor {
        code: out.status.code().unwrap(),
        out: text,
    };
    let fails = d.out.lines().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(
        d.code == 0,
        fails == 0,
        "exit {} with {fails} failed checks: {}",
        d.code,
        d.out
    );
    d
}

/// A newc cpio archive holding `init`, gzipped, as guest-image/build.sh makes one.
fn write_initramfs(path: &Path, init: &[u8]) {
    let mut cpio = Vec::new();
    for (name, body, mode) in [("init", init, 0o100755), ("TRAILER!!!", &b""[..], 0)] {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        cpio.resize(cpio.len().next_multiple_of(4), 0);
        cpio.extend_from_slice(body);
        cpio.resize(cpio.len().next_multiple_of(4), 0);
    }
    let mut gz =
        flate2::write::GzEncoder::new(fs::File::create(path).unwrap(), flate2::Compression::fast());
    gz.write_all(&cpio).unwrap();
    gz.finish().unwrap();
}

fn script(path: &Path, text: &str) {
    fs::write(path, format!("#!/bin/sh\n{text}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    containerd: PathBuf,
    bin: PathBuf,
    initramfs: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = d.join("vmlinux");
    // An ELF header is all the kernel check reads.
    fs::write(&kernel, b"\x7fELF\x02\x01\x01\0").unwrap();
    let initramfs = d.join("initramfs.cpio.gz");
    // What doctor reads of an agent: its version mark (the real agent binary is in
    // the_real_agent_passes).
    let agent = [b"\x7fELF....", husk_proto::AGENT_MARK.as_bytes(), b"...."].concat();
    write_initramfs(&initramfs, &agent);
    let config = d.join("husk.toml");
    fs::write(
        &config,
        format!(
            "[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
            kernel.display(),
            initramfs.display()
        ),
    )
    .unwrap();
    let containerd = d.join("containerd.toml");
    fs::write(
        &containerd,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n",
    )
    .unwrap();
    let bin = d.join("bin");
    fs::create_dir(&bin).unwrap();
    Setup {
        config,
        containerd,
        bin,
        initramfs,
        _dir: dir,
    }
}

/// On this machine: a FAIL for KVM that names PVM where KVM is PVM (these machines), one for
/// no vmx/svm where the CPU has none, and "ok" where KVM can boot Linux.
#[test]
fn doctor_says_what_this_hosts_kvm_can_do() {
    let s = setup();
    let d = doctor(&s.config, &s.containerd, &s.bin);
    let kvm = d.line("kvm");
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(kvm.starts_with("FAIL  kvm: /dev/kvm is PVM"), "{kvm}");
        assert!(
            kvm.contains("fix: run husk on a host with Intel VT-x or AMD-V"),
            "{kvm}"
        );
        assert_ne!(d.code, 0);
    } else if !Path::new("/dev/kvm").exists() {
        assert!(kvm.contains("/dev/kvm does not exist"), "{kvm}");
    } else if !hw {
        assert!(kvm.contains("no vmx/svm"), "{kvm}");
    } else {
        assert!(
            kvm.starts_with("ok    kvm: /dev/kvm usable, API 12"),
            "{kvm}"
        );
    }
    assert!(
        d.out.lines().last().unwrap().starts_with("husk doctor: "),
        "no summary: {}",
        d.out
    );
}

/// The agent binary the workspace builds carries the mark doctor looks for.
#[test]
fn the_real_agent_passes() {
    let s = setup();
    write_initramfs(
        &s.initramfs,
        &fs::read(workspace_bin("husk-agent")).unwrap(),
    );
    let image = doctor(&s.config, &s.containerd, &s.bin).line("guest image");
    assert!(image.starts_with("ok    guest image:"), "{image}");
    assert!(image.contains("its /init is husk-agent"), "{image}");
}

#[test]
fn doctor_finds_the_guest_image_missing_or_of_another_agent() {
    let s = setup();
    let d = doctor(&s.config, &s.containerd, &s.bin);
    assert_eq!(d.status("guest kernel"), "ok", "{}", d.out);
    let image = d.line("guest image");
    assert!(image.starts_with("ok"), "{image}");
    assert!(image.contains("its /init is husk-agent"), "{image}");

    // An initramfs whose /init is no husk agent (a shell script).
    write_initramfs(&s.initramfs, b"#!/bin/sh\nexec /bin/sh\n");
    let d = doctor(&s.config, &s.containerd, &s.bin);
    let image = d.line("guest image");
    assert!(image.starts_with("FAIL  guest image:"), "{image}");
    assert!(image.contains("carries no husk-agent version"), "{image}");
    assert!(image.contains("fix: build the guest image"), "{image}");
    assert_ne!(d.code, 0);

    // An agent of another version.
    write_initramfs(
        &s.initramfs,
        b"\x7fELF...husk-agent-version=0.0.1;api=1\0...",
    );
    let image = doctor(&s.config, &s.containerd, &s.bin).line("guest image");
    assert!(
        image.contains(
            "its /init says husk-agent-version=0.0.1;api=1, husk wants husk-agent-version="
        ),
        "{image}"
    );

    // Missing, both.
    fs::remove_file(&s.initramfs).unwrap();
    fs::write(
        &s.config,
        "[guest]\nkernel = \"/nonexistent/vmlinux\"\ninitramfs = \"/nonexistent/initramfs.cpio.gz\"\n",
    )
    .unwrap();
    let d = doctor(&s.config, &s.containerd, &s.bin);
    let kernel = d.line("guest kernel");
    assert!(
        kernel.starts_with("FAIL  guest kernel: /nonexistent/vmlinux: No such file"),
        "{kernel}"
    );
    assert!(d
        .line("guest image")
        .starts_with("FAIL  guest image: /nonexistent/initramfs.cpio.gz"));
}

#[test]
fn doctor_finds_husk_unregistered_then_registered_by_install() {
    let s = setup();
    let d = doctor(&s.config, &s.containerd, &s.bin);
    let rc = d.line("runtime class");
    assert!(rc.starts_with("FAIL  runtime class:"), "{rc}");
    assert!(rc.contains("registers no runtime of husk's"), "{rc}");
    assert!(rc.contains("fix: husk install --config"), "{rc}");
    let shim = d.line("shim");
    assert!(
        shim.starts_with("FAIL  shim: containerd-shim-husk-v2 is not on containerd's PATH"),
        "{shim}"
    );

    let installed = Command::new(workspace_bin("husk"))
        .arg("install")
        .arg("--config")
        .arg(&s.containerd)
        .arg("--bin-dir")
        .arg(&s.bin)
        .arg("--share-dir")
        .arg(s.bin.with_file_name("share"))
        .env("HUSK_CONFIG", &s.config)
        .output()
        .unwrap();
    assert!(installed.status.success(), "{installed:?}");
    let d = doctor(&s.config, &s.containerd, &s.bin);
    let rc = d.line("runtime class");
    assert!(rc.starts_with("ok    runtime class:"), "{rc}");
    assert!(rc.contains("registers husk and untrusted"), "{rc}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(d.line("shim").starts_with("ok    shim:"), "{}", d.out);
    assert!(d
        .line("shim")
        .contains(&format!("containerd-shim-husk-v2 {version}")));
    assert!(d.line("vmm").starts_with("ok    vmm:"), "{}", d.out);
}

#[test]
fn doctor_finds_a_shim_or_vmm_of_another_version() {
    let s = setup();
    let shim = s.bin.join("containerd-shim-husk-v2");
    let vmm = s.bin.join("husk-vmm");
    fs::copy(workspace_bin("husk-vmm"), &vmm).unwrap();
    // What an older husk's shim answers to -v.
    script(
        &shim,
        "echo 'containerd-shim-husk-v2:'; echo '  Version: 0.0.9'",
    );
    let line = doctor(&s.config, &s.containerd, &s.bin).line("shim");
    assert!(line.contains("is version 0.0.9, husk is "), "{line}");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("fix: husk install"), "{line}");

    // One that answers with no version at all (the crate's parser alone: an error).
    script(
        &shim,
        "echo 'io.containerd.husk.v2: Env(NotPresent)' >&2; exit 1",
    );
    let line = doctor(&s.config, &s.containerd, &s.bin).line("shim");
    assert!(line.contains("answers -v with no version"), "{line}");

    // The real shim, but the VMM beside it of another version.
    fs::copy(workspace_bin("containerd-shim-husk-v2"), &shim).unwrap();
    script(&vmm, "echo 'husk-vmm 0.0.9'");
    let d = doctor(&s.config, &s.containerd, &s.bin);
    assert!(d.line("shim").starts_with("ok"), "{}", d.out);
    let line = d.line("vmm");
    assert!(line.starts_with("FAIL  vmm:"), "{line}");
    assert!(line.contains("is version 0.0.9, husk is"), "{line}");
    fs::remove_file(&vmm).unwrap();
    let line = doctor(&s.config, &s.containerd, &s.bin).line("vmm");
    assert!(
        line.contains("is missing: the shim starts the husk-vmm next to itself"),
        "{line}"
    );
}
