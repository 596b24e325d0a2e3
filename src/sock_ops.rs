//! `sock_recv`, `sock_recv_into` and `sock_sendall` completed in Rust.
//!
//! Each call first tries the operation at once. Only when the socket would block does
//! it create a future and leave a `SockOp` in the fd's reader or writer slot, where
//! asyncio would have left a handle calling back into Python. When the fd is ready the
//! loop runs the op in ready-queue order, with no Python frame: it performs the I/O and
//! resolves the future, or waits again if the readiness was spurious.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{os_error, would_block};
use crate::poller::{Interest, READABLE, WRITABLE};
use crate::pyhelpers::_PyBytes_Resize;
use crate::sys;

/// Reads of up to this size land in a reused buffer before the copy into `bytes`...
const STACKED_READ: usize = 256 * 1024;

/// ...unless both the size asked for and what the thread's last read returned are at
/// least this much: such a read goes straight into a `bytes` of the size asked for,
/// cut to what arrived. (Allocating the full size for a read that returns little
/// costs more than the copy it saves.)
const DIRECT_READ: usize = 16 * 1024;

thread_local! {
    static RECV_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; STACKED_READ]);
    static LAST_READ: Cell<usize> = const { Cell::new(0) };
}

pub(crate) enum SockKind {
    Recv(usize),
    RecvInto(PyUntypedBuffer),
    /// `sendall`: the data and how much of it is sent.
    Send(PyUntypedBuffer, usize),
}

/// A socket operation waiting for its fd.
pub(crate) struct SockOp {
    pub fd: RawFd,
    pub fut: Py<PyAny>,
    /// Keeps the socket object (and so the fd) alive while the op waits.
    pub sock: Py<PyAny>,
    pub kind: SockKind,
}

/// What trying an operation came to.
pub(crate) enum Attempt {
    Done(Py<PyAny>),
    WouldBlock,
}

/// `recv(fd, n)` into a new `bytes`; `WouldBlock` when there is nothing to read yet.
/// `n == 0` reads nothing and returns `b""` at once, as `socket.recv(0)` does.
pub(crate) fn try_recv(py: Python<'_>, fd: RawFd, n: usize) -> PyResult<Attempt> {
    if n == 0 {
        return Ok(Attempt::Done(PyBytes::new(py, b"").into_any().unbind()));
    }
    // A read larger than the reused buffer goes straight into a `bytes` of its size:
    // that allocation is the one a copy would need anyway, and a size the buffer
    // cannot be allocated for is `MemoryError` (never an abort).
    if n > STACKED_READ || (n >= DIRECT_READ && LAST_READ.get() >= DIRECT_READ) {
        return try_recv_direct(py, fd, n);
    }
    let received = RECV_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let buf = &mut buf[..n];
        let got = sys::recv(fd, buf)?;
        LAST_READ.set(got);
        Ok(PyBytes::new(py, &buf[..got]))
    });
    match received {
        Ok(bytes) => Ok(Attempt::Done(bytes.into_any().unbind())),
        Err(err) if would_block(&err) => Ok(Attempt::WouldBlock),
        Err(err) => Err(os_error(err)),
    }
}

/// `try_recv` straight into a `bytes` of `n` bytes, cut to what arrived.
fn try_recv_direct(py: Python<'_>, fd: RawFd, n: usize) -> PyResult<Attempt> {
    let size = ffi::Py_ssize_t::try_from(n).map_err(|_| PyMemoryError::new_err(()))?;
    // SAFETY: attached; with a NULL source this makes a new, uninitialised bytes of
    // `size` bytes (a new reference) or returns NULL with an error set.
    let mut obj = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
    if obj.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a bytes object of `n` bytes that only we reference; recv writes
    // at most `n` bytes into its buffer.
    let got = match unsafe { sys::recv_raw(fd, ffi::PyBytes_AsString(obj).cast(), n) } {
        Ok(got) => got,
        Err(err) => {
            // SAFETY: releasing the reference made above.
            unsafe { ffi::Py_DECREF(obj) };
            return if would_block(&err) {
                Ok(Attempt::WouldBlock)
            } else {
                Err(os_error(err))
            };
        }
    };
    LAST_READ.set(got);
    // SAFETY: the object is referenced only by us, as _PyBytes_Resize requires; on
    // failure it frees it, sets `obj` to NULL and leaves an error set.
    if got != n && unsafe { _PyBytes_Resize(&mut obj, got as ffi::Py_ssize_t) } < 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a new reference to the filled bytes object.
    Ok(Attempt::Done(
        unsafe { Bound::from_owned_ptr(py, obj) }.unbind(),
    ))
}

pub(crate) fn writable_buffer(obj: &Bound<'_, PyAny>) -> PyResult<PyUntypedBuffer> {
    let buf = PyUntypedBuffer::get(obj)?;
    if buf.readonly() || !buf.is_c_contiguous() {
        return Err(PyTypeError::new_err(
            "recv_into() argument must be a writable contiguous buffer",
        ));
    }
    Ok(buf)
}

