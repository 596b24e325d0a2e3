//! Transports: the objects that own a connected fd and move bytes between it and a
//! protocol without going through Python glue. What the kinds share lives here.

pub mod datagram;
pub mod stream;

use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PySystemExit, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::event_loop::LoopCore;
use crate::poller::Token;

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

/// `loop.call_exception_handler({...})` with the keys asyncio's transports give.
pub(crate) fn report(
    loop_: &Py<LoopCore>,
    message: &str,
    exc: &Bound<'_, PyAny>,
    transport: &Bound<'_, PyAny>,
    protocol: Option<&Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let context = PyDict::new(py);
    context.set_item("message", message)?;
    context.set_item("exception", exc)?;
    context.set_item("transport", transport)?;
    context.set_item("protocol", protocol)?;
    loop_
        .bind(py)
        .call_method1("call_exception_handler", (context,))?;
    Ok(())
}

/// The report half of asyncio's `_fatal_error`: OS errors are only logged, at debug
/// level in debug mode; anything else goes to the exception handler.
pub(crate) fn report_fatal(
    loop_: Option<&Py<LoopCore>>,
    err: &PyErr,
    message: &str,
    transport: &Bound<'_, PyAny>,
    protocol: Option<&Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let Some(loop_) = loop_ else {
        return Ok(());
    };
    if !err.is_instance_of::<PyOSError>(py) {
        return report(loop_, message, err.value(py), transport, protocol);
    }
    if loop_.get().debug() {
        let kwargs = PyDict::new(py);
        kwargs.set_item("exc_info", true)?;
        asyncio_logger(py)?.call_method("debug", ("%r: %s", transport, message), Some(&kwargs))?;
    }
    Ok(())
}

/// A protocol method (`pause_writing`, ...) failed: the exception handler hears of it,
/// unless it must leave the loop.
pub(crate) fn protocol_failed(
    loop_: Option<&Py<LoopCore>>,
    err: PyErr,
    message: &str,
    transport: &Bound<'_, PyAny>,
    protocol: &Py<PyAny>,
) -> PyResult<()> {
    if is_fatal_to_loop(transport.py(), &err) {
        return Err(err);
    }
    match loop_ {
        Some(loop_) => report(
            loop_,
            message,
            err.value(transport.py()),
            transport,
            Some(protocol),
        ),
        None => Ok(()),
    }
}

/// `loop.call_soon(transport._call_connection_lost, exc)`.
pub(crate) fn schedule_connection_lost(
    loop_: &Py<LoopCore>,
    transport: &Bound<'_, PyAny>,
    exc: Option<Py<PyAny>>,
) -> PyResult<()> {
    let py = transport.py();
    let callback = transport.getattr(pyo3::intern!(py, "_call_connection_lost"))?;
    loop_
        .bind(py)
        .call_method1("call_soon", (callback, exc.unwrap_or_else(|| py.None())))?;
    Ok(())
}

/// The end of `_call_connection_lost`: the fd leaves the loop first (its number may be
/// reused as soon as it is closed), then the socket is closed, once.
pub(crate) fn release_socket(
    py: Python<'_>,
    loop_: Option<&Py<LoopCore>>,
    token: Option<Token>,
    sock: Option<Py<PyAny>>,
) -> PyResult<()> {
    if let (Some(loop_), Some(token)) = (loop_, token) {
        loop_.get().deregister_transport(py, token)?;
    }
    if let Some(sock) = sock {
        sock.bind(py).call_method0("close")?;
    }
    Ok(())
}

/// `get_extra_info(name, default)` over the transport's extra dict.
pub(crate) fn extra_info(
    py: Python<'_>,
    extra: &Py<PyDict>,
    name: &Bound<'_, PyAny>,
    default: Option<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    match extra.bind(py).get_item(name)? {
        Some(value) => Ok(value.unbind()),
        None => Ok(default.unwrap_or_else(|| py.None())),
    }
}
