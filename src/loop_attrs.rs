//! asyncio's private attributes of the loop, which asyncio's own code, its tests and
//! test suites read and assign (`_debug`, `_ready`, `_scheduled`, `_thread_id`, ...),
//! mapped onto the Rust core's state; and the instance attribute store, which notes a
//! patched `time`. `LoopCore`'s `#[pymethods]` block declares each as a getter or
//! setter of that name calling the function here (pyo3 takes one such block per
//! class).

use std::mem;
use std::sync::atomic::Ordering;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::event_loop::{LoopCore, Ready};
use crate::handles::{Handle, QueuedCall, TimerHandle};

/// `object.__setattr__(obj, name, value)`, or `object.__delattr__` with a null value.
fn generic_setattr(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: *mut ffi::PyObject,
) -> PyResult<()> {
    // SAFETY: attached to the interpreter; `obj` and `name` are live for the call, and
    // `value` is a live object or null (delete), as PyObject_GenericSetAttr takes it.
    let status = unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value) };
    if status < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

/// The queues asyncio's `__init__` assigns empty: the Rust ones are the real ones.
fn reject_non_empty(value: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    if value.len()? != 0 {
        return Err(PyValueError::new_err(format!(
            "{name} is owned by the Rust core; only an empty one may be assigned"
        )));
    }
    Ok(())
}

