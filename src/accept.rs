//! Accepting connections on a listening socket: a batch per readiness event, each
//! connection an fd with its peer address, with no Python socket object and no
//! `BlockingIOError` at the end of a batch.

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::os_error;
use crate::sockaddr::socket_address;
use crate::sys;

/// Accepts up to `max` connections waiting on the listening socket `fd`: `(accepted,
/// error)`, `accepted` a list of `(fd, peername)` (each fd non-blocking, close-on-exec,
/// with `TCP_NODELAY` if `nodelay`, and the caller's to own), `peername` as
/// `socket.accept()` gives it; a connection whose `TCP_NODELAY` could not be set is
/// closed and comes as `(-1, the OSError)`, for the caller to report as asyncio reports
/// a transport it could not make. The batch ends quietly when no connection is left
/// (`EAGAIN`) or one was aborted before it was accepted (`ECONNABORTED`); any other
/// failure ends it with `error` the `OSError` (or other exception) to raise once the
/// connections already accepted are handed over, so that none is lost.
#[pyfunction]
pub fn accept_connections<'py>(
    py: Python<'py>,
    fd: RawFd,
    max: usize,
    nodelay: bool,
) -> (Bound<'py, PyList>, Option<PyErr>) {
    let accepted = PyList::empty(py);
    while accepted.len() < max {
        // SAFETY: zero is a valid sockaddr_storage.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (conn, len) = match sys::accept(fd, &mut addr) {
            Ok(conn) => conn,
            Err(err) => match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN | libc::ECONNABORTED) => break,
                _ => return (accepted, Some(os_error(err))),
            },
        };
        // asyncio's transport fails to be made when TCP_NODELAY cannot be set, and the
        // connection goes with it: closed here (dropped), the error left to report.
        if nodelay {
            if let Err(err) = sys::set_tcp_nodelay(conn.as_raw_fd()) {
                drop(conn);
                if let Err(err) = accepted.append((-1, os_error(err))) {
                    return (accepted, Some(err));
                }
                continue;
            }
        }
        let entry = socket_address(py, &addr, len).and_then(|peer| {
            let peer = peer.unwrap_or_else(|| py.None().into_bound(py));
            accepted.append((conn.as_raw_fd(), peer))
        });
        if let Err(err) = entry {
            return (accepted, Some(err));
        }
        // The list holds the fd now: the caller owns it.
        let _ = conn.into_raw_fd();
    }
    (accepted, None)
}
