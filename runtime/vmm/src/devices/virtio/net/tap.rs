//! The tap: attached to by name (`/dev/net/tun`, `TUNSETIFF`) or inherited as a file
//! descriptor, checked to be a tap with `IFF_NO_PI | IFF_VNET_HDR`, then set up the way the
//! device needs it: a 12-byte virtio-net header (`TUNSETVNETHDRSZ`), no offloads until the
//! guest acks them (`TUNSETOFFLOAD`), nonblocking.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
};

use super::{backend::NetBackend, frame::VNET_HDR_LEN};
use crate::poll::set_nonblocking;

/// Errors attaching to a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Opening the tun/tap control device.
    #[error("opening /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `--net tap=NAME` names no interface.
    #[error("there is no interface {0} (create the tap first: ip tuntap add {0} mode tap)")]
    NoSuchInterface(String),
    /// TUNSETIFF refused the name.
    #[error("attaching to the tap {0} (it must be a single-queue tap this user may open)")]
    Attach(String, #[source] io::Error),
    /// An inherited fd that is not a tun/tap at all.
    #[error("fd {0} is not a tap")]
    NotATap(RawFd, #[source] io::Error),
    /// An inherited tap opened with the wrong flags.
    #[error("fd {0} is a tun/tap opened without {1}: open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    Flags(RawFd, &'static str),
    /// Setting the header size, the offloads or nonblocking mode.
    #[error("setting up the tap ({0})")]
    Setup(&'static str, #[source] io::Error),
}

/// `struct ifreq` as the tun ioctls use it: a name and the flags.
#[repr(C)]
#[derive(Debug, Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap with a 12-byte virtio-net header, nonblocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` (it is never created here: a tap nobody set up
    /// would go nowhere).
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        let cname = CString::new(name).map_err(|_| TapError::NoSuchInterface(name.into()))?;
        // SAFETY: a NUL-terminated string that lives across the call.
        if name.len() >= libc::IFNAMSIZ || unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchInterface(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (repr(C),
        // IFNAMSIZ name, flags, padded to the kernel's 40 bytes); the fd is ours.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach(name.into(), io::Error::last_os_error()));
        }
        Tap::set_up(OwnedFd::from(file), name.into())
    }

    /// Takes over the inherited tap file descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor that nothing else in this process owns or will
    /// close: the returned tap closes it.
    pub unsafe fn from_inherited_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only reads the fd's flags; it fails on a closed fd, which is how
        // we tell one from an open one before owning it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotATap(fd, io::Error::last_os_error()));
        }
        // SAFETY: open (checked above), and owned by nobody else (the caller's promise).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sets FD_CLOEXEC on our own fd; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req` (sized as the kernel's); a
        // file that is not a tun/tap refuses it without touching `req`.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap(fd, io::Error::last_os_error()));
        }
        let flags = libc::c_int::from(req.flags);
        for (flag, name) in [
            (libc::IFF_TAP, "IFF_TAP"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
        ] {
            if flags & flag == 0 {
                return Err(TapError::Flags(fd, name));
            }
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Tap::set_up(owned, name)
    }

    fn set_up(fd: OwnedFd, name: String) -> Result<Tap, TapError> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which `hdr_len` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(TapError::Setup(
                "TUNSETVNETHDRSZ",
                io::Error::last_os_error(),
            ));
        }
        let mut tap = Tap { fd, name };
        // An inherited tap may come with offloads on: none until the guest acks them.
        tap.set_offload(0)
            .map_err(|e| TapError::Setup("TUNSETOFFLOAD", e))?;
        set_nonblocking(tap.fd.as_raw_fd()).map_err(|e| TapError::Setup("O_NONBLOCK", e))?;
        Ok(tap)
    }

    /// The tap's interface name (in the namespace it was created in).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
