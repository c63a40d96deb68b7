//! A client of the husk agent API: typed ttrpc calls and stdio streams.
//!
//! ```no_run
//! # async fn demo() -> Result<(), husk_client::ClientError> {
//! use std::time::Duration;
//! let addr = "unix:/run/husk-agent.sock".parse()?;
//! let agent = husk_client::AgentClient::connect(&addr, Duration::from_secs(5)).await?;
//! agent.check().await?;
//! # Ok(()) }
//! ```

mod addr;

use std::{sync::Arc, time::Duration};

pub use addr::{AgentAddr, Conn, Service};
pub use husk_proto::{agent as pb, ConnHeader, StdioStream, StreamHeader};
use husk_proto::{agent_ttrpc, health, health_ttrpc};
use tokio::io::{AsyncWriteExt, BufReader};
use ttrpc::Code;

/// What can go wrong talking to an agent. The variants mirror the agent's ttrpc codes, so a
/// caller can tell "no such container" from "the agent is gone".
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// not a valid agent address (want unix:PATH, hvsock:PATH or vsock:CID): {0}
    #[error("not a valid agent address (want unix:PATH, hvsock:PATH or vsock:CID): {0:?}")]
    BadAddress(String),
    /// The agent cannot be reached.
    #[error("cannot reach the agent at {addr}")]
    Unavailable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out {0}")]
    Timeout(String),
    /// The agent answered neither a bounded RPC nor the health check its deadline brought:
    /// the guest stopped answering (its vCPUs stopped, its kernel hung), which a caller
    /// treats as a lost guest.
    #[error("the agent did not answer {0}")]
    Unresponsive(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("not implemented: {0}")]
    Unimplemented(String),
    #[error("agent error ({code:?}): {message}")]
    Agent { code: Code, message: String },
    /// The connection broke (the agent or the VM died).
    #[error("connection to the agent lost: {0}")]
    Transport(String),
    #[error("stream refused by the agent: {0}")]
    StreamRefused(String),
    #[error("stream i/o (stdio or forwarded connection)")]
    StreamIo(#[source] std::io::Error),
    /// The agent speaks another version of the API.
    #[error("the agent at {addr} speaks agent API v{agent}, this client v{ours}: use a guest image built from the same husk")]
    ApiMismatch { addr: String, agent: u32, ours: u32 },
}

impl From<ttrpc::Error> for ClientError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => {
                let message = s.message().to_string();
                match s.code() {
                    Code::NOT_FOUND => ClientError::NotFound(message),
                    Code::ALREADY_EXISTS => ClientError::AlreadyExists(message),
                    Code::INVALID_ARGUMENT => ClientError::InvalidArgument(message),
                    Code::FAILED_PRECONDITION => ClientError::FailedPrecondition(message),
                    Code::UNIMPLEMENTED => ClientError::Unimplemented(message),
                    Code::DEADLINE_EXCEEDED => ClientError::Timeout(message),
                    code => ClientError::Agent { code, message },
                }
            }
            other => ClientError::Transport(other.to_string()),
        }
    }
}

impl ClientError {
    /// The ttrpc code this error stands for (to pass it on across another RPC boundary).
    pub fn code(&self) -> Code {
        match self {
            ClientError::BadAddress(_) | ClientError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ClientError::NotFound(_) => Code::NOT_FOUND,
            ClientError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ClientError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ClientError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ClientError::Timeout(_) => Code::DEADLINE_EXCEEDED,
            ClientError::Agent { code, .. } => *code,
            ClientError::Unavailable { .. }
            | ClientError::Transport(_)
            | ClientError::Unresponsive(_) => Code::UNAVAILABLE,
            ClientError::StreamRefused(_) | ClientError::StreamIo(_) => Code::INTERNAL,
            ClientError::ApiMismatch { .. } => Code::FAILED_PRECONDITION,
        }
    }
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    addr: AgentAddr,
    agent: agent_ttrpc::AgentClient,
    health: health_ttrpc::HealthClient,
    timeout: Duration,
    /// How long a bounded RPC waits before a health check, and the check for its answer
    /// ([`RPC_DEADLINE`] unless changed).
    deadline: Duration,
    /// Called when the agent answers neither an RPC nor its health check in time.
    unresponsive: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("addr", &self.addr)
            .finish()
    }
}

/// How long a bounded RPC (all but `wait_process` and `get_oom_event`) runs before the client
/// asks whether the guest is still alive, and how long the guest then has to answer that
/// health check. A guest that answers is only slow (a loaded host: a `CreateContainer` of
/// 8 pods booting at once under the nested testbed takes tens of seconds) and the call goes
/// on waiting; one that does not (its vCPUs stopped, its kernel hung) fails the call with
/// [`ClientError::Unresponsive`] after twice this. The agent itself never gets a deadline:
/// ttrpc's server would drop a handler halfway through at it.
pub const RPC_DEADLINE: Duration = Duration::from_secs(30);

