//! The read path of a `BufferedProtocol`: `get_buffer`, one `recv` into the buffer it
//! returns (as `socket.recv_into` would), `buffer_updated(nbytes)`.

use std::os::fd::RawFd;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;

use super::{call_method_one, Outcome, Reader, Sink, BUFFER_UPDATED_FAILED};
use crate::sys;

const GET_BUFFER_FAILED: &str = "Fatal error: protocol.get_buffer() call failed.";

/// `get_buffer(-1)`, `recv_into`, `buffer_updated(nbytes)`.
pub(crate) struct BufferedSink;

impl Sink for BufferedSink {
    type Got<'py> = usize;
    const DELIVERY_FAILED: &'static str = BUFFER_UPDATED_FAILED;

    fn receive(reader: &mut Reader<'_, '_>) -> Outcome<usize> {
        match reader.in_context(get_buffer) {
            Ok(buf) => match recv_into(reader.fd, &buf) {
                Outcome::Read(n) => {
                    reader.received = n;
                    Outcome::Read(n)
                }
                other => other,
            },
            Err(err) => Outcome::CallbackFailed(err, GET_BUFFER_FAILED),
        }
    }

    fn deliver(protocol: &Bound<'_, PyAny>, nbytes: usize) -> PyResult<()> {
        let py = protocol.py();
        let nbytes = nbytes.into_pyobject(py)?;
        let name = pyo3::intern!(py, "buffer_updated");
        call_method_one(protocol, name, nbytes.as_any()).map(drop)
    }
}

/// `protocol.get_buffer(-1)`, which must not be empty.
fn get_buffer<'py>(protocol: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = protocol.py();
    let hint = (-1i32).into_pyobject(py)?;
    let name = pyo3::intern!(py, "get_buffer");
    let buf = call_method_one(protocol, name, hint.as_any())?;
    if buf.len()? == 0 {
        return Err(PyRuntimeError::new_err(
            "get_buffer() returned an empty buffer",
        ));
    }
    Ok(buf)
}

/// One `recv` into a writable buffer object, as `socket.recv_into` would. A buffer
/// that cannot be written to fails the read.
fn recv_into(fd: RawFd, buf: &Bound<'_, PyAny>) -> Outcome<usize> {
    let py = buf.py();
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: `buf` is a live object and `view` is storage for one Py_buffer; on success
    // the buffer is released below, on failure nothing was acquired.
    if unsafe { ffi::PyObject_GetBuffer(buf.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_WRITABLE) } < 0
    {
        return Outcome::Failed(PyErr::fetch(py));
    }
    // SAFETY: PyObject_GetBuffer succeeded, so `view` is initialised.
    let mut view = unsafe { view.assume_init() };
    let len = usize::try_from(view.len).unwrap_or(0);
    // SAFETY: `view.buf` points to `len` writable bytes (PyBUF_WRITABLE, contiguous by
    // default for PyBUF_SIMPLE-based requests) held alive until PyBuffer_Release.
    let received = unsafe { sys::recv_raw(fd, view.buf.cast(), len) };
    // SAFETY: releases the buffer acquired above exactly once.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    Outcome::of_recv(received)
}
