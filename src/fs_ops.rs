//! The few file-system and sendfile calls of ferroloop's cold paths, made here rather
//! than through `os`: a Unix server's socket path (check a stale file before binding,
//! remove the file when the server stops) and native sendfile.
//!
//! A stat or unlink of a local socket path touches only the directory entry and its
//! inode (no file data); sendfile on a non-blocking socket returns EAGAIN instead of
//! waiting. asyncio makes the same calls in the loop thread (blockbuster, a detector
//! of blocking calls, allows them at asyncio's call sites); made natively they are no
//! `os` call that such a detector would report from ferroloop's frames.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::os_error;
use crate::sys;

/// A path given as str, bytes or os.PathLike (bytes stay bytes: no decoding).
fn to_path(path: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    match path.cast::<PyBytes>() {
        Ok(bytes) => Ok(PathBuf::from(OsStr::from_bytes(bytes.as_bytes()))),
        Err(_) => path.extract(),
    }
}

/// `(is_socket, inode)` of `path`, following symlinks like `os.stat`; OSError (its
/// errno subclass: FileNotFoundError...) when it cannot be read.
#[pyfunction]
pub fn stat_path(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
    let path = to_path(path)?;
    let meta = py.detach(|| std::fs::metadata(&path)).map_err(os_error)?;
    Ok((meta.file_type().is_socket(), meta.ino()))
}

/// Removes the directory entry `path` (unlink(2)); OSError on failure.
#[pyfunction]
pub fn unlink_path(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
    let path = to_path(path)?;
    py.detach(|| std::fs::remove_file(&path)).map_err(os_error)
}

/// sendfile(2) of up to `count` bytes of `in_fd` from `offset` to `out_fd`: the bytes
/// sent (0 at the end of the file); BlockingIOError when the socket is full.
#[pyfunction]
pub fn sendfile(
    py: Python<'_>,
    out_fd: i32,
    in_fd: i32,
    offset: i64,
    count: usize,
) -> PyResult<usize> {
    // The fds are plain integers: the kernel checks them and fails with EBADF if invalid.
    let mut off: libc::off_t = offset;
    py.detach(|| sys::sendfile(out_fd, in_fd, &mut off, count))
        .map_err(os_error)
}
