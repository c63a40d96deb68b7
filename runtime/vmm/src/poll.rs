//! The epoll boilerplate the VMM's event loops share: a set created with its first
//! interests, and one more file descriptor watched.

use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// An epoll set watching each `(fd, events, token)` of `interests`.
pub(crate) fn epoll_with(
    interests: impl IntoIterator<Item = (RawFd, EventSet, u64)>,
) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, events, token) in interests {
        watch(&epoll, fd, events, token)?;
    }
    Ok(epoll)
}

/// Adds `fd` to `epoll` for `events`, reported with `token`.
pub(crate) fn watch(epoll: &Epoll, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

/// Makes reads and writes on `fd` return `EAGAIN` instead of blocking.
pub(crate) fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL only read and set the flags of `fd`, which the caller owns;
    // no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn watched_fds_report_their_tokens() {
        let (a, b) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        use std::os::fd::AsRawFd;
        let epoll = epoll_with([(a.as_raw_fd(), EventSet::IN, 7)]).unwrap();
        watch(&epoll, b.as_raw_fd(), EventSet::IN, 9).unwrap();
        b.write(1).unwrap();
        let mut evs = [EpollEvent::default(); 4];
        assert_eq!(epoll.wait(0, &mut evs).unwrap(), 1);
        assert_eq!(evs[0].data(), 9);
        a.write(1).unwrap();
        assert_eq!(epoll.wait(0, &mut evs).unwrap(), 2);
    }
}
