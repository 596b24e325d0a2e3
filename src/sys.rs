//! Thin wrappers over the socket and file system calls the loop makes, written once
//! with one error policy: a negative return becomes the `io::Error` of `errno`, and
//! nothing else is interpreted here (`EAGAIN`, `ENOTCONN` and the like are the
//! caller's to judge, see `errors::would_block`). Platform-specific flags live here
//! and nowhere else: a port to another Unix changes this file, not its callers.

use std::io::{self, IoSlice};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Flags for every send on a stream socket: a peer that has gone away is `EPIPE`,
/// never `SIGPIPE`. (macOS has no `MSG_NOSIGNAL`; a port sets `SO_NOSIGPIPE` on the
/// socket instead and sends with no flags.)
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;

/// The byte count of a call that returns `ssize_t`, or the error `errno` holds.
fn byte_count(n: libc::ssize_t) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `accept4` of a waiting connection, non-blocking and close-on-exec from the
/// start: the connection's fd and the length of the peer address written into `addr`.
pub fn accept(
    fd: RawFd,
    addr: &mut libc::sockaddr_storage,
) -> io::Result<(OwnedFd, libc::socklen_t)> {
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is a writable sockaddr_storage of the length passed.
    let conn = unsafe {
        libc::accept4(
            fd,
            (addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok((unsafe { OwnedFd::from_raw_fd(conn) }, len))
}

/// `getsockname`: the socket's own address written into `addr`, and its length.
pub fn getsockname(fd: RawFd, addr: &mut libc::sockaddr_storage) -> io::Result<libc::socklen_t> {
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is a writable sockaddr_storage of the length passed.
    let rc =
        unsafe { libc::getsockname(fd, (addr as *mut libc::sockaddr_storage).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

/// Sets `TCP_NODELAY` on a TCP socket.
pub fn set_tcp_nodelay(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a readable c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `recv` into `buf`: the number of bytes read (0 at end of stream).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    byte_count(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
}

/// One `recv` into memory the caller owns but cannot lend as a slice (a `bytes`
/// object being filled, an exported Python buffer).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
pub unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees `ptr` is writable for `len` bytes.
    byte_count(unsafe { libc::recv(fd, ptr.cast(), len, 0) })
}

/// One `recvfrom` into `buf`; the sender's address is written into `addr`.
pub fn recvfrom(fd: RawFd, buf: &mut [u8], addr: &mut libc::sockaddr_storage) -> io::Result<usize> {
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `buf` and `addr` are writable buffers of the lengths passed.
    byte_count(unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })
}

/// One `send` of `data` on a stream socket: the number of bytes the kernel took.
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length.
    byte_count(unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), SEND_FLAGS) })
}

/// One `sendmsg` of `slices` in order (a gathered write): the number of bytes the
/// kernel took, which may end inside any slice.
pub fn sendmsg(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: zero is a valid msghdr (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `struct iovec` on Unix (std guarantees it);
    // sendmsg only reads through the pointer, so casting away const is sound.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len() as _;
    // SAFETY: every iovec points into a slice borrowed for the duration of the call.
    byte_count(unsafe { libc::sendmsg(fd, &msg, SEND_FLAGS) })
}

/// `shutdown(SHUT_WR)`: the peer reads end of stream once what was sent arrives.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes an fd by value and touches no memory of ours.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `pread` of `fd` at `offset` into `buf` (the file position is left alone): the
/// number of bytes read (0 at end of file).
pub fn pread(fd: RawFd, buf: &mut [u8], offset: libc::off_t) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    byte_count(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) })
}

/// One `sendfile` of up to `count` bytes of `in_fd` from `*offset` into `out_fd`;
/// the kernel advances `*offset` by what it sent.
pub fn sendfile(
    out_fd: RawFd,
    in_fd: RawFd,
    offset: &mut libc::off_t,
    count: usize,
) -> io::Result<usize> {
    // SAFETY: `offset` is a valid, exclusive pointer for the duration of the call.
    byte_count(unsafe { libc::sendfile(out_fd, in_fd, offset, count) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn gathered_send_arrives_in_order_and_shutdown_ends_the_stream() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let sent = sendmsg(
            a.as_raw_fd(),
            &[IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cde")],
        );
        assert_eq!(sent.ok(), Some(5));
        assert!(shutdown_write(a.as_raw_fd()).is_ok());
        let mut buf = [0u8; 16];
        assert_eq!(recv(b.as_raw_fd(), &mut buf).ok(), Some(5));
        assert_eq!(&buf[..5], b"abcde");
        assert_eq!(recv(b.as_raw_fd(), &mut buf).ok(), Some(0));
    }

    #[test]
    fn accept_gives_a_nonblocking_cloexec_fd_then_would_block() {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let client = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect: {e}"));
        // SAFETY: zero is a valid sockaddr_storage.
        let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (conn, len) =
            accept(listener.as_raw_fd(), &mut peer).unwrap_or_else(|e| panic!("accept: {e}"));
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(i32::from(peer.ss_family), libc::AF_INET);
        // SAFETY: fcntl reads the flags of an open fd.
        let (status, fd_flags) = unsafe {
            (
                libc::fcntl(conn.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(conn.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert!(set_tcp_nodelay(conn.as_raw_fd()).is_ok());
        let again = accept(listener.as_raw_fd(), &mut peer).err();
        assert_eq!(again.and_then(|e| e.raw_os_error()), Some(libc::EAGAIN));
        drop(client);
    }

    #[test]
    fn errors_are_the_os_error() {
        let err = send(-1, b"x").err().map(|e| e.raw_os_error());
        assert_eq!(err, Some(Some(libc::EBADF)));
    }
}
