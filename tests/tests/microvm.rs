//! husk end to end in microVMs: `husk run` boots the guest image with husk-vmm inside the
//! nested-KVM testbed and runs busybox containers through the agent.
//!
//! Needs root, the testbed's prerequisites (qemu, linux-source) and a built guest image
//! (`guest-image/build.sh`, which `scripts/test.sh` runs first). Slow: one L1 boot, then a
//! microVM per check, all under TCG.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use husk_tests::{
    agent::workspace_bin,
    rootfs::{busybox_rootfs, oci_layout},
    sections::sections,
    testbed,
};

/// A directory the testbed sees (its /tmp is its own; the repository is shared).
fn shared_dir(name: &str) -> PathBuf {
    let target = workspace_bin("husk")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let d = target.join("husk-test-tmp").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An initramfs whose init never answers: it only sleeps.
fn never_ready_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("never-ready");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox sleep 100000\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .unwrap();
    let out = dir.join("never-ready.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "making the never-ready initramfs (needs cpio)"
    );
    out
}

#[test]
fn husk_run_in_microvms() {
    husk_tests::agent::require_root();
    let image = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    for f in ["current/vmlinux", "current/initramfs.cpio.gz"] {
        let p = Path::new(&image).join(f);
        assert!(
            p.exists(),
            "{} missing: build the guest image with guest-image/build.sh",
            p.display()
        );
    }
    let dir = shared_dir("microvm");
    let rootfs = busybox_rootfs(&dir);
    let never_ready = never_ready_initramfs(&dir);
    let (layout, tarball) = oci_layout(&dir, &rootfs);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = repo.join("tests/scripts/microvm-checks.sh");
    let cmd = format!(
        "bash {} {} {} {} {} {}",
        script.display(),
        repo.display(),
        rootfs.display(),
        never_ready.display(),
        layout.display(),
        tarball.display()
    );
    let t0 = std::time::Instant::now();
    let out = testbed::run(&cmd, Duration::from_secs(600)).expect("the testbed ran");
    println!(
        "testbed run took {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        out.stdout
    );
    let s = sections(&out.stdout);
    let get = |n: &str| {
        s.get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no section {n}: {}", out.stdout))
    };

    // Output and exit code come through.
    let (text, rc) = get("hello");
    assert!(text.contains("hello from husk"), "{text}");
    assert_eq!(rc, Some(7), "{text}");
    // --timings: the boot breakdown, the VMM's overhead and the first output line.
    for line in [
        "husk-vmm: first vCPU entry after ",
        "husk-vmm: guest ready after ",
        "husk-vmm: vmm memory overhead ",
        "husk: first output ",
    ] {
        assert!(text.contains(line), "no {line:?} in: {text}");
    }
    // The same from a VM template: made by the first run, restored by all three (the first
    // by the process that made it, at once: its clone's agent once went unanswered, its
    // host connection reset by the guest's late handling of the transport reset); each clone
    // has RNG output of its own (its boot id too: the kernel makes it at its first read,
    // which comes after the clone's reseed). No clone falls back to a cold boot.
    let (text, rc) = get("hello_template");
    assert_eq!(rc, Some(0), "{text}");
    for line in [
        "run 1: rc 7",
        "run 2: rc 7",
        "run 3: rc 7",
        "husk-vmm: restored from the snapshot ",
        "husk: first output ",
        " 1 vCPU ",
    ] {
        assert!(text.contains(line), "no {line:?} in: {text}");
    }
    assert_eq!(
        text.matches("husk-vmm: restored from the snapshot ")
            .count(),
        3,
        "{text}"
    );
    assert!(!text.contains("did not answer within"), "{text}");
    let clones: Vec<Vec<&str>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("hello from a clone: "))
        .map(|l| l.split(' ').collect())
        .collect();
    assert_eq!(clones.len(), 3, "{text}");
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert_ne!(clones[a][1], clones[b][1], "the same RNG output: {text}");
    }
    // A template whose saved state is damaged where the checks before use do not look: the
    // VMM refuses it, the pod boots cold and the template goes; the next run makes it again.
    let (text, rc) = get("template_refused");
    assert_eq!(rc, Some(0), "{text}");
    for line in [
        "husk-vmm: restoring the VM from its template: the template ",
        "the VMM refused the VM template; removing it and booting cold",
        "run damaged: rc 7",
        "templates after: 0",
        "run again: rc 7",
        "husk-vmm: restored from the snapshot ",
    ] {
        assert!(text.contains(line), "no {line:?} in: {text}");
    }
    assert_eq!(
        text.matches("husk-vmm: restored from the snapshot ")
            .count(),
        1,
        "{text}"
    );
    let (text, rc) = get("streams");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("stdout: to-stdout\nstderr: to-stderr\n"),
        "{text}"
    );

    // An OCI image layout: its entrypoint and its files, as a directory and as a tarball.
    let (text, rc) = get("oci_layout");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("from the layout entrypoint\nfrom the image\n"),
        "{text}"
    );
    let (text, rc) = get("oci_tarball");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("from the tarball\nfrom the image\n"),
        "{text}"
    );

    // The guest kernel, not the host's or L1's; cgroup v2.
    let (text, rc) = get("kernel");
    assert_eq!(rc, Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_ne!(
        lines[0],
        host.trim(),
        "the container runs the host's kernel"
    );
    let (l1_boot_id, _) = get("l1 boot_id");
    assert_ne!(
        lines[1],
        l1_boot_id.trim(),
        "the container shares L1's boot id: no microVM"
    );
    // ... and exactly the kernel husk booted (L1 may run the same release: the boot id
    // above tells them apart).
    let vmlinux = std::fs::read(Path::new(&image).join("current/vmlinux")).unwrap();
    let banner = b"Linux version ";
    let at = vmlinux
        .windows(banner.len())
        .position(|w| w == banner)
        .expect("no version banner in vmlinux");
    let release: String = vmlinux[at + banner.len()..]
        .iter()
        .take_while(|b| **b != b' ')
        .map(|b| *b as char)
        .collect();
    assert_eq!(lines[0], release, "{text}");
    // cgroup v2 only: one hierarchy, with the controllers limits need.
    let cgroups: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(':') && l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(cgroups.len(), 1, "not cgroup v2 only: {text}");
    assert!(cgroups[0].starts_with("0::"), "not cgroup v2: {text}");
    let controllers = text
        .lines()
        .find_map(|l| l.strip_prefix("controllers: "))
        .unwrap_or_default();
    // The kernel has every controller the agent translates limits to; the ones statistics
    // need are enabled for every container (the others when a limit asks for them).
    let kernel_controllers = text
        .lines()
        .find_map(|l| l.strip_prefix("kernel controllers: "))
        .unwrap_or_default();
    // (/proc/cgroups still calls io "blkio".)
    for c in ["cpuset", "cpu", "blkio", "memory", "pids"] {
        assert!(
            kernel_controllers.split_whitespace().any(|x| x == c),
            "the guest kernel has no {c} controller: {text}"
        );
    }
    for c in ["cpu", "io", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "no {c} controller for the container: {text}"
        );
    }
    let filesystems = text
        .lines()
        .find_map(|l| l.strip_prefix("filesystems: "))
        .unwrap_or_default();
    for f in ["ext4", "overlay", "erofs", "tmpfs", "cgroup2"] {
        assert!(
            filesystems.split_whitespace().any(|x| x == f),
            "the guest kernel lacks {f}: {text}"
        );
    }
    // husk-vmm announces the LAPIC's TSC-deadline mode, so the guest does not calibrate its
    // LAPIC timer (a loop seen to hang under nested KVM).
    assert!(
        lines.contains(&"tsc_deadline_timer"),
        "the guest has no TSC-deadline timer: {text}"
    );

    // Guest memory in use after boot, for the record.
    let (text, _) = get("meminfo");
    let kib: HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.trim_end_matches(':'), w.next()?.parse().ok()?))
        })
        .collect();
    let (Some(t), Some(a)) = (kib.get("MemTotal"), kib.get("MemAvailable")) else {
        panic!("no MemTotal/MemAvailable: {text}");
    };
    println!(
        "guest memory in use after boot: {:.1} MiB of {:.1} MiB",
        (t - a) as f64 / 1024.0,
        *t as f64 / 1024.0
    );
    // The VM has the 256 MiB asked for (less what the kernel reserves for itself).
    assert!(
        (200 * 1024..=256 * 1024).contains(t),
        "MemTotal {t} kB for a 256 MiB VM"
    );

    // The container sees only its own processes (not the agent).
    let (text, rc) = get("ps");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        !text.contains("husk-agent") && !text.contains("init"),
        "{text}"
    );
    assert!(text.lines().count() <= 3, "{text}");

    // A 64 MiB container that allocates 200 MiB is OOM-killed, and husk says so.
    let (text, rc) = get("oom");
    assert!(!text.contains("records in"), "dd finished: {text}");
    assert!(text.contains("OOM-killed"), "{text}");
    assert_eq!(rc, Some(137), "{text}");

    // Half a core: a busy loop gets about half of its wall time, and is throttled.
    let (text, rc) = get("cpu");
    assert_eq!(rc, Some(0), "{text}");
    let kv: HashMap<&str, f64> = text
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
        .collect();
    // Two vCPUs (the MP table) are two CPUs in the guest.
    assert_eq!(kv.get("nproc"), Some(&2.0), "{text}");
    let (cpu, wall) = (kv["cpu_usec"], kv["wall_sec"]);
    let share = cpu / (wall * 1e6);
    println!("cpu limit 0.5: the busy loop got {share:.2} of a core");
    assert!(
        share < 0.7,
        "a 0.5-core limit gave {share:.2} of a core: {text}"
    );
    let throttled: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.trim().parse().ok())
        .expect("nr_throttled");
    assert!(throttled > 0, "{text}");

    // stdin reaches the container.
    let (text, rc) = get("stdin");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("one\ntwo"), "{text}");

    // -t gives the container a terminal.
    let (text, rc) = get("tty");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("tty-ok"), "{text}");
    // The container's terminal has husk's terminal size from its first instant.
    assert!(text.contains("30 100"), "{text}");

    // SIGINT while the container runs: husk stops it and the VM and exits 130 (the
    // leftovers check below covers what it must not leave behind).
    for when in ["interrupt", "interrupt_boot"] {
        let (text, rc) = get(when);
        assert_eq!(rc, Some(130), "{when}: {text}");
        assert!(text.contains("interrupted"), "{when}: {text}");
    }

    // Drives, the VMM jailed: the first container on a read-only drive, the second on a
    // drive filled later through the control API with a file passed to the VMM (one past
    // its file size limit refused first); the VMM ends with the guest and leaves its two
    // sockets to its caller.
    let (text, rc) = get("drives");
    assert_eq!(rc, Some(0), "{text}");
    let seen: Vec<&str> = text
        .lines()
        .filter(|l| ["drive-a", "drive-b", "read-only", "writable"].contains(l))
        .collect();
    assert_eq!(
        seen,
        ["drive-a", "read-only", "drive-b", "writable"],
        "{text}"
    );
    assert!(
        text.contains("vmm user: 1600099999, root: api.sock vsock.sock\n"),
        "{text}"
    );
    assert!(
        text.contains("the VMM refused: the drive file (the file passed with the request) (1073741824 bytes) is bigger than the VMM's file size limit (285212672 bytes"),
        "{text}"
    );
    assert!(
        text.contains("vmm exit 0\nsockets left for the caller: 2\n"),
        "{text}"
    );

    // A shared directory (virtio-fs through virtiofsd, the VMM jailed): the container reads
    // the host's files, written before and after it started; the host reads the container's
    // (owned by root, who wrote it); a symlink to a host file beside the share and `..`
    // reach nothing of the host; the VMM and virtiofsd end with the guest.
    let (text, rc) = get("fs_share");
    assert_eq!(rc, Some(0), "{text}");
    for line in [
        "written by the host before\n",
        "written by the host after\n",
        "host reads: written by the guest\n",
        "owner: 0\n",
        "vmm exit 0\n",
        "virtiofsd exit 0\n",
    ] {
        assert!(text.contains(line), "{line:?}: {text}");
    }
    assert!(!text.contains("host-secret"), "an escape: {text}");
    let symlink = text
        .lines()
        .find(|l| l.starts_with("symlink: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(symlink.contains("No such file"), "{symlink}");
    let dotdot = text
        .lines()
        .find(|l| l.starts_with("dotdot: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(dotdot.contains("No such file"), "{dotdot}");

    // --net tap:NAME: eth0 with the address, the MTU and a locally administered MAC, the
    // default route through the gateway, traffic both ways; the tap is left to its owner.
    let (text, rc) = get("net_tap");
    assert_eq!(rc, Some(0), "{text}");
    let link = text
        .lines()
        .find(|l| l.contains(": eth0:"))
        .unwrap_or_else(|| panic!("no eth0 in the guest: {text}"));
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC: {link}"));
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(first & 0b11, 0b10, "not a local unicast MAC: {mac}");
    assert!(text.contains("inet 10.77.0.2/24"), "{text}");
    assert!(text.contains("default via 10.77.0.1 dev eth0"), "{text}");
    for line in [
        "guest to L1: from-l1\n",
        "L1 to guest: from-l1-to-guest\n",
        "tap left to its owner",
    ] {
        assert!(text.contains(line), "no {line:?}: {text}");
    }
    let (text, rc) = get("net_no_tap");
    assert_ne!(rc, Some(0), "{text}");
    assert!(text.contains("nosuchtap0"), "{text}");
    let (text, rc) = get("net_bad_ip");
    assert_eq!(rc, Some(2), "a usage error: {text}");
    assert!(text.contains("not 0 to 32"), "{text}");

    // SIGTERM to the VMM: a clean stop, no socket left.
    let (text, rc) = get("vmm_sigterm");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("vmm exit 0\nsockets left: 0\n"), "{text}");
    assert!(text.contains("stopping the VM"), "{text}");

    // A VM template: snapshotted once, restored twice, each clone's agent answering.
    let (text, rc) = get("template");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("template vmm exit 0"), "{text}");
    for n in [1, 2] {
        assert!(
            text.contains(&format!("clone {n}: agent answered"))
                && text.contains(&format!("clone {n} vmm exit 0")),
            "clone {n}: {text}"
        );
    }
    assert!(
        text.contains("it holds a VM of 1 vCPUs and 128 MiB, not 1 and 256 MiB"),
        "a mismatched restore: {text}"
    );
    // Each clone refuses a sandbox until told Restored; then its container's random bytes
    // are its own and its clock is the host's (the template's stood still 3 s and more).
    let mut randoms = Vec::new();
    for n in [1, 2] {
        let line = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("clone {n}{prefix}")))
                .unwrap_or_else(|| panic!("no 'clone {n}{prefix}' line: {text}"))
                .to_string()
        };
        assert!(
            line(" before Restored: ").contains("this VM is a template"),
            "{text}"
        );
        let behind = line(": the guest's clock was ");
        let secs: f64 = behind.split(' ').next().unwrap().parse().unwrap();
        assert!(
            secs >= 2.5,
            "clone {n}'s clock was only {secs} s behind: {text}"
        );
        let container = line(" container: ");
        let word = |key: &str| {
            let mut w = container.split_whitespace();
            w.find(|x| *x == key)
                .and_then(|_| w.next())
                .unwrap_or_else(|| panic!("no {key} in clone {n}'s container: {container}"))
                .to_string()
        };
        // "random HEX time GUEST_SECS host time HOST_SECS"
        let random = word("random");
        assert_eq!(random.len(), 32, "16 bytes in hex: {container}");
        let guest: i64 = word("time").parse().expect("the guest's time");
        let host: i64 = container
            .rsplit(' ')
            .next()
            .and_then(|w| w.parse().ok())
            .expect("the host's time");
        assert!((guest - host).abs() <= 5, "clone {n}'s clock: {container}");
        randoms.push(random);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two clones drew the same random bytes"
    );
    println!("template: {text}");

    // A guest that never becomes ready, and a missing kernel: clear errors.
    let (text, rc) = get("never_ready");
    assert_ne!(rc, Some(0), "{text}");
    assert!(text.contains("did not become ready within 20"), "{text}");
    // The VMM status says where the guest is: registers, run state, TSC and timer deadline.
    for field in [
        "\"rip\":\"0x",
        "\"mp_state\":\"",
        "\"tsc\":",
        "\"tsc_deadline_in\":",
    ] {
        assert!(text.contains(field), "no {field} in the VMM status: {text}");
    }
    let (text, rc) = get("missing_kernel");
    assert_ne!(rc, Some(0), "{text}");
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");

    // /etc/husk/config.toml ($HUSK_CONFIG here) chooses the kernel; a wrong key is named.
    let (text, rc) = get("config_kernel");
    assert_ne!(rc, Some(0), "{text}");
    assert!(
        text.contains("the guest kernel /nonexistent/configured-vmlinux does not exist"),
        "{text}"
    );
    let (text, rc) = get("config_bad");
    assert_ne!(rc, Some(0), "{text}");
    assert!(text.contains("unknown key pod.vcpu "), "{text}");

    // Nothing left: no VMM process, no run directory, no mount.
    let (text, _) = get("leftovers");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, vec!["0"], "left behind: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}
