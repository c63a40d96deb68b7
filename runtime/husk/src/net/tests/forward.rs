//! Port forwarding's listener and NAT rule in a real namespace: a loopback connection made in
//! the pod's namespace reaches `open` with the port it was made to; teardown removes the rule
//! and nothing else.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

use super::fixture::*;
use crate::net::{teardown, PortForward, FORWARD_CHAIN};

/// `iptables -t nat -S` in the namespace.
fn nat_rules(ns: &Netns) -> String {
    run(
        "ip",
        &["netns", "exec", &ns.name, "iptables", "-t", "nat", "-S"],
    )
}

/// Connects to 127.0.0.1:`port` from inside `ns`, sends `msg`, half-closes, reads to the end.
fn exchange(ns: &Netns, port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(ns.path()).unwrap();
    crate::net::netns::run_in(&file, &ns.path(), || async {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(msg)?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    })
    .unwrap()
}

#[test]
fn a_loopback_connection_in_the_pod_reaches_the_port_it_was_made_to() {
    require_root();
    let ns = Netns::new("fwd");
    ns.ip("link set lo up");
    // A rule an earlier setup left (a shim that died) is replaced, not doubled.
    drop(PortForward::setup(&ns.path()).unwrap());
    let forward = PortForward::setup(&ns.path()).unwrap();
    let rules = nat_rules(&ns);
    assert_eq!(rules.matches("-j HUSK-PORT-FORWARD").count(), 1, "{rules}");
    assert!(
        rules.contains(&format!(
            "-A OUTPUT -d 127.0.0.0/8 -p tcp -j {FORWARD_CHAIN}"
        )) && rules.contains(&format!(
            "-j DNAT --to-destination 127.0.0.1:{}",
            forward.port()
        )),
        "{rules}"
    );
    let host_rules = run("iptables", &["-t", "nat", "-S"]);
    assert!(
        !host_rules.contains(FORWARD_CHAIN),
        "the host's namespace was touched: {host_rules}"
    );

    // The "guest": an echo server in the test's own namespace, standing in for the agent's
    // connection to the guest's loopback. Port 81 is refused, as the agent refuses a port
    // nothing listens on.
    let guest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guest_port = guest.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in guest.incoming() {
            let mut s = s.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(b"echo: ").unwrap();
            s.write_all(&got).unwrap();
        }
    });
    let asked = Arc::new(Mutex::new(Vec::new()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let record = asked.clone();
    rt.spawn(forward.serve(move |port| {
        record.lock().unwrap().push(port);
        async move {
            if port == 81 {
                return Err("connecting to port 81 on the guest's loopback: refused".to_string());
            }
            tokio::net::TcpStream::connect(("127.0.0.1", guest_port))
                .await
                .map_err(|e| e.to_string())
        }
    }));

    assert_eq!(exchange(&ns, 8080, b"ping").unwrap(), b"echo: ping");
    assert_eq!(exchange(&ns, 22, b"pong").unwrap(), b"echo: pong");
    let refused = exchange(&ns, 81, b"x").unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionReset, "{refused}");
    assert_eq!(*asked.lock().unwrap(), [8080, 22, 81]);

    // A rule of someone else's in the same table stays; husk's goes, once or twice.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "127.0.0.1",
            "-p",
            "udp",
            "-j",
            "ACCEPT",
        ],
    );
    teardown(&ns.path(), "husk-tap1").unwrap();
    teardown(&ns.path(), "husk-tap1").unwrap();
    let rules = nat_rules(&ns);
    assert!(!rules.contains(FORWARD_CHAIN), "{rules}");
    assert!(
        rules.contains("-A OUTPUT -d 127.0.0.1/32 -p udp -j ACCEPT"),
        "{rules}"
    );
    drop(rt);
}
