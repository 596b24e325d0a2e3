//! The few pieces of the standard library the Rust core calls on its cold paths
//! (debug mode, error reports, reprs), imported once.

use std::ffi::c_int;

use pyo3::exceptions::PyMemoryError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

static EXTRACT_STACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FORMAT_CALLBACK_SOURCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FUTURE_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TASK_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SSL_SOCKET: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();

/// `TypeError` for an `ssl.SSLSocket`, as asyncio's `sock_*` calls raise it.
pub fn reject_ssl_socket(sock: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = sock.py();
    // Python may be built without ssl: then no socket can be an SSLSocket.
    let ssl_socket = SSL_SOCKET.get_or_init(py, || {
        py.import("ssl")
            .and_then(|m| m.getattr("SSLSocket"))
            .ok()
            .map(Bound::unbind)
    });
    if let Some(cls) = ssl_socket {
        if sock.is_instance(cls.bind(py))? {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "Socket cannot be of type SSLSocket",
            ));
        }
    }
    Ok(())
}
static TASK_KWNAMES: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();

static TASK_TAKES_CONTEXT: PyOnceLock<bool> = PyOnceLock::new();

/// Whether `asyncio.Task` and `create_task` take `context=` (Python 3.11+); the version
/// is parsed once.
pub fn task_takes_context(py: Python<'_>) -> bool {
    *TASK_TAKES_CONTEXT.get_or_init(py, || py.version_info() >= (3, 11))
}

/// `asyncio.Task(coro, loop=loop_, name=name, context=context)` by vectorcall; before
/// Python 3.11, whose `Task` has no `context`, the context must be None and is not passed.
pub fn new_task(
    loop_: &Bound<'_, PyAny>,
    coro: &Bound<'_, PyAny>,
    name: &Bound<'_, PyAny>,
    context: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let py = loop_.py();
    let task = TASK_TYPE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio.tasks")?.getattr("Task")?.unbind())
    })?;
    let with_context = task_takes_context(py);
    let kwnames = TASK_KWNAMES.get_or_try_init(py, || {
        let names: &[&str] = if with_context {
            &["loop", "name", "context"]
        } else {
            &["loop", "name"]
        };
        let names = names.iter().map(|n| PyString::new(py, n));
        Ok::<_, PyErr>(PyTuple::new(py, names)?.unbind())
    })?;
    let args = [
        coro.as_ptr(),
        loop_.as_ptr(),
        name.as_ptr(),
        context.as_ptr(),
    ];
    // SAFETY: `args` holds borrowed references alive for the call: one positional
    // argument, then the values of the names in `kwnames` (two or three, so within
    // `args`). The call returns a new reference or NULL with an error set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_Vectorcall(task.as_ptr(), args.as_ptr(), 1, kwnames.as_ptr()),
        )
    }
    .map(Bound::unbind)
}

/// `asyncio.Future(**kwargs)` (the C implementation when CPython has it); `kwargs`
/// is the loop's cached `{"loop": loop}`, so no dict is built per call.
pub fn new_future(py: Python<'_>, kwargs: &Bound<'_, PyDict>) -> PyResult<Py<PyAny>> {
    let future = FUTURE_TYPE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio.futures")?.getattr("Future")?.unbind())
    })?;
    Ok(future.bind(py).call((), Some(kwargs))?.unbind())
}

fn format_helpers_attr<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    name: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio.format_helpers")?.getattr(name)?.unbind())
    })
    .map(|f| f.bind(py))
}

/// `asyncio.format_helpers.extract_stack()` from the Python frame that called into Rust.
pub fn extract_stack(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(format_helpers_attr(py, &EXTRACT_STACK, "extract_stack")?
        .call0()?
        .unbind())
}

/// `func(arg, ...) at file:line`, as asyncio writes a callback in messages and reprs.
pub fn format_callback_source(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    args: Option<&Bound<'_, PyTuple>>,
) -> PyResult<String> {
    let args = match args {
        Some(args) => args.clone(),
        None => PyTuple::empty(py),
    };
    format_helpers_attr(py, &FORMAT_CALLBACK_SOURCE, "_format_callback_source")?
        .call1((callback, args))?
        .extract()
}

/// `file:line` of the last frame of a source traceback, if it has one.
pub fn last_frame_location(traceback: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if !traceback.is_truthy()? {
        return Ok(None);
    }
    let frame = traceback.get_item(-1)?;
    Ok(Some(format!(
        "{}:{}",
        frame.get_item(0)?,
        frame.get_item(1)?
    )))
}

/// A `bytes` copy of `data`: `MemoryError` when it cannot be allocated, where
/// `PyBytes::new` would panic.
pub fn bytes_copy<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    // A slice never exceeds isize::MAX bytes.
    let len = data.len() as ffi::Py_ssize_t;
    // SAFETY: attached; `data` is readable for `len` bytes. The call returns a new
    // reference to a bytes object, or NULL with an error set.
    let obj = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyBytes_FromStringAndSize(data.as_ptr().cast(), len),
        )
    }?;
    // SAFETY: PyBytes_FromStringAndSize returns a bytes object.
    Ok(unsafe { obj.cast_into_unchecked() })
}

unsafe extern "C" {
    /// CPython's own resize of a `bytes` object nothing else references yet (what
    /// `socket.recv` uses); not exposed by pyo3-ffi.
    pub(crate) fn _PyBytes_Resize(
        bytes: *mut *mut ffi::PyObject,
        newsize: ffi::Py_ssize_t,
    ) -> c_int;
}

/// A new `bytes` written in place by `fill`, which gets the start of `capacity`
/// uninitialised bytes and returns how many it wrote (at most `capacity`); the object
/// is cut to that length. Saves the zeroing `PyBytes::new_with` does.
pub fn bytes_written_by<'py>(
    py: Python<'py>,
    capacity: usize,
    fill: impl FnOnce(*mut u8, usize) -> PyResult<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    let size = ffi::Py_ssize_t::try_from(capacity).map_err(|_| PyMemoryError::new_err(()))?;
    // SAFETY: attached; with a NULL source this makes a new, uninitialised bytes of
    // `size` bytes (a new reference) or returns NULL with an error set.
    let mut obj = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
    if obj.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a bytes object of `capacity` bytes that only we reference.
    let start = unsafe { ffi::PyBytes_AsString(obj) }.cast::<u8>();
    let written = match fill(start, capacity) {
        Ok(written) => written.min(capacity),
        Err(err) => {
            // SAFETY: releasing the reference made above.
            unsafe { ffi::Py_DECREF(obj) };
            return Err(err);
        }
    };
    // SAFETY: the object is referenced only by us, as _PyBytes_Resize requires; on
    // failure it frees it, sets `obj` to NULL and leaves an error set.
    if written != capacity && unsafe { _PyBytes_Resize(&mut obj, written as ffi::Py_ssize_t) } < 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a new reference to a bytes object.
    Ok(unsafe { Bound::from_owned_ptr(py, obj).cast_into_unchecked() })
}
