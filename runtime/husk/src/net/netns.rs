//! Doing work inside a network namespace without moving the caller: the work runs on a thread
//! of its own that enters the namespace and ends with the work, so the shim's other threads
//! (and the tokio workers) stay in the host's namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use super::error::NetnsError;

/// Opens a network namespace file (a `/var/run/netns/NAME` bind mount, `/proc/PID/ns/net`).
pub(crate) fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the future `work` to completion on a new thread in the namespace `netns`
/// (named `path` in errors), on a single-threaded tokio runtime of its own. Blocks the caller.
pub(crate) fn run_in<T, F>(
    netns: &File,
    path: &Path,
    work: impl FnOnce() -> F + Send,
) -> Result<T, NetnsError>
where
    F: Future<Output = T>,
    T: Send,
{
    let thread_err = |source| NetnsError::Thread {
        path: path.to_path_buf(),
        source,
    };
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("husk-netns".into())
            .spawn_scoped(scope, || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    let source = io::Error::from(errno);
                    let path = path.to_path_buf();
                    if errno == nix::errno::Errno::EINVAL {
                        NetnsError::NotNetns { path, source }
                    } else {
                        NetnsError::Enter { path, source }
                    }
                })?;
                // The netlink socket and /dev/net/tun are opened on this thread, so they belong
                // to the namespace just entered.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(thread_err)?;
                Ok(rt.block_on(work()))
            })
            .map_err(thread_err)?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Whether `netns` is the network namespace this process runs in (`/proc/self/ns/net`): a VM
/// cannot share the host's network, so the shim refuses such a pod.
pub fn is_host_netns(netns: &Path) -> io::Result<bool> {
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    let theirs = std::fs::metadata(netns)?;
    Ok(ours.dev() == theirs.dev() && ours.ino() == theirs.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_the_host_one() {
        assert!(is_host_netns(Path::new("/proc/self/ns/net")).unwrap());
        assert!(is_host_netns(Path::new("/proc/thread-self/ns/net")).unwrap());
        assert!(!is_host_netns(Path::new("/proc/self/ns/mnt")).unwrap());
        assert!(is_host_netns(Path::new("/nonexistent/netns")).is_err());
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let handle = open(file.path()).unwrap();
        let err = run_in(&handle, file.path(), || async {}).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err:?}");
        assert!(matches!(
            open(Path::new("/nonexistent/netns")),
            Err(NetnsError::Open { .. })
        ));
    }
}
