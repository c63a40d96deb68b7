//! Port forwarding into the VM (CRI's PortForward, `kubectl port-forward`).
//!
//! containerd forwards a port of a pod by connecting, inside the pod's network namespace on
//! the host, to `localhost:PORT`. For a runc pod that reaches the container. A husk pod's
//! servers run in the guest, so nothing in the host side of the namespace listens: husk puts a
//! listener there, one per pod on `127.0.0.1:<ephemeral>`, and a NAT rule in the namespace's
//! own `nat` table that sends it every TCP connection to a loopback address:
//!
//! ```text
//! *nat
//! :HUSK-PORT-FORWARD - [0:0]
//! -A HUSK-PORT-FORWARD -p tcp -j DNAT --to-destination 127.0.0.1:LISTENER
//! -A OUTPUT -d 127.0.0.0/8 -p tcp -j HUSK-PORT-FORWARD
//! COMMIT
//! ```
//!
//! For each connection the listener reads the port asked for (`SO_ORIGINAL_DST`), asks the
//! agent for a connection to that port on the guest's loopback (`FORWARD PORT`, see
//! `agent.proto`), and copies bytes both ways. Decisions:
//! - **Only loopback destinations, only in the pod's namespace.** Nothing of the pod runs in
//!   the host side of the namespace, so its loopback has no other user; the host's own
//!   namespace is never touched.
//! - **DNAT, not REDIRECT**: the same for a locally made connection, and DNAT is the target
//!   CNI's portmap uses, so a kernel that runs CNI has it (the testbed's has no REDIRECT).
//! - **One `iptables-restore --noflush` process**: the rule goes in whole or not at all. iptables
//!   is what containerd's CNI plugins (portmap, bridge) use as well; setup fails with the
//!   reason where it is missing, and the shim runs the pod without port forwarding.
//! - **A port nothing listens on in the guest** is accepted by the listener, then reset once the
//!   agent says so, where a runc pod refuses the connection itself: the listener cannot know
//!   before it asks. containerd reports both as a failed forward.
//! - The rule lives in the namespace and goes with it; teardown removes it earlier, with the
//!   tap's filters.

use std::fmt::Display;
use std::future::Future;
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::error::NetnsError;
use super::netns;

/// The `nat` chain that holds husk's redirect in a pod's namespace.
pub const CHAIN: &str = "HUSK-PORT-FORWARD";