/// `__setattr__`: instance attributes are stored as by `object.__setattr__`; a `time`
/// set on the loop (`mock.patch.object(loop, "time", ...)`, as suites move the clock)
/// becomes the clock the turn and `call_later` read, as asyncio's `self.time()` is.
/// Native, so that attribute stores on the loop cost no Python frame.
pub(crate) fn setattr(
    slf: &Bound<'_, LoopCore>,
    name: &Bound<'_, PyString>,
    value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    generic_setattr(slf, name, value.as_ptr())?;
    if name.to_str()? == "time" {
        slf.get().custom_clock.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// `__delattr__`: deleting a patched `time` goes back to the class's clock, the native
/// one unless a subclass overrides it.
pub(crate) fn delattr(slf: &Bound<'_, LoopCore>, name: &Bound<'_, PyString>) -> PyResult<()> {
    generic_setattr(slf, name, std::ptr::null_mut())?;
    if name.to_str()? == "time" {
        let overridden = slf.call_method0(intern!(slf.py(), "_time_overridden"))?;
        slf.get()
            .custom_clock
            .store(overridden.is_truthy()?, Ordering::Relaxed);
    }
    Ok(())
}

/// `_task_factory`, kept in the state so `create_task` reads it without an attribute
/// lookup in the instance dict.
pub(crate) fn task_factory(core: &LoopCore, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
    Ok(core
        .state
        .borrow_mut(py)?
        .task_factory
        .as_ref()
        .map(|f| f.clone_ref(py)))
}

pub(crate) fn set_task_factory(
    core: &LoopCore,
    py: Python<'_>,
    factory: Option<Py<PyAny>>,
) -> PyResult<()> {
    let factory = factory.filter(|f| !f.is_none(py));
    let old = mem::replace(&mut core.state.borrow_mut(py)?.task_factory, factory);
    drop(old);
    Ok(())
}

/// `_signals_watched`: signal handlers are installed, so the waker must be polled.
pub(crate) fn set_signals_watched(core: &LoopCore, value: bool) {
    core.signals_watched.store(value, Ordering::Relaxed);
}

pub(crate) fn debug(core: &LoopCore) -> bool {
    core.debug.load(Ordering::Relaxed)
}

pub(crate) fn set_debug(core: &LoopCore, value: &Bound<'_, PyAny>) -> PyResult<()> {
    core.debug.store(value.is_truthy()?, Ordering::Relaxed);
    Ok(())
}

pub(crate) fn closed(core: &LoopCore) -> bool {
    core.closed.load(Ordering::Relaxed)
}

pub(crate) fn set_closed(core: &LoopCore, value: &Bound<'_, PyAny>) -> PyResult<()> {
    core.closed.store(value.is_truthy()?, Ordering::Relaxed);
    Ok(())
}

pub(crate) fn stopping(core: &LoopCore) -> bool {
    core.stopping.load(Ordering::Relaxed)
}

pub(crate) fn set_stopping(core: &LoopCore, value: &Bound<'_, PyAny>) -> PyResult<()> {
    core.stopping.store(value.is_truthy()?, Ordering::Relaxed);
    Ok(())
}

/// `_thread_id`: the thread running the loop, `None` while it is not running.
pub(crate) fn thread_id(core: &LoopCore, py: Python<'_>) -> PyResult<Option<u64>> {
    Ok(core.state.borrow_mut(py)?.thread_id)
}

pub(crate) fn set_thread_id(core: &LoopCore, py: Python<'_>, value: Option<u64>) -> PyResult<()> {
    core.state.borrow_mut(py)?.thread_id = value;
    core.watchdog.set_loop_thread(value);
    Ok(())
}

/// `_ready`: a snapshot of the ready queue (asyncio exposes its deque; tests read its
/// length).
pub(crate) fn ready(slf: &Bound<'_, LoopCore>) -> PyResult<Vec<Py<Handle>>> {
    let py = slf.py();
    // Queued calls get handles made for them, outside the borrow (making one
    // allocates Python objects).
    let queued: Vec<Result<Py<Handle>, QueuedCall>> = slf
        .get()
        .state
        .borrow_mut(py)?
        .ready
        .iter()
        .filter_map(|item| match item {
            Ready::Handle(h) => Some(Ok(h.clone_ref(py))),
            Ready::Call(call) => Some(Err(QueuedCall {
                callback: call.callback.clone_ref(py),
                arg: call.arg.as_ref().map(|a| a.clone_ref(py)),
                context: call.context.clone_ref(py),
            })),
            Ready::Io(..) | Ready::Sock(_) => None,
        })
        .collect();
    queued
        .into_iter()
        .map(|item| match item {
            Ok(handle) => Ok(handle),
            Err(call) => call.to_handle(py, slf.as_any()),
        })
        .collect()
}

/// asyncio's `__init__` assigns an empty queue; the Rust queue is the real one.
pub(crate) fn set_ready(value: &Bound<'_, PyAny>) -> PyResult<()> {
    reject_non_empty(value, "_ready")
}

/// `_scheduled`: a snapshot of the live timers, earliest first.
pub(crate) fn scheduled(core: &LoopCore, py: Python<'_>) -> PyResult<Vec<Py<TimerHandle>>> {
    let st = core.state.borrow_mut(py)?;
    let mut timers: Vec<Py<TimerHandle>> = st
        .timers
        .handles()
        .filter(|h| !h.bind(py).as_super().get().is_cancelled())
        .map(|h| h.clone_ref(py))
        .collect();
    timers.sort_by(|a, b| a.get().when.total_cmp(&b.get().when));
    Ok(timers)
}

pub(crate) fn set_scheduled(value: &Bound<'_, PyAny>) -> PyResult<()> {
    reject_non_empty(value, "_scheduled")
}

pub(crate) fn timer_cancelled_count(core: &LoopCore, py: Python<'_>) -> PyResult<usize> {
    Ok(core.state.borrow_mut(py)?.timers.cancelled_count())
}

/// asyncio's `__init__` assigns 0; the count is the timers' own.
pub(crate) fn set_timer_cancelled_count(value: usize) -> PyResult<()> {
    if value != 0 {
        return Err(PyValueError::new_err(
            "_timer_cancelled_count is maintained by the loop",
        ));
    }
    Ok(())
}

/// `_timer_count`: timers in the heap, cancelled ones not yet compacted included.
pub(crate) fn timer_count(core: &LoopCore, py: Python<'_>) -> PyResult<usize> {
    Ok(core.state.borrow_mut(py)?.timers.len())
}
