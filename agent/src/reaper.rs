//! The agent reaps every child: it is the guest's PID 1 (or a subreaper as a host process), so
//! container processes, reparented orphans and the engine's short-lived helpers all end up here.
//!
//! A process's exit can be reaped before anyone asked for it (a container's init may die while
//! the engine is still returning its pid). Such exits wait in `unclaimed` for a while so that
//! a later `watch` still sees them; they expire after `UNCLAIMED_TTL` so the map cannot grow
//! without bound and a reused pid is not mistaken for an old one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::sync::watch;

/// How long an exit nobody asked for is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + N for a process killed by signal N.
    pub status: i32,
    /// When it was reaped.
    pub at: SystemTime,
}

/// The exit of one process, once known.
pub type ExitWatch = watch::Receiver<Option<Exit>>;

#[derive(Debug, Default)]
struct Inner {
    watchers: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

/// Collects the exit status of every child of the agent.
#[derive(Debug, Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl Reaper {
    /// Starts reaping on every SIGCHLD (and once a second, should a signal be coalesced away).
    /// Must be called before the agent spawns any child.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    /// The exit of `pid`, now or later.
    pub fn watch(&self, pid: Pid) -> ExitWatch {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((exit, _)) = inner.unclaimed.remove(&pid.as_raw()) {
            return watch::channel(Some(exit)).1;
        }
        inner
            .watchers
            .entry(pid.as_raw())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Reaps every child that has exited.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.record(pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
            }
        }
    }

    fn record(&self, pid: Pid, status: i32) {
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        tracing::debug!(pid = pid.as_raw(), status, "reaped");
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.watchers.remove(&pid.as_raw()) {
            Some(tx) => {
                tx.send_replace(Some(exit));
            }
            None => {
                let now = Instant::now();
                inner
                    .unclaimed
                    .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                inner.unclaimed.insert(pid.as_raw(), (exit, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_before_watch_is_kept() {
        let r = Reaper::default();
        r.record(Pid::from_raw(4242), 3);
        let w = r.watch(Pid::from_raw(4242));
        assert_eq!(w.borrow().map(|e| e.status), Some(3));
    }

    #[test]
    fn watch_before_exit_is_told() {
        let r = Reaper::default();
        let w = r.watch(Pid::from_raw(77));
        assert!(w.borrow().is_none());
        r.record(Pid::from_raw(77), 137);
        assert_eq!(w.borrow().map(|e| e.status), Some(137));
        // A second process with the same pid later is a new watch.
        let w2 = r.watch(Pid::from_raw(77));
        assert!(w2.borrow().is_none());
    }

    #[tokio::test]
    async fn reaps_real_children_with_signal_status() {
        let r = Reaper::default();
        // The reaper under test does the waiting.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let mut w = r.watch(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.borrow().is_none() && Instant::now() < deadline {
            r.reap_all();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(w.borrow_and_update().map(|e| e.status), Some(128 + 9));
    }
}