/// Why port forwarding could not be set up, or its rule not removed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Binding the listener.
    #[error("listening on 127.0.0.1 in {netns}")]
    Listen {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    /// iptables could not be run (not installed?).
    #[error("running {cmd} in {netns}")]
    Spawn {
        cmd: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    /// iptables ran and refused.
    #[error("{cmd} in {netns} failed ({status}): {stderr}")]
    Rule {
        cmd: String,
        netns: PathBuf,
        status: String,
        stderr: String,
    },
}

/// A pod's port-forwarding listener, in the pod's network namespace, with the NAT rule that
/// sends it the namespace's loopback TCP connections. [`PortForward::serve`] serves it.
#[derive(Debug)]
pub struct PortForward {
    listener: TcpListener,
}

impl PortForward {
    /// Binds the listener in the namespace at `netns` and adds the rule (see the module doc).
    /// Blocks. On failure nothing is left.
    pub fn setup(netns: &Path) -> Result<PortForward, ForwardError> {
        let file = netns::open(netns)?;
        netns::run_in(&file, netns, || async {
            // Bound on this thread: the socket belongs to the namespace.
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr().map(|a| (l, a.port())))
                .map_err(|source| ForwardError::Listen {
                    netns: netns.to_path_buf(),
                    source,
                });
            let (listener, port) = listener?;
            // iptables runs as a child of this thread, in its namespace. A rule of an earlier
            // setup goes first, so there is never a second jump to the chain.
            remove_rule(netns)?;
            restore(netns, &rules(port))?;
            tracing::info!(netns = %netns.display(), port, "port forwarding listens");
            Ok(PortForward { listener })
        })?
    }

    /// The listener's port in the pod's namespace.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves forwarded connections until the returned future is dropped: for each, `open`
    /// gets the port asked for and gives a connection to that port in the guest (the agent's
    /// `FORWARD`), and bytes are copied both ways. A connection `open` refuses is reset, and
    /// the reason logged. Call from a tokio runtime.
    pub async fn serve<F, Fut, C, E>(self, open: F) -> io::Result<()>
    where
        F: Fn(u16) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<C, E>> + Send,
        C: AsyncRead + AsyncWrite + Unpin + Send,
        E: Display + Send,
    {
        self.listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let open = Arc::new(open);
        loop {
            let conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // EMFILE and the like: wait for some to close rather than spin.
                    tracing::warn!("port forwarding: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let open = open.clone();
            tokio::spawn(async move {
                let mut conn = conn;
                let port = match original_port(&conn) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("port forwarding: a connection without its port: {e}");
                        return;
                    }
                };
                match open(port).await {
                    Ok(mut guest) => {
                        match tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
                            Ok((up, down)) => {
                                tracing::debug!(port, up, down, "forwarded connection closed")
                            }
                            Err(e) => tracing::debug!(port, "forwarded connection: {e}"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!("port forwarding to port {port} in the guest: {e}");
                        // A reset, not an orderly close: the client sees a failed connection.
                        // (A zero linger never blocks on drop, the reason it is deprecated.)
                        #[allow(deprecated)]
                        let _ = conn.set_linger(Some(Duration::ZERO));
                    }
                }
            });
        }
    }
}

/// The port a redirected connection was made to (`SO_ORIGINAL_DST`).
fn original_port(conn: &impl AsRawFd) -> io::Result<u16> {
    // SAFETY: all zeroes is a valid sockaddr_in.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` outlive the call, and `len` is `addr`'s size, the most the
    // kernel writes.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::from_be(addr.sin_port))
}

/// The `iptables-restore` input that adds the redirect to `port`.
fn rules(port: u16) -> String {
    format!(
        "*nat\n:{CHAIN} - [0:0]\n-A {CHAIN} -p tcp -j DNAT --to-destination 127.0.0.1:{port}\n\
         -A OUTPUT -d 127.0.0.0/8 -p tcp -j {CHAIN}\nCOMMIT\n"
    )
}

/// The `iptables-restore` input that removes what [`rules`] added.
fn removal() -> String {
    format!("*nat\n-D OUTPUT -d 127.0.0.0/8 -p tcp -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
}

/// Removes the rule from the namespace the calling thread is in (`netns` names it in errors).
/// Nothing there, or no iptables at all (then setup cannot have added it), is fine.
pub(crate) fn remove_rule(netns: &Path) -> Result<(), ForwardError> {
    let listed = match run(
        netns,
        "iptables",
        &["-w", "5", "-t", "nat", "-S", "OUTPUT"],
        None,
    ) {
        Ok(out) => out,
        Err(ForwardError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if !listed.contains(&format!("-j {CHAIN}")) {
        return Ok(());
    }
    restore(netns, &removal())
}

fn restore(netns: &Path, input: &str) -> Result<(), ForwardError> {
    run(
        netns,
        "iptables-restore",
        &["-w", "5", "--noflush"],
        Some(input),
    )
    .map(drop)
}

/// Runs `cmd args` with `input` on its stdin; returns its stdout.
fn run(
    netns: &Path,
    cmd: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, ForwardError> {
    let line = format!("{cmd} {}", args.join(" "));
    let spawn_err = |source| ForwardError::Spawn {
        cmd: line.clone(),
        netns: netns.to_path_buf(),
        source,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("piped");
    let written = stdin.write_all(input.unwrap_or_default().as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ForwardError::Rule {
            cmd: line,
            netns: netns.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    written.map_err(spawn_err)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
