//! What the shim tells containerd besides its answers: task events on containerd's event
//! service, and the exit records that State, Wait and Delete read.

use std::sync::Arc;

use containerd_shim::{
    api::DeleteResponse,
    asynchronous::publisher::RemotePublisher,
    protos::{
        events::task::{TaskDelete, TaskExit},
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        topics::{TASK_DELETE_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC},
    },
    Context,
};
use tokio::sync::watch;

/// How a process (or the VM, for the sandbox task) ended.
#[derive(Clone, Debug)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

impl Exit {
    /// An exit now with `status`.
    pub fn now(status: u32) -> Exit {
        Exit { status, at: now() }
    }
}

/// Where an exit is recorded once it happened.
pub type ExitTx = watch::Sender<Option<Exit>>;
/// Where State and Wait read it.
pub type ExitRx = watch::Receiver<Option<Exit>>;

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp(d.as_nanos() as i64)
}

pub fn timestamp(ns: i64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = ns.div_euclid(1_000_000_000);
    t.nanos = ns.rem_euclid(1_000_000_000) as i32;
    t
}

/// containerd's event service, for the shim's namespace. Cheap to clone into tasks.
#[derive(Clone)]
pub struct Events {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Events {
            publisher: Arc::new(publisher),
            namespace,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// Records how process `exec_id` of task `container_id` ended (empty: its init, or the
    /// sandbox task itself) for State and Wait, then tells containerd.
    pub async fn exited(
        &self,
        tx: &ExitTx,
        container_id: &str,
        exec_id: &str,
        pid: u32,
        exit: Exit,
    ) {
        let mut e = TaskExit::new();
        e.container_id = container_id.to_string();
        e.id = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        }
        .to_string();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(exit.at.clone()).into();
        let _ = tx.send(Some(exit));
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
    }

    /// Tells containerd task `id` is gone; the answer to its Delete.
    pub async fn deleted(&self, id: &str, pid: u32, exit: Exit) -> DeleteResponse {
        let mut e = TaskDelete::new();
        e.container_id = id.to_string();
        e.id = id.to_string();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(exit.at.clone()).into();
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(e)).await;
        delete_response(pid, exit)
    }
}

pub fn delete_response(pid: u32, exit: Exit) -> DeleteResponse {
    let mut r = DeleteResponse::new();
    r.pid = pid;
    r.exit_status = exit.status;
    r.exited_at = Some(exit.at).into();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_from_nanoseconds() {
        let t = timestamp(1_700_000_000_123_456_789);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_789));
    }
}
