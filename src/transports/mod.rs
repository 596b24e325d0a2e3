//! Transports: the objects that own a connected fd and move bytes between it and a
//! protocol without going through Python glue. What the kinds share lives here.

pub mod datagram;
pub mod stream;

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// asyncio's `constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES`.
pub(crate) const CONNLOST_LOG_THRESHOLD: u32 = 5;
pub(crate) const DEFAULT_HIGH_WATER: usize = 64 * 1024;

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `asyncio.log.logger`, which transports log to as asyncio's do.
pub(crate) fn asyncio_logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    LOGGER
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio.log")?.getattr("logger")?.unbind())
        })
        .map(|l| l.bind(py))
}

/// Exceptions that leave the loop instead of ending one connection, as in asyncio.
pub(crate) fn is_fatal_to_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PySystemExit>(py) || err.is_instance_of::<PyKeyboardInterrupt>(py)
}

/// Runs `f` with `context` entered, as the reader handle of asyncio would.
pub(crate) fn in_context<R>(
    py: Python<'_>,
    context: Option<&Py<PyAny>>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    let Some(context) = context else {
        return f();
    };
    // SAFETY: `context` is a live contextvars.Context made by copy_context; with the GIL
    // held PyContext_Enter either enters it or sets an error and returns -1.
    if unsafe { ffi::PyContext_Enter(context.as_ptr()) } < 0 {
        return Err(PyErr::fetch(py));
    }
    let outcome = f();
    // SAFETY: exits the context entered above, on the same thread, with the GIL held.
    if unsafe { ffi::PyContext_Exit(context.as_ptr()) } < 0 {
        return Err(PyErr::fetch(py));
    }
    outcome
}

/// `set_write_buffer_limits(high, low)` as asyncio computes and checks them.
pub(crate) fn write_limits(
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
) -> PyResult<(usize, usize)> {
    let high = high.filter(|h| !h.is_none());
    let low = low.filter(|l| !l.is_none());
    let high_v: i64 = match high {
        Some(h) => h.extract()?,
        None => match low {
            Some(l) => 4 * l.extract::<i64>()?,
            None => DEFAULT_HIGH_WATER as i64,
        },
    };
    let low_v: i64 = match low {
        Some(l) => l.extract()?,
        None => high_v / 4,
    };
    if !(high_v >= low_v && low_v >= 0) {
        return Err(PyValueError::new_err(format!(
            "high ({high_v}) must be >= low ({low_v}) must be >= 0"
        )));
    }
    Ok((high_v as usize, low_v as usize))
}
