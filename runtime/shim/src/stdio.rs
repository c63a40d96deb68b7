//! A process's stdio between containerd's FIFOs and the agent's stdio streams.
//!
//! Every copy runs in its own task, so a slow or absent reader never blocks the ttrpc loop.
//! The output copies end when the agent closes its stream (after the process's last byte), and
//! the shim waits for them before it reports the exit: no output is lost.

use husk::stdio::{attach_outputs, Sink};
use husk_client::{AgentClient, StdioStream};
use tokio::{io::AsyncWriteExt, net::unix::pipe, sync::oneshot, task::JoinHandle};

/// containerd's FIFO paths for one process (empty: not wanted).
#[derive(Clone, Debug, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The running copies of one process.
#[derive(Default)]
pub struct Copies {
    outputs: Vec<JoinHandle<()>>,
    /// Closes the process's stdin (containerd's CloseIO) when sent to.
    pub close_stdin: Option<oneshot::Sender<()>>,
}

impl Copies {
    /// Waits until every output byte reached containerd's FIFOs.
    pub async fn drained(&mut self) {
        for h in self.outputs.drain(..) {
            let _ = h.await;
        }
    }
}

/// Attaches the FIFOs of process `exec_id` of container `id` to its agent streams. The agent
/// holds the output until a stream is attached, so this may run after the process started.
pub async fn attach(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    fifos: &Fifos,
) -> Result<Copies, String> {
    let mut copies = Copies::default();
    let mut sinks: Vec<(StdioStream, Sink)> = Vec::new();
    let outs = [
        (StdioStream::Stdout, &fifos.stdout),
        (StdioStream::Stderr, &fifos.stderr),
    ];
    for (which, path) in outs {
        if path.is_empty() || (fifos.terminal && which == StdioStream::Stderr) {
            continue;
        }
        // Opened read-write: the open does not wait for containerd's reader, and containerd
        // still sees EOF when we close (we are the only writer).
        let fifo = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(|e| format!("opening {path}: {e}"))?;
        sinks.push((which, Box::new(fifo)));
    }
    copies.outputs = attach_outputs(agent, id, exec_id, sinks, None)
        .await
        .map_err(|e| format!("attaching the output: {e}"))?;
    if !fifos.stdin.is_empty() {
        // Read-write too: the FIFO never reports EOF on its own (containerd may open its end
        // later, or reopen it); stdin ends with CloseIO.
        let mut fifo = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifos.stdin)
            .map_err(|e| format!("opening {}: {e}", fifos.stdin))?;
        let mut stream = agent
            .open_stream(id, exec_id, StdioStream::Stdin)
            .await
            .map_err(|e| format!("attaching stdin: {e}"))?;
        let (tx, rx) = oneshot::channel();
        copies.close_stdin = Some(tx);
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            tokio::select! {
                r = tokio::io::copy(&mut fifo, &mut stream) => {
                    if let Err(e) = r {
                        log::debug!(container = id.as_str(), exec = exec_id.as_str(); "stdin copy ended: {e}");
                    }
                }
                _ = rx => {
                    // Whatever containerd wrote before CloseIO is in the FIFO: pass it on.
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = fifo.try_read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
    Ok(copies)
}