pub(crate) fn readable_buffer(obj: &Bound<'_, PyAny>) -> PyResult<PyUntypedBuffer> {
    let buf = PyUntypedBuffer::get(obj)?;
    if !buf.is_c_contiguous() {
        return Err(simple_buffer_error(obj));
    }
    Ok(buf)
}

/// What `socket.send` raises for a non-contiguous buffer: the exporter's own error when
/// asked for a simple (contiguous) buffer, e.g. `BufferError` from a strided memoryview.
fn simple_buffer_error(obj: &Bound<'_, PyAny>) -> PyErr {
    let py = obj.py();
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: attached; `obj` is a live object and `view` has room for a Py_buffer,
    // which PyObject_GetBuffer fills on success (0) and leaves unset on failure.
    if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) } < 0 {
        return PyErr::fetch(py);
    }
    // SAFETY: the call above succeeded, so `view` holds a buffer we must release once.
    unsafe { ffi::PyBuffer_Release(view.as_mut_ptr()) };
    PyTypeError::new_err("a contiguous bytes-like object is required")
}

/// `recv_into(fd, buf)`; the count of bytes read. An empty buffer reads nothing and
/// returns 0 at once, as `socket.recv_into` does.
pub(crate) fn try_recv_into(py: Python<'_>, fd: RawFd, buf: &PyUntypedBuffer) -> PyResult<Attempt> {
    if buf.len_bytes() == 0 {
        return Ok(Attempt::Done(0usize.into_pyobject(py)?.into_any().unbind()));
    }
    // SAFETY: the buffer is writable and C-contiguous (checked by `writable_buffer`) and
    // stays exported while `buf` lives; recv writes at most `len_bytes()` bytes.
    match unsafe { sys::recv_raw(fd, buf.buf_ptr().cast(), buf.len_bytes()) } {
        Ok(got) => Ok(Attempt::Done(got.into_pyobject(py)?.into_any().unbind())),
        Err(err) if would_block(&err) => Ok(Attempt::WouldBlock),
        Err(err) => Err(os_error(err)),
    }
}

/// Sends from `*sent` on until everything is sent (`true`) or the socket is full.
pub(crate) fn try_send_all(fd: RawFd, buf: &PyUntypedBuffer, sent: &mut usize) -> PyResult<bool> {
    let total = buf.len_bytes();
    while *sent < total {
        // SAFETY: the buffer is C-contiguous and exported while `buf` lives, so its
        // `total` bytes are readable; the slice from offset `*sent` lies inside it and
        // is only read for the duration of the send.
        let rest = unsafe {
            std::slice::from_raw_parts(buf.buf_ptr().cast::<u8>().add(*sent), total - *sent)
        };
        match sys::send(fd, rest) {
            Ok(n) => *sent += n,
            Err(err) if would_block(&err) => return Ok(false),
            Err(err) => return Err(os_error(err)),
        }
    }
    Ok(true)
}

pub(crate) fn check_recv_size(n: isize) -> PyResult<usize> {
    usize::try_from(n).map_err(|_| PyValueError::new_err("negative buffersize in recv"))
}

impl SockOp {
    /// The direction the op waits on.
    pub fn direction(&self) -> Interest {
        match self.kind {
            SockKind::Send(..) => WRITABLE,
            _ => READABLE,
        }
    }

    /// Runs the op on readiness: resolves its future and returns `None`, or returns
    /// itself to wait again. A cancelled future's op is dropped without touching the
    /// socket, so no data is consumed for a caller that is gone.
    pub fn run(mut self: Box<Self>, py: Python<'_>) -> PyResult<Option<Box<SockOp>>> {
        let fut = self.fut.bind(py);
        if fut.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
            return Ok(None);
        }
        let outcome = match &mut self.kind {
            SockKind::Recv(n) => try_recv(py, self.fd, *n),
            SockKind::RecvInto(buf) => try_recv_into(py, self.fd, buf),
            SockKind::Send(buf, sent) => match try_send_all(self.fd, buf, sent) {
                Ok(true) => Ok(Attempt::Done(py.None())),
                Ok(false) => Ok(Attempt::WouldBlock),
                Err(err) => Err(err),
            },
        };
        match outcome {
            Ok(Attempt::Done(value)) => {
                fut.call_method1(pyo3::intern!(py, "set_result"), (value,))?;
                Ok(None)
            }
            Ok(Attempt::WouldBlock) => Ok(Some(self)),
            Err(err) => {
                fut.call_method1(pyo3::intern!(py, "set_exception"), (err.value(py),))?;
                Ok(None)
            }
        }
    }

    pub fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.fut)?;
        visit.call(&self.sock)
    }
}
