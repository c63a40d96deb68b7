//! Creating the tap the VMM's virtio-net device reads and writes.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: Ethernet frames, no packet
//! information prefix, each frame behind a virtio-net header. The header size
//! (`TUNSETVNETHDRSZ`) and the offloads (`TUNSETOFFLOAD`) are the VMM's to set once the guest
//! has negotiated its features; until then the kernel's defaults hold (a 10-byte header, no
//! offloads). The tap is not persistent: it disappears when the last descriptor to it closes.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Checks that `name` can be an interface name the kernel keeps as given.
pub(crate) fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is . or ..");
    }
    if name.contains('%') {
        return Err("the kernel would number a % pattern");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err("it holds a slash, colon, blank or NUL");
    }
    Ok(())
}

/// Creates the tap `name` in the calling thread's network namespace and returns its queue's
/// descriptor (close-on-exec; the VMM's spawner hands it over). Fails with EBUSY if an
/// interface of that name exists (`IFF_TUN_EXCL`), so an existing device is never taken over.
pub(crate) fn create(name: &str) -> io::Result<OwnedFd> {
    validate_name(name).map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is a plain C struct (a byte array and a union of integers and pointers
    // that are only read by the kernel for other requests): all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
    // The kernel reads ifr_flags as a short; IFF_TUN_EXCL is its top bit.
    req.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
    // SAFETY: the descriptor is an open /dev/net/tun; TUNSETIFF reads an ifreq, and `req` is
    // one that lives across the call (NUL-terminated name: validate_name kept it under
    // IFNAMSIZ bytes and the rest is zero).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_or_change_are_refused() {
        for ok in ["tap0", "husk-0123456789", "t"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "husk-01234567890",
            "tap%d",
            "a/b",
            "a b",
            "a:b",
            ".",
            "..",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
