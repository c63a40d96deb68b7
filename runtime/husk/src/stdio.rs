//! A process's output between the agent's stdio streams and the host: the copies `husk run`
//! (to its own stdout and stderr) and the shim (to containerd's FIFOs) both use.
//!
//! The agent holds a process's output until a stream is attached, so attaching may come after
//! the process started; a copy ends when the agent closes its stream, after the process's last
//! byte.

use husk_client::{AgentClient, ClientError, StdioStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    task::JoinHandle,
};

/// Where one output stream of a process goes.
pub type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// Called with each chunk of output as it passes (e.g. to time the first byte).
pub type Observer = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Opens the output streams of process `exec_id` of container `id` (empty: its init) and
/// copies each into its sink in a task of its own, so that a slow reader never blocks the
/// caller; the copies' handles, which end once every byte was written.
pub async fn attach_outputs(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    sinks: Vec<(StdioStream, Sink)>,
    observer: Option<Observer>,
) -> Result<Vec<JoinHandle<()>>, ClientError> {
    let mut copies = Vec::with_capacity(sinks.len());
    for (which, sink) in sinks {
        let stream = agent.open_stream(id, exec_id, which).await?;
        copies.push(tokio::spawn(copy_output(stream, sink, observer.clone())));
    }
    Ok(copies)
}

/// Copies one output stream into `to` until it ends, flushing each chunk (a terminal or a
/// log reader sees output as it comes).
pub async fn copy_output(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    observer: Option<Observer>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if let Some(o) = &observer {
                    o(&buf[..n]);
                }
                if let Err(e) = async {
                    to.write_all(&buf[..n]).await?;
                    to.flush().await
                }
                .await
                {
                    tracing::warn!("copying a process's output: {e}");
                    break;
                }
            }
            Err(e) => {
                tracing::debug!("reading a process's output stream: {e}");
                break;
            }
        }
    }
    let _ = to.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{atomic::AtomicUsize, atomic::Ordering, Arc};

    #[tokio::test]
    async fn copies_everything_in_order_and_observes_each_chunk() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut w, r) = tokio::io::duplex(4096);
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&d2).await.unwrap();
        });
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        let obs: Observer = Arc::new(move |c: &[u8]| {
            s2.fetch_add(c.len(), Ordering::Relaxed);
        });
        let mut out = Vec::new();
        copy_output(r, &mut out, Some(obs)).await;
        writer.await.unwrap();
        assert_eq!(out, data);
        assert_eq!(seen.load(Ordering::Relaxed), data.len());
    }
}
