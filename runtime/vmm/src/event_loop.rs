//! The I/O thread: one epoll set over the devices' backend fds (a vsock device's host
//! sockets) and the control socket; each ready fd is served on this thread.

use std::os::{
    fd::{AsRawFd, RawFd},
    unix::net::UnixListener,
};

use vmm_sys_util::epoll::{EpollEvent, EventSet};

use crate::{
    api_server::{self, ApiContext},
    device_manager::lock,
    poll::epoll_with,
    seccomp::{self, Filters, SpawnError, ThreadKind},
};

/// Errors starting the I/O thread.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Creating the epoll set or watching an fd in it.
    #[error("the device event loop")]
    Epoll(#[source] std::io::Error),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// The epoll token of the control socket (other tokens are device indexes).
const API_TOKEN: u64 = u64::MAX;

/// Starts the I/O thread: `backends` are the fds to poll with the index of their device
/// in `ctx.transports`; `api` the control socket, if there is one.
pub(crate) fn spawn(
    backends: &[(RawFd, usize)],
    api: Option<UnixListener>,
    ctx: ApiContext,
    filters: &Filters,
) -> Result<(), EventLoopError> {
    let interests = backends
        .iter()
        .map(|&(fd, i)| (fd, EventSet::IN, i as u64))
        .chain(api.iter().map(|l| (l.as_raw_fd(), EventSet::IN, API_TOKEN)));
    let epoll = epoll_with(interests).map_err(EventLoopError::Epoll)?;
    seccomp::spawn("io", ThreadKind::Io, filters, move || {
        let mut evs = [EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut evs) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &evs[..n] {
                if ev.data() == API_TOKEN {
                    if let Some(l) = &api {
                        api_server::serve(l, &ctx);
                    }
                } else if let Some((_, t)) = ctx.transports.get(ev.data() as usize) {
                    lock(t).device_mut().process_backend();
                }
            }
        }
    })?;
    Ok(())
}
