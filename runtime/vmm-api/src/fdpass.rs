//! Files passed over the control socket with `SCM_RIGHTS`: the client's side, which sends a
//! request line with one file attached, and the VMM's, which reads a request line and
//! whatever files came with it.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::net::UnixStream,
    },
};

/// The longest request line read.
pub const MAX_LINE: usize = 64 << 10;

/// Sends the first bytes of `data` with `file`'s descriptor attached (`SCM_RIGHTS`); how
/// many bytes went.
pub fn send_with_fd(s: &UnixStream, data: &[u8], file: &File) -> std::io::Result<usize> {
    let fd = file.as_raw_fd();
    // Room for one cmsghdr with one int, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; CMSG_SPACE is pure arithmetic.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: as above.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
    assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
    // SAFETY: `msg` points at `control`, big enough for the one header written through
    // CMSG_FIRSTHDR and CMSG_DATA; then sendmsg reads `msg`, `iov` and `data`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        loop {
            let n = libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Reads one request line (up to and without its newline; at most [`MAX_LINE`] bytes) and
/// the files passed with any of its bytes (received close-on-exec). Files that did not
/// arrive (more per message than the room for [`MAX_FILES`], or no free descriptor here)
/// make it an error; those that did are closed.
pub fn recv_line_with_files(s: &UnixStream) -> io::Result<(String, Vec<File>)> {
    let mut line = Vec::new();
    let mut files = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Room for MAX_FILES descriptors, aligned as cmsghdr wants.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: recvmsg writes at most iov_len bytes into `buf` and msg_controllen into
        // `control`, both alive across the call.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the control buffer holds what recvmsg wrote, walked with the CMSG macros
        // within msg_controllen; each SCM_RIGHTS descriptor is new and ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for k in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        files.push(File::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "files passed with the request were dropped (too many at once, or no free descriptor in the VMM)",
            ));
        }
        let n = n as usize;
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::other(format!(
                "a request line longer than {MAX_LINE} bytes"
            )));
        }
    }
    let line = String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a request line not in UTF-8"))?;
    Ok((line, files))
}

/// The files per message [`recv_line_with_files`] makes room for, at least.
pub const MAX_FILES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_file_passed_with_a_line_arrives_open() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"layer bytes").unwrap();
        let n = send_with_fd(&a, b"{\"add_layer\":{\"drive\":\"l\"}}\n", &f).unwrap();
        (&a).write_all(&b"{\"add_layer\":{\"drive\":\"l\"}}\n"[n..])
            .unwrap();
        let (line, files) = recv_line_with_files(&b).unwrap();
        assert_eq!(line, "{\"add_layer\":{\"drive\":\"l\"}}");
        assert_eq!(files.len(), 1);
        let mut got = String::new();
        let mut g = &files[0];
        g.rewind().unwrap();
        g.read_to_string(&mut got).unwrap();
        assert_eq!(got, "layer bytes");
        // Close-on-exec, as every fd of the VMM's.
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(files[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn a_line_without_files_and_lines_too_long() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"status\":{}}\nrest").unwrap();
        let (line, files) = recv_line_with_files(&b).unwrap();
        assert_eq!((line.as_str(), files.len()), ("{\"status\":{}}", 0));
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _ = (&a).write_all(&vec![b'x'; MAX_LINE + 8192]);
        });
        let e = recv_line_with_files(&b).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        drop(b);
        t.join().unwrap();
        // End of stream before a newline: what came is the line.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"stop\":{}}").unwrap();
        drop(a);
        assert_eq!(recv_line_with_files(&b).unwrap().0, "{\"stop\":{}}");
    }
}
