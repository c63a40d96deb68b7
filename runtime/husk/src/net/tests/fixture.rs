//! Real namespaces for the root tests: named network namespaces that are deleted when their
//! guard drops (also when a test fails), a pod namespace wired to an "outside" one by a veth
//! pair as the CNI bridge or ptp plugins would leave it, raw packet sockets, and `ip`/`tc`
//! to look at the result.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::net::netns;

/// The pod interface's identity in [`veth_pod`].
pub(super) const POD_MAC: &str = "02:00:0a:63:00:05";
pub(super) const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x63, 0, 0x01];
pub(super) const POD_MTU: u32 = 1400;
/// A local experimental ethertype for the test frames.
pub(super) const TEST_ETHERTYPE: u16 = 0x88b5;
/// The kernel's default virtio-net header size on a tap opened with IFF_VNET_HDR.
pub(super) const VNET_HDR_LEN: usize = 10;

/// Fails (never skips) the calling test when not root.
pub(super) fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it makes network namespaces, veth pairs, taps and tc filters"
    );
}

/// Runs a command, panics with its stderr unless it succeeds, returns its stdout.
pub(super) fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
#[derive(Debug)]
pub(super) struct Netns {
    pub(super) name: String,
}

impl Netns {
    pub(super) fn new(tag: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("husk-t{}-{tag}{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    pub(super) fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    pub(super) fn ip(&self, args: &str) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all)
    }

    /// `ip -n NAME -j ARGS...`, parsed.
    pub(super) fn ip_json(&self, args: &str) -> serde_json::Value {
        serde_json::from_str(&self.ip(&format!("-j {args}"))).unwrap()
    }

    /// `tc -n NAME -j ARGS...`, parsed (`[]` for tc's empty output).
    pub(super) fn tc_json(&self, args: &str) -> serde_json::Value {
        let mut all = vec!["-n", &self.name, "-j"];
        all.extend(args.split_whitespace());
        let out = run("tc", &all);
        if out.trim().is_empty() {
            return serde_json::json!([]);
        }
        serde_json::from_str(&out).unwrap()
    }

    /// Whether an interface of that name exists in the namespace.
    pub(super) fn has_link(&self, name: &str) -> bool {
        self.ip_json("link show")
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ifname"] == name)
    }

    /// The qdisc kinds of an interface (`["noqueue"]` for an untouched veth).
    pub(super) fn qdisc_kinds(&self, dev: &str) -> Vec<String> {
        let qdiscs = self.tc_json(&format!("qdisc show dev {dev}"));
        qdiscs
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["kind"].as_str().unwrap().to_string())
            .collect()
    }

    /// Opens a raw packet socket bound to `dev` in this namespace.
    pub(super) fn packet_socket(&self, dev: &str) -> OwnedFd {
        let file = File::open(self.path()).unwrap();
        netns::run_in(&file, &self.path(), || async { packet_socket(dev) }).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A pod namespace whose `eth0` (MAC [`POD_MAC`], MTU [`POD_MTU`], 10.99.0.5/24 and
/// fd00:99::5/64, default routes via .1 and ::1) is a veth whose peer `veth0` is in `outside`.
#[derive(Debug)]
pub(super) struct VethPod {
    pub(super) pod: Netns,
    pub(super) outside: Netns,
}

pub(super) fn veth_pod() -> VethPod {
    let f = bare_veth_pod();
    f.pod.ip("addr add 10.99.0.5/24 dev eth0");
    f.pod.ip("addr add fd00:99::5/64 dev eth0 nodad");
    f.pod.ip("route add default via 10.99.0.1 dev eth0");
    f.pod
        .ip("-6 route add default via fd00:99::1 dev eth0 metric 1024 mtu 1300");
    f
}

/// The veth pair of [`veth_pod`], `eth0` up with its MAC and MTU but no address or route.
pub(super) fn bare_veth_pod() -> VethPod {
    let pod = Netns::new("pod");
    let outside = Netns::new("out");
    outside.ip(&format!(
        "link add veth0 type veth peer name eth0 netns {}",
        pod.name
    ));
    let mac: Vec<String> = OUTSIDE_MAC.iter().map(|b| format!("{b:02x}")).collect();
    // No IPv6 link-local address outside: fewer frames of its own into the pod.
    outside.ip(&format!(
        "link set veth0 address {} addrgenmode none up",
        mac.join(":")
    ));
    pod.ip(&format!("link set eth0 address {POD_MAC} mtu {POD_MTU}"));
    pod.ip("link set eth0 up");
    pod.ip("link set lo up");
    VethPod { pod, outside }
}

fn packet_socket(dev: &str) -> OwnedFd {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: `name` is a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {dev}");
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a socket just created and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is a plain C struct; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the given length that lives across the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// An Ethernet frame of the test ethertype carrying `payload`.
pub(super) fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

pub(super) fn write_all(fd: &OwnedFd, buf: &[u8]) {
    let n = nix::unistd::write(fd, buf).unwrap();
    assert_eq!(n, buf.len());
}

/// Reads what arrives on `fd` until `want` says yes or `timeout` passes; returns the matching
/// read, or `None` with what else came in.
pub(super) fn read_until(
    fd: &OwnedFd,
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, Vec<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut others = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(others);
        }
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(fd), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap();
        if want(&buf[..n]) {
            return Ok(buf[..n].to_vec());
        }
        others.push(buf[..n].to_vec());
    }
}

/// Whether `haystack` holds `needle`.
pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
