//! Turning OS and argument errors into the Python exceptions asyncio raises.

use std::io;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// `OSError(errno, strerror)`; Python picks the subclass from the errno
/// (`ConnectionResetError`, `BrokenPipeError`, `PermissionError`, ...).
pub fn os_error(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(code) => PyOSError::new_err((code, strerror(code))),
        None => PyOSError::new_err(err.to_string()),
    }
}

pub fn strerror(code: i32) -> String {
    io::Error::from_raw_os_error(code)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn closed_loop() -> PyErr {
    PyRuntimeError::new_err("Event loop is closed")
}

pub fn invalid_fd(fd: i64) -> PyErr {
    PyValueError::new_err(format!("Invalid file descriptor: {fd}"))
}

/// The call would block (or was interrupted): try again on the next readiness.
pub fn would_block(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}