/// Generates one typed method per unary RPC of the agent service: `bounded` ones are watched
/// for a guest that stopped answering ([`RPC_DEADLINE`]), `blocking` ones wait as long as it
/// takes.
macro_rules! rpcs {
    ($($(#[$doc:meta])* $kind:ident $name:ident($req:ty) -> $resp:ty;)*) => {$(
        $(#[$doc])*
        pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
            rpcs!(@call self, $kind, $name, req)
        }
    )*};
    (@call $self:ident, bounded, $name:ident, $req:ident) => {
        $self
            .watched(
                stringify!($name),
                $self.agent.$name(ttrpc::context::Context::default(), &$req),
            )
            .await
    };
    (@call $self:ident, blocking, $name:ident, $req:ident) => {
        Ok($self.agent.$name(ttrpc::context::Context::default(), &$req).await?)
    };
}

impl AgentClient {
    /// Connects to the agent's ttrpc API, waiting at most `timeout` for the connection. Calls
    /// made later have [`RPC_DEADLINE`] unless they block by design.
    pub async fn connect(addr: &AgentAddr, timeout: Duration) -> Result<Self, ClientError> {
        let conn = addr.connect(Service::Api, timeout).await?;
        let client =
            ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(conn));
        Ok(AgentClient {
            addr: addr.clone(),
            agent: agent_ttrpc::AgentClient::new(client.clone()),
            health: health_ttrpc::HealthClient::new(client),
            timeout,
            deadline: RPC_DEADLINE,
            unresponsive: None,
        })
    }

    /// Connects, retrying until the agent answers a health check or `timeout` passes (for a VM
    /// that is still booting); then refuses an agent of another API version.
    pub async fn connect_when_ready(
        addr: &AgentAddr,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match Self::connect(addr, left.max(Duration::from_millis(50))).await {
                Ok(c) => match tokio::time::timeout(left, async {
                    c.check().await?;
                    c.version().await
                })
                .await
                {
                    Ok(Ok(v)) if v.api_version != husk_proto::API_VERSION => {
                        return Err(ClientError::ApiMismatch {
                            addr: addr.to_string(),
                            agent: v.api_version,
                            ours: husk_proto::API_VERSION,
                        });
                    }
                    Ok(Ok(_)) => return Ok(c),
                    // Not serving yet, or the connection broke: try again.
                    Ok(Err(e)) => last = e,
                    Err(_) => last = ClientError::Timeout(format!("health check of {addr}")),
                },
                Err(e) => last = e,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "waiting {:.1}s for the agent at {addr} to answer (last error: {last})",
                    timeout.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &AgentAddr {
        &self.addr
    }

    /// This client with `deadline` instead of [`RPC_DEADLINE`] for its bounded RPCs.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// This client with `f` called whenever the agent answers neither a bounded RPC nor the
    /// health check its deadline brings (the call itself fails with
    /// [`ClientError::Unresponsive`]): for a pod, a guest that stopped answering is lost.
    pub fn on_unresponsive(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.unresponsive = Some(Arc::new(f));
        self
    }

    /// Waits for `call` (the RPC `name`) while the guest is alive: each time it has run
    /// [`RPC_DEADLINE`] (or [`Self::with_deadline`]'s) without an answer, a health check on the
    /// same connection must answer within as long again; if none does, the unresponsive hook
    /// runs and the call fails. The call's own answer ends the wait at any point.
    async fn watched<T>(
        &self,
        name: &str,
        call: impl std::future::Future<Output = Result<T, ttrpc::Error>>,
    ) -> Result<T, ClientError> {
        tokio::pin!(call);
        let started = tokio::time::Instant::now();
        let mut probes = 0;
        loop {
            if let Ok(r) = tokio::time::timeout(self.deadline, &mut call).await {
                if probes > 0 {
                    tracing::info!(
                        "slow agent RPC: {name} answered after {:.1}s (the guest answered {probes} health checks meanwhile)",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(r?);
            }
            probes += 1;
            let check = health::CheckRequest::new();
            let probe = tokio::time::timeout(
                self.deadline,
                self.health
                    .check(ttrpc::context::Context::default(), &check),
            );
            tokio::select! {
                r = &mut call => return Ok(r?),
                alive = probe => match alive {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        if let Some(f) = &self.unresponsive {
                            f();
                        }
                        return Err(ClientError::Unresponsive(format!(
                            "{name}, nor a health check {:.1}s into it, within {:.1}s (is the guest stopped or hung?)",
                            self.deadline.as_secs_f64(),
                            2.0 * self.deadline.as_secs_f64(),
                        )));
                    }
                },
            }
        }
    }

    /// Asks whether the agent is serving.
    pub async fn check(&self) -> Result<health::CheckResponse, ClientError> {
        let ctx = ttrpc::context::with_duration(self.timeout);
        Ok(self.health.check(ctx, &health::CheckRequest::new()).await?)
    }

    /// The agent's version and API version.
    pub async fn version(&self) -> Result<health::VersionResponse, ClientError> {
        let ctx = ttrpc::context::with_duration(self.timeout);
        Ok(self
            .health
            .version(ctx, &health::VersionRequest::new())
            .await?)
    }

    rpcs! {
        bounded create_sandbox(pb::CreateSandboxRequest) -> pb::Empty;
        bounded destroy_sandbox(pb::DestroySandboxRequest) -> pb::Empty;
        bounded create_container(pb::CreateContainerRequest) -> pb::CreateContainerResponse;
        bounded start_container(pb::StartContainerRequest) -> pb::StartContainerResponse;
        bounded remove_container(pb::RemoveContainerRequest) -> pb::Empty;
        bounded update_container(pb::UpdateContainerRequest) -> pb::Empty;
        bounded pause_container(pb::PauseContainerRequest) -> pb::Empty;
        bounded resume_container(pb::ResumeContainerRequest) -> pb::Empty;
        bounded list_processes(pb::ListProcessesRequest) -> pb::ListProcessesResponse;
        bounded container_stats(pb::ContainerStatsRequest) -> pb::ContainerStatsResponse;
        bounded exec_process(pb::ExecProcessRequest) -> pb::ExecProcessResponse;
        bounded signal_process(pb::SignalProcessRequest) -> pb::Empty;
        /// Blocks until the process exited and its output was drained to its streams.
        blocking wait_process(pb::WaitProcessRequest) -> pb::WaitProcessResponse;
        bounded resize_terminal(pb::ResizeTerminalRequest) -> pb::Empty;
        bounded close_stdin(pb::CloseStdinRequest) -> pb::Empty;
        bounded remove_process(pb::RemoveProcessRequest) -> pb::Empty;
        /// Blocks until a container is OOM-killed.
        blocking get_oom_event(pb::GetOomEventRequest) -> pb::OomEvent;
        /// Configures the guest's interface, addresses and routes.
        bounded configure_network(pb::ConfigureNetworkRequest) -> pb::Empty;
        /// Marks the VM a template about to be snapshotted: its agent then waits for
        /// `restored` before it takes sandbox, container and network requests.
        bounded prepare_template(pb::Empty) -> pb::Empty;
        bounded restored(pb::RestoredRequest) -> pb::RestoredResponse;
    }

    /// Tells the clone of a VM template that it was restored: 64 bytes of the host's entropy
    /// reseed its RNG and the host's wall clock sets its clock. Returns how far the guest's
    /// clock was behind, in nanoseconds.
    pub async fn tell_restored(&self) -> Result<i64, ClientError> {
        use std::io::Read;
        let mut r = pb::RestoredRequest::new();
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|source| ClientError::Unavailable {
                addr: "/dev/urandom (the host's entropy for a restored guest)".into(),
                source,
            })?;
        r.entropy = entropy;
        r.unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        Ok(self.restored(r).await?.clock_offset_ns)
    }

    /// Opens one stdio stream of a process (see `agent.proto` for the protocol). For stdin,
    /// write to it and shut down its write half to close the process's stdin; for stdout and
    /// stderr, read it to EOF.
    pub async fn open_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: StdioStream,
    ) -> Result<Box<dyn Conn>, ClientError> {
        self.open_conn(ConnHeader::Stdio(StreamHeader {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stream,
        }))
        .await
    }

    /// Opens a connection to TCP `port` on the guest's loopback (see `agent.proto`): what is
    /// written to it reaches the server there, and the server's answer comes back on it.
    pub async fn open_forward(&self, port: u16) -> Result<Box<dyn Conn>, ClientError> {
        self.open_conn(ConnHeader::Forward(port)).await
    }

    async fn open_conn(&self, header: ConnHeader) -> Result<Box<dyn Conn>, ClientError> {
        let conn = self.addr.connect(Service::Stdio, self.timeout).await?;
        let mut conn = BufReader::new(conn);
        conn.get_mut()
            .write_all(header.to_line().as_bytes())
            .await
            .map_err(ClientError::StreamIo)?;
        let mut line = String::new();
        addr::read_line_bounded(&mut conn, &mut line, 4096)
            .await
            .map_err(ClientError::StreamIo)?;
        if line != "OK" {
            return Err(ClientError::StreamRefused(
                line.strip_prefix("ERR ").unwrap_or(&line).to_string(),
            ));
        }
        // The agent sends nothing after OK before the stream's own bytes, so the BufReader
        // holds no buffered data worth keeping beyond what it returns on reads.
        Ok(Box::new(conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::Read,
        os::unix::net::UnixListener,
        sync::atomic::{AtomicUsize, Ordering},
    };

    /// An agent socket whose peer accepts connections and then does `serve` with each (in a
    /// thread of its own).
    fn agent_socket(dir: &std::path::Path, serve: fn(std::os::unix::net::UnixStream)) -> AgentAddr {
        let path = dir.join("agent.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve(s));
            }
        });
        AgentAddr::Unix(path)
    }

    /// A client of `addr` with `deadline` for its bounded calls, and how many times its
    /// unresponsive hook ran.
    async fn counting_client(
        addr: &AgentAddr,
        deadline: Duration,
    ) -> (AgentClient, Arc<AtomicUsize>) {
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        let agent = AgentClient::connect(addr, Duration::from_secs(5))
            .await
            .unwrap()
            .with_deadline(deadline)
            .on_unresponsive(move || {
                t.fetch_add(1, Ordering::SeqCst);
            });
        (agent, told)
    }

    fn signal() -> pb::SignalProcessRequest {
        let mut r = pb::SignalProcessRequest::new();
        r.container_id = "c".into();
        r.signal = 9;
        r
    }

    /// A guest that stopped answering (its vCPUs stopped): the connection stays open, the
    /// request is read, no answer comes, to the health check either. The call fails at twice
    /// its deadline, naming the RPC and the likely cause, as a lost guest (UNAVAILABLE), and
    /// the hook is told, once.
    #[tokio::test]
    async fn a_silent_agent_fails_a_bounded_call_at_twice_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let addr = agent_socket(dir.path(), |mut s| {
            let mut sink = [0u8; 4096];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
        let (agent, told) = counting_client(&addr, Duration::from_millis(300)).await;
        let e = tokio::time::timeout(Duration::from_secs(10), agent.signal_process(signal()))
            .await
            .expect("the deadline ends the call")
            .unwrap_err();
        match &e {
            ClientError::Unresponsive(m) => assert!(
                m.contains("signal_process") && m.contains("is the guest stopped or hung?"),
                "{m}"
            ),
            e => panic!("not its deadline: {e:?}"),
        }
        assert_eq!(e.code(), Code::UNAVAILABLE);
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }

    /// An agent whose connection breaks (the VM died) is a lost connection, not a deadline
    /// passed, and does not call the hook.
    #[tokio::test]
    async fn a_broken_connection_is_a_transport_error_not_a_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let addr = agent_socket(dir.path(), |mut s| {
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
        });
        let (agent, told) = counting_client(&addr, RPC_DEADLINE).await;
        let e = tokio::time::timeout(Duration::from_secs(10), agent.signal_process(signal()))
            .await
            .expect("a broken connection ends the call")
            .unwrap_err();
        assert!(matches!(e, ClientError::Transport(_)), "{e:?}");
        assert_eq!(told.load(Ordering::SeqCst), 0);
    }

    /// A real ttrpc agent that answers health checks at once and `signal_process` after
    /// `slow`, as a live guest on a loaded host does.
    struct SlowAgent {
        slow: Duration,
    }

    #[async_trait::async_trait]
    impl health_ttrpc::Health for SlowAgent {
        async fn check(
            &self,
            _ctx: &ttrpc::asynchronous::TtrpcContext,
            _req: health::CheckRequest,
        ) -> ttrpc::Result<health::CheckResponse> {
            Ok(health::CheckResponse::new())
        }
    }

    #[async_trait::async_trait]
    impl agent_ttrpc::Agent for SlowAgent {
        async fn signal_process(
            &self,
            _ctx: &ttrpc::asynchronous::TtrpcContext,
            _req: pb::SignalProcessRequest,
        ) -> ttrpc::Result<pb::Empty> {
            tokio::time::sleep(self.slow).await;
            Ok(pb::Empty::new())
        }
    }

    /// A call that takes several deadlines on a guest that answers its health checks is
    /// waited for to the end: a slow guest is not a lost one, and the hook is not told.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_but_live_agent_is_waited_for_past_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let agent = Arc::new(SlowAgent {
            slow: Duration::from_millis(1500),
        });
        let mut services = agent_ttrpc::create_agent(agent.clone());
        services.extend(health_ttrpc::create_health(agent));
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(services);
        server.start().await.unwrap();
        let (client, told) =
            counting_client(&AgentAddr::Unix(path), Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        client
            .signal_process(signal())
            .await
            .expect("the slow call's own answer");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(told.load(Ordering::SeqCst), 0);
        server.shutdown().await.unwrap();
    }
}
