//! containerd end to end in the nested-KVM testbed: containerd 1.6 with its CRI plugin, a CNI
//! bridge, locally built images (pause, busybox) and crictl, running the pod and container
//! steps (runp, create, start, logs, exec, stop, rm, stopp, rmp) and timing them.
//!
//! Needs root, the testbed's prerequisites, and containerd, runc, the CNI plugins and crictl
//! (scripts/setup.sh installs them).

use std::{path::Path, time::Duration};

use husk_tests::{sections::sections, testbed};

/// The rest of the line of `text` that starts with `prefix`; panics naming it when none does.
fn field_of(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?}: {text}"))
        .to_string()
}

#[test]
fn crictl_pod_lifecycle() {
    husk_tests::agent::require_root();
    testbed::require_tools(&["containerd", "ctr", "runc", "crictl", "gcc"]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // A VMM with the test-only seccomp trigger, for husk_confined (never in a release).
    let built = std::process::Command::new(env!("CARGO"))
        .current_dir(repo)
        .args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "husk-vmm",
            "--features",
            "seccomp-trigger",
            "--target-dir",
            "target/seccomp-trigger",
        ])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "building husk-vmm with seccomp-trigger");
    // The file-handle forger husk_volumes runs in a container (static: the image has no libc).
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(repo.join("target/handle-escape"))
        .arg(repo.join("tests/helpers/handle-escape.c"))
        .status()
        .expect("gcc runs");
    assert!(built.success(), "building tests/helpers/handle-escape.c");
    let cmd = format!(
        "bash {}/tests/scripts/cri-checks.sh {}",
        repo.display(),
        repo.display()
    );
    // husk install copies husk, the shim and husk-vmm (debug builds, 380 MB) into L1's
    // tmpfs-backed root, beside the pods' memory.
    let out = testbed::run_with(
        &cmd,
        &testbed::Options {
            timeout: Duration::from_secs(1200),
            mem_mib: 3072,
            ..Default::default()
        },
    )
    .expect("the testbed ran");
    println!("{}", out.stdout);
    let s = sections(&out.stdout);
    let get = |n: &str| {
        s.get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no section {n}: {}", out.stdout))
    };

    let (text, rc) = get("containerd");
    assert_eq!(rc, Some(0), "containerd did not come up: {text}");

    // husk doctor: on this host (L1, nested SVM, containerd with husk registered) a pod can
    // start, and it says so, with KVM and the guest image found good.
    let (text, rc) = get("doctor");
    assert_eq!(rc, Some(0), "husk doctor failed where pods run: {text}");
    assert!(text.contains("husk doctor: a pod can start here"), "{text}");
    for line in [
        "ok    kvm: /dev/kvm usable, API 12, AMD-V (svm)",
        "ok    runtime class:",
        "ok    shim:",
        "ok    guest image:",
    ] {
        assert!(text.contains(line), "no '{line}': {text}");
    }
    assert!(!text.contains("\nFAIL"), "{text}");

    // The peer: runc through the same CRI steps.
    let (text, rc) = get("runc");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("hello from the container"), "{text}");
    assert!(text.contains("exec-ok"), "{text}");
    assert!(text.contains("pods left: 0"), "{text}");
    assert!(text.contains("timing runc:"), "{text}");

    const CLEAN: &str =
        "leftovers: vmm 0 shim 0 run dirs 0 own layers 0 scratch 0 rootfs mounts 0 pods 0 containers 0 netns 0 taps 0 cgroups 0 uid leases 0 virtiofsd 0";

    // The untrusted annotation selects husk (`husk install` registered it): the pod is a
    // microVM, its container runs in the guest through every CRI step, and afterwards no
    // VMM, shim, run directory, image file or mount is left.
    let (text, rc) = get("husk");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("SANDBOX_READY"), "{text}");
    // The shim's log: the pod's field on its lines, the container's on the container's, and
    // the guest console named, there and holding the agent's log of the container.
    let shim_log = text
        .lines()
        .find_map(|l| l.strip_prefix("shim log: "))
        .unwrap_or_else(|| panic!("no shim log line: {text}"));
    let counts: Vec<u32> = shim_log
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    assert!(
        counts.len() == 2 && counts[0] >= 2 && counts[1] >= 1,
        "{shim_log}"
    );
    let agent_lines: u32 = shim_log
        .rsplit_once(", ")
        .and_then(|(_, l)| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        shim_log.contains("the guest console is /run/husk/shim/") && agent_lines >= 1,
        "{shim_log}"
    );
    assert!(
        text.contains("vmm processes: 1\n"),
        "no microVM for the pod: {text}"
    );
    // Its shared directory: a virtiofsd (its monitor and its sandboxed server), and the
    // guest's virtio-fs driver up (the agent mounted it before the pod was ready).
    assert!(text.contains("virtiofsd processes: 2\n"), "{text}");
    assert!(
        text.contains("shared fs device: \"id\":\"fs-husk-shared\",\"driver_status\":15\n"),
        "{text}"
    );
    assert!(text.contains("hello from the container"), "{text}");
    assert!(text.contains("exec-ok"), "{text}");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix}: {text}"))
            .to_string()
    };
    let ids = line("boot id in the container: ");
    let (guest, l1) = ids
        .strip_prefix("boot id in the container: ")
        .unwrap()
        .split_once(", in L1: ")
        .unwrap();
    assert!(
        guest.len() == 36 && guest != l1,
        "not the VM's kernel: {ids}"
    );
    // The container sees its own processes (the exec'd ps and its sleep; `sh -c` exec'd
    // into sleep) and the pod's pause (crictl's container config leaves the PID namespace
    // mode at POD, so the containers share the pod's, as under runc), not the agent's.
    assert_eq!(
        line("processes in the container: "),
        "processes in the container: pause ps sleep",
        "{text}"
    );
    // stdin reaches an exec and ends with CloseIO; Update changes the guest cgroup live;
    // Pause and Resume freeze and thaw it.
    assert!(text.contains("stdin through exec -i: one two\n"), "{text}");
    // A terminal exec sees a tty of crictl's size (ResizePty). (The terminal may echo a
    // control character crictl sends between the two.)
    let tty = line("exec -it: ");
    assert!(
        tty.starts_with("exec -it: tty-ok ") && tty.ends_with("33 111"),
        "{tty}"
    );
    assert!(
        text.contains("memory.max after update: 104857600\n"),
        "{text}"
    );
    assert!(text.contains("after pause: PAUSED\n"), "{text}");
    assert!(text.contains("after resume: RUNNING\n"), "{text}");
    // Checkpoint is refused as not implemented, saying so.
    assert!(
        text.contains("checkpoint: cannot checkpoint task not implemented\n"),
        "{text}"
    );
    assert!(
        !text.contains("container hosts file: 0 "),
        "CRI's /etc/hosts did not reach the container: {text}"
    );
    assert!(text.contains("\"state\": \"CONTAINER_RUNNING\""), "{text}");
    assert!(text.contains("\"state\": \"CONTAINER_EXITED\""), "{text}");
    let stats = line("stats: ");
    let ws: u64 = stats
        .rsplit('"')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no working set in {stats}"));
    assert!(ws > 0, "{stats}");
    assert!(text.contains("timing husk:"), "{text}");
    // The shim's events, as containerd saw them, in order: the container's create and start,
    // each exec's added/started/exit, pause and resume, and its exit before its delete.
    let events = line("container events: ");
    assert!(
        events.starts_with(
            "container events: /tasks/create /tasks/start /tasks/exec-added /tasks/exec-started /tasks/exit /tasks/exec-added"
        ),
        "{events}"
    );
    assert!(
        events.contains(" /tasks/paused /tasks/resumed "),
        "{events}"
    );
    assert!(events.ends_with(" /tasks/exit /tasks/delete"), "{events}");
    assert!(text.contains(CLEAN), "{text}");

    // Two pods are two microVMs: different boot ids, and neither sees the other's processes.
    // SIGKILL to one VMM: that pod's sandbox task and its container have exited, the other
    // pod is untouched, and both go without leftovers.
    let (text, rc) = get("husk_two_pods");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("vmm processes: 2\n"), "{text}");
    assert!(text.contains(" differ\n"), "{text}");
    // (Its own processes: its pause, PID 1 of the pod's PID namespace, its sleep and ps.)
    assert!(
        text.contains("pod b sees: pause __pod-pause sleep 1002 ps -o args"),
        "{text}"
    );
    // The pod's tc wiring goes with its VM, whatever ended it.
    assert!(
        text.contains("pod a network before: qdiscs 2 filters 1 tap 1\n"),
        "{text}"
    );
    assert!(
        text.contains("pod a network after the VMM's SIGKILL: qdiscs 0 filters 0 tap 0\n"),
        "{text}"
    );
    assert!(!text.contains("sleep 1001 "), "{text}");
    assert!(
        text.contains(
            "killed pod: SANDBOX_NOTREADY, its container: \"state\": \"CONTAINER_EXITED\""
        ),
        "{text}"
    );
    assert!(
        text.contains("other pod: SANDBOX_READY, its container: \"state\": \"CONTAINER_RUNNING\""),
        "{text}"
    );
    assert!(text.contains("vmm processes: 1\n"), "{text}");
    assert!(text.contains(CLEAN), "{text}");

    // Over its memory limit, a container is OOM-killed in the guest and CRI reports OOMKilled.
    let (text, rc) = get("husk_oom");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("\"state\": \"CONTAINER_EXITED\""), "{text}");
    assert!(text.contains("\"reason\": \"OOMKilled\""), "{text}");
    assert!(text.contains("\"exitCode\": 137"), "{text}");
    let events = text
        .lines()
        .find_map(|l| l.strip_prefix("container events: "))
        .unwrap_or_else(|| panic!("no events: {text}"));
    assert!(
        events.starts_with("/tasks/create /tasks/start /tasks/oom ")
            && events.contains(" /tasks/exit"),
        "the OOM event comes before the exit: {events}"
    );
    // A program that does not exist: start says so; its removal takes its layers out of the
    // VM, and the pod's next container runs.
    assert!(
        text.contains("bad start: /no/such/program") && text.contains("no such file or directory"),
        "{text}"
    );
    assert!(
        text.contains("bad container: exitCode: 128 state: CONTAINER_EXITED\n"),
        "{text}"
    );
    assert!(
        text.contains("layers the VMM holds after rm: 0\n"),
        "{text}"
    );
    assert!(text.contains("next container ok\n"), "{text}");
    assert!(
        text.contains("next container: exitCode: 0 state: CONTAINER_EXITED\n"),
        "{text}"
    );
    assert!(text.contains(CLEAN), "{text}");

    // Image layers: overlay semantics as under runc, writes private to the container, one
    // host copy of each layer for every pod, 32 containers in a pod, damaged entries
    // rebuilt, a changed image never served from a stale entry.
    let (text, rc) = get("husk_layers");
    assert_eq!(rc, Some(0), "{text}");
    let line = |prefix: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}: {text}"))
            .to_string()
    };
    let seen = "data: keep opq: upper keep: keep";
    assert_eq!(line("runc sees: "), seen, "{text}");
    assert_eq!(line("husk sees: "), seen, "{text}");
    assert_eq!(line("husk exec sees the write: "), "x", "{text}");
    assert_eq!(line("a new container sees: "), "data: keep", "{text}");
    assert_eq!(
        line("second pod: "),
        "3 image layers (3 from the cache, 0 converted)",
        "{text}"
    );
    let bytes = line("layer cache bytes: before the second pod ");
    let (before, after) = bytes.split_once(" after ").unwrap();
    assert_eq!(
        before, after,
        "the cache grew for a second pod of the image: {text}"
    );
    assert_eq!(line("running in the second pod: "), "33", "{text}");
    // The layers image's three (busybox's is its bottom one): 33 containers share them, and
    // none has a layer of its own (CRI's files come through the shared directory).
    assert_eq!(line("layers its VMM holds: "), "3", "{text}");
    assert_eq!(line("layers its VMM holds after rm: "), "3", "{text}");
    let rebuilt = line("after truncating the cache entries: ");
    assert!(rebuilt.starts_with("1 container ran, "), "{text}");
    assert!(!rebuilt.ends_with(" 0 rebuilt"), "{text}");
    assert_eq!(
        line("after the image changed: "),
        "data: keep opq: upper keep: keep-v2",
        "{text}"
    );
    assert_eq!(
        line("its layers: "),
        "3 image layers (1 from the cache, 2 converted)",
        "{text}"
    );
    assert!(text.contains(CLEAN), "{text}");

    // A privileged container in a privileged pod: every capability, /sys remounted
    // writable, none of the host's devices; the pod's sysctls set in the guest; a sysctl the
    // guest lacks fails runp naming it, with nothing left.
    let (text, rc) = get("husk_security");
    assert_eq!(rc, Some(0), "{text}");
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("caps: "))
        .unwrap_or_else(|| panic!("no caps line: {text}"));
    let shared = text
        .lines()
        .find_map(|l| l.strip_prefix("shared pid namespace: "))
        .unwrap_or_else(|| panic!("no shared pid line: {text}"));
    assert!(
        shared.starts_with("PID COMMAND 1 pause __pod-pause "),
        "PID 1 is not the pod's pause: {text}"
    );
    assert!(
        shared.contains("sleep 1001") && shared.contains("sleep 1002"),
        "the containers do not see each other: {text}"
    );
    let caps = u64::from_str_radix(caps.trim(), 16).unwrap();
    assert_eq!(
        caps.count_ones(),
        41,
        "not every capability: {caps:x}\n{text}"
    );
    for line in [
        "sys: rw\n",
        "kvm: 1\n",
        "sysctls: 1 100\n",
        "bad sysctl: sysctl kernel.husk_no_such_setting: the guest kernel has no such setting",
    ] {
        assert!(text.contains(line), "no {line:?}: {text}");
    }
    assert!(text.contains(CLEAN), "{text}");

    // Volumes are shared live through the pod's shared directory (virtio-fs): both ways
    // between host and container and between the pod's containers, read-only where asked
    // (also after a privileged remount), updated from the host, and nothing outside the
    // share is reachable: not through a symlink, `..`, the whole share, or forged file
    // handles. The mounts live in virtiofsd's namespace only; rmp and a VMM kill leave the
    // host's files and nothing else.
    let (text, rc) = get("husk_volumes");
    assert_eq!(rc, Some(0), "{text}");
    for line in [
        "host to container: from-host\n",
        "container to host: from-c1\n",
        "c1 to c2: from-c1\n",
        "c2 to c1: from-c2\n",
        "read-only: Read-only file system\n",
        "read-only after a remount rw: Read-only file system\n",
        "read-only volume updated on the host: v2\n",
        "hosts file through the share: virtiofs\n",
        "symlink to the host: No such file or directory\n",
        "dot-dot walk: No such file or directory\n",
        "the share mounted whole: mounted 0\n",
        "host mount table: 0 volume mounts\n",
        "host files after rmp: c1-file c2-file escape handle-escape host-file\n",
        "after the VMM's SIGKILL: virtiofsd 0\n",
        "host files after the kill: c1-file c2-file escape handle-escape host-file\n",
    ] {
        assert!(text.contains(line), "no {line:?}: {text}");
    }
    // The forging helper opens what it can; none of it is the host's file.
    let handles: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("handles: "))
        .collect();
    assert_eq!(handles.len(), 2, "{text}");
    for h in handles {
        assert!(
            h.ends_with(" marker_found=0"),
            "a host file reached: {h}\n{text}"
        );
    }
    // Each container's volumes are mounts in virtiofsd's namespace: c1 its two and CRI's
    // hosts, hostname and resolv.conf, c2 its one and those three.
    assert!(
        text.contains("virtiofsd's namespace: 5+4 volume mounts\n"),
        "{text}"
    );
    assert_eq!(text.matches(CLEAN).count(), 2, "{text}");

    // containerd restarts: it reconnects to the pod's shim; the same VM and its container run
    // on, take an exec, and still stop cleanly.
    let (text, rc) = get("husk_restart");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("after restart: SANDBOX_READY, same vmm yes"),
        "{text}"
    );
    assert!(text.contains("still-running"), "{text}");
    assert!(text.contains(CLEAN), "{text}");

    // SIGKILL to a pod's shim: its VM goes with it, containerd sees the pod and its container
    // stopped, and removing them leaves nothing.
    // A husk pod on the CNI bridge: the guest has the pod's IP, MAC, MTU, route and DNS,
    // serves and fetches HTTP to and from a runc pod and another husk pod, reaches the
    // gateway; port forwarding reaches it; its tap, qdiscs, filters and NAT rule are gone
    // after stopp/rmp.
    let (text, rc) = get("husk_network");
    assert_eq!(rc, Some(0), "{text}");
    let field = |prefix: &str| field_of(&text, prefix);
    let ips = field("pod ips: ");
    let husk_ip = ips
        .split_whitespace()
        .skip_while(|w| *w != "husk")
        .nth(1)
        .unwrap_or_else(|| panic!("no husk pod ip: {ips}"));
    assert!(husk_ip.starts_with("10.88.77."), "{ips}");
    assert_eq!(
        field("husk eth0 inet: "),
        format!("inet {husk_ip}/24"),
        "{text}"
    );
    let macs = field("husk eth0 mac: ");
    let (guest_mac, veth_mac) = macs.split_once(" veth mac: ").unwrap();
    assert_eq!(guest_mac, veth_mac, "{text}");
    let mtus = field("husk eth0 mtu: ");
    let (guest_mtu, veth_mtu) = mtus.split_once(" veth mtu: ").unwrap();
    assert_eq!(guest_mtu, veth_mtu, "{text}");
    assert_eq!(
        field("husk route: "),
        "default via 10.88.77.1 (pod netns: default via 10.88.77.1)",
        "{text}"
    );
    // Dual stack: the pod's IPv6 address and default route in the guest, traffic both ways.
    let ips6 = field("pod ipv6: ");
    let husk_ip6 = ips6
        .split_whitespace()
        .skip_while(|w| *w != "husk")
        .nth(1)
        .unwrap_or_else(|| panic!("no husk pod IPv6 address: {ips6}"));
    assert!(husk_ip6.starts_with("fd88:77::"), "{ips6}");
    assert_eq!(
        field("husk eth0 inet6: "),
        format!("inet6 {husk_ip6}/64"),
        "{text}"
    );
    assert_eq!(
        field("husk route6: "),
        "default via fd88:77::1 (pod netns: default via fd88:77::1)",
        "{text}"
    );
    for line in ["husk -> runc (ipv6 ping): ", "runc -> husk (ipv6 ping): "] {
        assert_eq!(field(line), "1 packets received", "{text}");
    }
    assert_eq!(field("runc -> husk (ipv6 http): "), "from-husk", "{text}");
    let resolv = field("husk resolv.conf: ");
    for want in [
        "nameserver 10.88.77.53",
        "search husk.test",
        "options ndots:2",
    ] {
        assert!(resolv.contains(want), "{want} not in {resolv}");
    }
    assert_eq!(field("husk -> runc: "), "from-runc", "{text}");
    assert_eq!(field("runc -> husk: "), "from-husk", "{text}");
    assert_eq!(field("husk -> husk2: "), "from-husk2", "{text}");
    assert_eq!(field("husk -> gateway: "), "1 packets received", "{text}");
    // Port forwarding reaches the guest's servers, also one bound to its loopback only, as
    // runc's reaches its container's; a closed port fails.
    assert_eq!(field("port-forward runc 8080: "), "from-runc", "{text}");
    assert_eq!(field("port-forward husk 8080: "), "from-husk", "{text}");
    assert_eq!(
        field("port-forward husk loopback 8081: "),
        "from-loopback",
        "{text}"
    );
    assert!(
        field("port-forward husk closed port 9: ").starts_with("no page: "),
        "{text}"
    );
    assert_eq!(
        field("tc in the pod netns: "),
        "qdiscs 2 filters 1 tap 1 forward rule 1",
        "{text}"
    );
    let after = field("after stopp, in the pod netns: ");
    assert!(
        [
            "qdiscs 0 tap 0 forward rule 0",
            "qdiscs 0 tap 0 (netns gone)"
        ]
        .contains(&after.as_str()),
        "{text}"
    );
    assert!(text.contains(": network wired in "), "{text}");
    assert!(text.contains(CLEAN), "{text}");

    // A hostNetwork pod is refused with why, and nothing is left.
    let (text, rc) = get("husk_host_network");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("a VM cannot share the host's network namespace"),
        "{text}"
    );
    assert!(text.contains(CLEAN), "{text}");

    let (text, rc) = get("husk_shim_killed");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("network before: qdiscs 2 filters 1 tap 1\n"),
        "{text}"
    );
    assert!(
        text.contains("network after the shim's SIGKILL: qdiscs 0 filters 0 tap 0\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "after the shim's SIGKILL: SANDBOX_NOTREADY, container CONTAINER_EXITED, vmm 0"
        ),
        "{text}"
    );
    assert!(text.contains(CLEAN), "{text}");

    // The VMM's threads each under a seccomp filter; a thread that breaks it kills the VMM,
    // and the pod is reported stopped with that cause.
    let (text, rc) = get("husk_confined");
    assert_eq!(rc, Some(0), "{text}");
    let field = |prefix: &str| field_of(&text, prefix);
    let threads = field("vmm threads: ");
    let (count, rest) = threads.split_once(" filtered: ").unwrap();
    let (filtered, names) = rest.split_once(' ').unwrap();
    assert_eq!(count, filtered, "every thread filtered: {threads}");
    for name in ["exit", "io", "signals", "vcpu0"] {
        assert!(names.contains(name), "{threads}");
    }
    assert_eq!(field("vmm NoNewPrivs: "), "1", "{text}");
    // Jailed (husk-vmm --jail): a user and group of its own from [vmm] uids, nothing else.
    let user = field("vmm user: ");
    let words: Vec<&str> = user.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{user}");
    let uid: u32 = words[1].parse().unwrap_or_else(|_| panic!("{user}"));
    assert!(
        (1_600_000_000..=1_600_065_535).contains(&uid),
        "a uid of the default range: {user}"
    );
    assert_eq!(words[3], words[1], "gid = uid: {user}");
    assert_eq!(words[5], "[]", "no supplementary groups: {user}");
    assert_eq!(
        field("vmm capabilities: "),
        "CapAmb: 0000000000000000 CapBnd: 0000000000000000 CapEff: 0000000000000000 \
         CapInh: 0000000000000000 CapPrm: 0000000000000000",
        "no capability on any thread: {text}"
    );
    assert_eq!(field("vmm root: "), "api.sock vsock.sock", "{text}");
    // Its only mount: the jail directory, read-only, nosuid, nodev, noexec.
    let mount = field("vmm root mount: ");
    let (options, count) = mount.split_once(' ').unwrap();
    assert_eq!(count, "(1 mounts)", "{text}");
    let options: Vec<&str> = options.split(',').collect();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(options.contains(&o), "{o}: {mount}");
    }
    assert_eq!(field("vmm lease: "), "held", "{text}");
    assert_eq!(
        field("vmm namespaces shared with the host: "),
        "none",
        "{text}"
    );
    // Open files: 2 x 1024 vsock sockets and 128 of its own; file size: its largest
    // writable drive, the 10 GiB scratch drive.
    assert_eq!(
        field("vmm limits: "),
        "open files 2176 2176 file size 10737418240 10737418240",
        "{text}"
    );
    assert_eq!(
        field("vmm NSpid: "),
        "1",
        "PID 1 of its own namespace: {text}"
    );
    let cg = field("vmm cgroup: ");
    let words: Vec<&str> = cg.split_whitespace().collect();
    assert_eq!(words[..2], ["the", "pod's"], "{text}");
    let mem: u64 = words[3]
        .parse()
        .unwrap_or_else(|_| panic!("memory.max: {cg}"));
    assert!(mem > 256 << 20, "memory.max above the guest's memory: {cg}");
    assert_eq!(words[4..], ["pids.max", "9", "procs", "1"], "{text}");
    assert!(text.contains("exec-under-seccomp"), "{text}");
    for kind in ["io", "vcpu"] {
        assert_eq!(
            field(&format!("trigger {kind}: ")),
            "pod SANDBOX_NOTREADY, container CONTAINER_EXITED, shim log: the VMM was killed by its seccomp filter (SIGSYS)",
            "{text}"
        );
    }
    assert!(text.contains(CLEAN), "{text}");

    // husk monitor, scraped twice while two pods run: both pods' series, plausible values.
    let (text, rc) = get("husk_metrics");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("pods in the scrape: 2\n"), "{text}");
    for i in 0..2 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("pod {i}: ")))
            .unwrap_or_else(|| panic!("no pod {i}: {text}"));
        // The Kubernetes name and namespace from the pod's CRI metadata.
        let labels = format!("labels pod=\"metrics-{}\",namespace=\"default\",", i + 1);
        for want in [
            "info 1,",
            "rss covers the guest",
            "grew",
            "agent up 1,",
            "container memory 1 series",
            labels.as_str(),
        ] {
            assert!(line.contains(want), "pod {i}: no '{want}': {line}");
        }
        let number = |after: &str| -> f64 {
            line.split(after)
                .nth(1)
                .and_then(|r| r.split([',', ' ']).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no number after '{after}': {line}"))
        };
        assert!(number("series ") >= 20.0, "{line}");
        assert!(number("io exits ") > 0.0, "{line}");
        assert!(number("vsock bytes to the guest ") > 0.0, "{line}");
        // A boot takes seconds in the testbed; a health check well under the RPC deadline.
        let boot = number("boot seconds ");
        assert!(boot > 0.0 && boot < 300.0, "{line}");
        let rpc = number("rpc latency seconds ");
        assert!(rpc > 0.0 && rpc < 10.0, "{line}");
    }
    assert!(text.contains(CLEAN), "{text}");

    // husk as installed runs a pod with the build tree and the build cache hidden: the shim,
    // husk-vmm and the guest image are the installed ones.
    let (text, rc) = get("husk_standalone");
    assert_eq!(rc, Some(0), "{text}");
    assert!(
        text.contains("hidden: target current kernel initramfs ")
            && text.contains("(entries left in them: 0)"),
        "{text}"
    );
    assert!(
        text.contains("kernel = \"/usr/local/share/husk/vmlinux\""),
        "{text}"
    );
    for line in [
        "ok    shim: /usr/local/bin/containerd-shim-husk-v2",
        "ok    vmm: /usr/local/bin/husk-vmm",
        "ok    guest kernel: /usr/local/share/husk/vmlinux",
        "ok    guest image: /usr/local/share/husk/initramfs.cpio.gz",
        "standalone-ok",
        "exec-standalone",
        "vmm: /usr/local/bin/husk-vmm",
    ] {
        assert!(text.contains(line), "no '{line}': {text}");
    }
    assert!(text.contains(CLEAN), "{text}");

    // Pods start from a VM template (made by the first pod of its shape, which restores it
    // too, as do the next), with RNGs of their own and the host's clock; a template changed on disk is refused and made again; a pod
    // of another size gets a template of its own; with templates off, a pod boots.
    let (text, rc) = get("husk_templates");
    assert_eq!(rc, Some(0), "{text}");
    for line in [
        "first pod: made 1 restored 1 refused 0",
        "two pods: made 0 restored 2 refused 0",
        "(differ)",
        "(1 within 5 s)",
        "templates: 1 sound",
        "after a changed template: made 1 restored 1 refused 1 (\"state\": \"SANDBOX_READY\")",
        "another size: made 1 restored 1 refused 0, templates 2",
        "templates off: made 0 restored 0 refused 0",
        "clones booted cold instead: 0",
    ] {
        assert!(text.contains(line), "no '{line}': {text}");
    }
    assert!(text.contains(CLEAN), "{text}");

    // A pod whose VM cannot start: runp fails saying why, nothing is left.
    let (text, rc) = get("husk_no_kernel");
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("vmlinux does not exist"), "{text}");
    assert!(text.contains(CLEAN), "{text}");
    // husk doctor names it too, and says a pod cannot start.
    assert!(text.contains("FAIL  guest kernel:"), "{text}");
    assert!(text.contains("doctor without the kernel: rc 1"), "{text}");
}
