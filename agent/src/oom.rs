//! OOM kills: a watcher polls the containers' memory.events and queues one event per new
//! `oom_kill` (GetOomEvent hands them out); WaitProcess asks a container's
//! [`MemoryEvents`] whether it saw one since it was created.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Weak,
    time::Duration,
};

use tokio::sync::{mpsc, Mutex};

/// How often the watcher reads memory.events.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What the watcher watches: the containers that have a memory.events file.
pub trait Watched: Send + Sync + 'static {
    /// (container id, path of its memory.events) for every container to watch now.
    fn memory_events(&self) -> Vec<(String, PathBuf)>;
}

/// A container's memory.events and its `oom_kill` count when it was created.
#[derive(Debug, Clone)]
pub struct MemoryEvents {
    path: PathBuf,
    kills_at_create: u64,
}

impl MemoryEvents {
    pub fn new(path: PathBuf, kills_at_create: u64) -> Self {
        MemoryEvents {
            path,
            kills_at_create,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the container had an OOM kill since it was created.
    pub fn oom_killed(&self) -> bool {
        read_oom_kills(&self.path) > self.kills_at_create
    }
}

/// The queue of OOM events: the ids of containers that had an OOM kill, one per kill.
#[derive(Debug)]
pub struct OomEvents {
    rx: Mutex<mpsc::Receiver<String>>,
}

/// Where the watcher queues the events of an [`OomEvents`].
#[derive(Debug)]
pub struct OomSender(mpsc::Sender<String>);

/// A new, empty queue and its sending side, for [`watch`].
pub fn channel() -> (OomSender, OomEvents) {
    let (tx, rx) = mpsc::channel(1024);
    (OomSender(tx), OomEvents { rx: Mutex::new(rx) })
}

impl OomEvents {
    /// The next OOM kill of any container; None once the watcher stopped.
    pub async fn next(&self) -> Option<String> {
        self.rx.lock().await.recv().await
    }
}

/// Polls the memory.events of `watched`'s containers and queues an event per new OOM kill,
/// until `watched` is dropped.
pub async fn watch<W: Watched>(watched: Weak<W>, tx: OomSender) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        let Some(w) = watched.upgrade() else { return };
        let list = w.memory_events();
        seen.retain(|id, _| list.iter().any(|(c, _)| c == id));
        for (id, path) in list {
            let n = read_oom_kills(&path);
            let before = seen.insert(id.clone(), n).unwrap_or(0);
            if n > before {
                tracing::info!(container = %id, "OOM kill");
                let _ = tx.0.try_send(id);
            }
        }
    }
}

/// The `oom_kill` counter of a memory.events file (0 if unreadable).
fn read_oom_kills(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        std::fs::write(
            &p,
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(read_oom_kills(&p), 2);
        assert_eq!(read_oom_kills(&dir.path().join("missing")), 0);
    }
}
