//! Scheduling callbacks: `call_soon`, `call_soon_threadsafe`, `call_later` and
//! `call_at` put handles on the ready queue or the timers (`fastcall` exposes them to
//! Python), with asyncio's debug-mode checks; creating futures and tasks; and what a
//! handle asks of its loop.

use std::mem;
use std::sync::atomic::Ordering;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::clock::deadline;
use crate::event_loop::{LoopCore, Ready};
use crate::handles::{self, CallArgs, Handle, QueuedCall, TimerHandle};
use crate::poller;
use crate::pyhelpers;

fn current_thread_id() -> u64 {
    // SAFETY: no preconditions; the same value `threading.get_ident()` returns.
    #[allow(clippy::useless_conversion)] // c_ulong is not u64 on every target
    u64::from(unsafe { ffi::PyThread_get_thread_ident() })
}

impl LoopCore {
    /// `loop.get_debug()` for any loop object, read directly when it is ours.
    pub(crate) fn debug_of(loop_: &Bound<'_, PyAny>) -> PyResult<bool> {
        match loop_.cast::<LoopCore>() {
            Ok(core) => Ok(core.get().debug.load(Ordering::Relaxed)),
            Err(_) => loop_.call_method0("get_debug")?.is_truthy(),
        }
    }

    /// A scheduled `TimerHandle` of `loop_` was cancelled.
    pub(crate) fn timer_cancelled(
        loop_: &Bound<'_, PyAny>,
        handle: &Bound<'_, TimerHandle>,
    ) -> PyResult<()> {
        match loop_.cast::<LoopCore>() {
            Ok(core) => {
                let mut st = core.get().state.borrow_mut(loop_.py())?;
                st.timers.note_cancelled();
                st.stats.timers_cancelled += 1;
                Ok(())
            }
            Err(_) => loop_
                .call_method1("_timer_handle_cancelled", (handle,))
                .map(|_| ()),
        }
    }

    /// Queues a handle from any thread and wakes the loop (`call_soon_threadsafe`).
    #[inline]
    pub(crate) fn queue_threadsafe(&self, py: Python<'_>, handle: &Py<Handle>) -> PyResult<()> {
        // Holding the GIL, we can append to the ready queue itself, which keeps FIFO
        // order with `call_soon`. Only if the loop thread is inside a borrow (we got the
        // GIL from it mid-update) does the handle go to the side queue instead.
        let queued_aside = match self.state.borrow_mut(py) {
            Ok(mut st) => {
                st.ready.push_back(Ready::Handle(handle.clone_ref(py)));
                false
            }
            Err(_) => true,
        };
        // A plain load first: while a wake-up is already in flight (the common case
        // for a burst of calls) no read-modify-write is needed.
        let must_wake = !self.wake_pending.load(Ordering::Acquire)
            && !self.wake_pending.swap(true, Ordering::AcqRel);
        if queued_aside || must_wake {
            let mut queue = self
                .threadsafe
                .lock()
                .map_err(|_| PyRuntimeError::new_err("ferroloop: threadsafe queue poisoned"))?;
            if queued_aside {
                queue.handles.push(handle.clone_ref(py));
                self.side_queued.store(true, Ordering::Release);
            }
            if queue.wake_fd >= 0 {
                poller::wake_fd(queue.wake_fd);
            }
        }
        Ok(())
    }

    /// Moves handles queued by other threads onto the ready queue.
    pub(crate) fn take_threadsafe(&self, py: Python<'_>) -> PyResult<()> {
        if !self.side_queued.load(Ordering::Acquire)
            || !self.side_queued.swap(false, Ordering::AcqRel)
        {
            return Ok(());
        }
        let queued = match self.threadsafe.lock() {
            Ok(mut q) if !q.handles.is_empty() => mem::take(&mut q.handles),
            _ => return Ok(()),
        };
        self.state
            .borrow_mut(py)?
            .ready
            .extend(queued.into_iter().map(Ready::Handle));
        Ok(())
    }

    /// `asyncio.Future(loop=self)`, without a Python frame (`create_future`).
    #[inline]
    pub(crate) fn new_future(slf: &Bound<'_, LoopCore>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let cached = slf
            .get()
            .state
            .borrow_mut(py)?
            .future_kwargs
            .as_ref()
            .map(|d| d.clone_ref(py));
        let kwargs = match cached {
            Some(kwargs) => kwargs,
            None => {
                let kwargs = PyDict::new(py);
                kwargs.set_item(pyo3::intern!(py, "loop"), slf)?;
                let kwargs = kwargs.unbind();
                slf.get().state.borrow_mut(py)?.future_kwargs = Some(kwargs.clone_ref(py));
                kwargs
            }
        };
        pyhelpers::new_future(py, kwargs.bind(py))
    }

    /// `BaseEventLoop.create_task` without a Python frame when no task factory is set;
    /// with one, the Python implementation (it calls the factory) runs.
    #[inline]
    pub(crate) fn new_task(
        slf: &Bound<'_, LoopCore>,
        coro: &Bound<'_, PyAny>,
        name: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        let none = py.None().into_bound(py);
        let name = name.unwrap_or(&none);
        let context = context.unwrap_or(&none);
        let takes_context = pyhelpers::task_takes_context(py);
        if !takes_context && !context.is_none() {
            // As stock asyncio before 3.11, whose create_task has no `context`.
            return Err(PyTypeError::new_err(
                "create_task() got an unexpected keyword argument 'context'",
            ));
        }
        let has_factory = slf.get().state.borrow_mut(py)?.task_factory.is_some();
        if has_factory {
            let base = py.import("asyncio.base_events")?.getattr("BaseEventLoop")?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("name", name)?;
            if takes_context {
                kwargs.set_item("context", context)?;
            }
            return Ok(base
                .getattr("create_task")?
                .call((slf, coro), Some(&kwargs))?
                .unbind());
        }
        // No frame of ours is on the stack, so the task's source traceback (debug mode)
        // already ends at the caller, which asyncio gets by dropping its own frame.
        let task = pyhelpers::new_task(slf.as_any(), coro, name, context)?;
        Ok(task)
    }

    /// Debug-mode checks of `call_soon` and friends, as asyncio makes them.
    fn debug_checks(
        slf: &Bound<'_, LoopCore>,
        callback: &Bound<'_, PyAny>,
        method: &str,
        thread_check: bool,
    ) -> PyResult<()> {
        let py = slf.py();
        if thread_check {
            let owner = slf.get().state.borrow_mut(py)?.thread_id;
            if let Some(owner) = owner {
                if owner != current_thread_id() {
                    return Err(PyRuntimeError::new_err(
                        "Non-thread-safe operation invoked on an event loop other than the current one",
                    ));
                }
            }
        }
        slf.call_method1("_check_callback", (callback, method))?;
        Ok(())
    }

    /// A handle for one run (see `handles::track`): its own context already off the
    /// collector's lists; the caller untracks the object once it is made.
    fn one_shot_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        let handle = LoopCore::new_handle(slf, callback, args, context)?;
        handle.untrack_own_context(slf.py());
        Ok(handle)
    }

    /// A handle the loop keeps and runs many times (an fd callback, a signal
    /// handler): under the collector like any other object.
    pub(crate) fn kept_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let args = CallArgs::from_tuple(Some(args));
        let handle = Py::new(slf.py(), LoopCore::new_handle(slf, callback, args, None)?)?;
        handles::track(handle.bind(slf.py()));
        Ok(handle)
    }

    fn new_handle(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        let debug = slf.get().debug.load(Ordering::Relaxed);
        Handle::build(
            slf.py(),
            callback,
            args,
            Some(slf.clone().into_any().unbind()),
            context,
            debug,
        )
    }

    fn schedule_timer(
        slf: &Bound<'_, LoopCore>,
        when: f64,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let py = slf.py();
        let handle = LoopCore::one_shot_handle(slf, callback, args, context)?;
        let handle = Py::new(py, TimerHandle::new_initializer(handle, when))?;
        handles::untrack(handle.bind(py).as_super());
        handle.get().scheduled.store(true, Ordering::Relaxed);
        let mut st = slf.get().state.borrow_mut(py)?;
        st.timers.push(handle.clone_ref(py), when);
        st.stats.timers_scheduled += 1;
        Ok(handle)
    }

    pub(crate) fn call_soon(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_soon", true)?;
        }
        let handle = Py::new(py, LoopCore::one_shot_handle(slf, callback, args, context)?)?;
        handles::untrack(handle.bind(py));
        core.state
            .borrow_mut(py)?
            .ready
            .push_back(Ready::Handle(handle.clone_ref(py)));
        Ok(handle)
    }

    /// `call_soon(callback[, arg], context=context)` from asyncio's C tasks and
    /// futures, which drop the returned handle unseen: the call is queued without a
    /// handle object (in debug mode, which checks and names callbacks, as any other).
    pub(crate) fn call_soon_from_asyncio(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        arg: Option<Bound<'_, PyAny>>,
        context: Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let core = slf.get();
        if core.debug.load(Ordering::Relaxed) || context.is_none() {
            let args = arg.map(|a| CallArgs::One(a.unbind()));
            return Ok(LoopCore::call_soon(slf, callback, args, Some(context))?.into_any());
        }
        core.check_closed()?;
        core.state
            .borrow_mut(py)?
            .ready
            .push_back(Ready::Call(QueuedCall {
                callback: callback.unbind(),
                arg: arg.map(Bound::unbind),
                context: context.unbind(),
            }));
        Ok(py.None())
    }

    pub(crate) fn call_soon_threadsafe(
        slf: &Bound<'_, LoopCore>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_soon_threadsafe", false)?;
        }
        let handle = Py::new(py, LoopCore::one_shot_handle(slf, callback, args, context)?)?;
        handles::untrack(handle.bind(py));
        core.queue_threadsafe(py, &handle)?;
        Ok(handle)
    }

    pub(crate) fn call_later(
        slf: &Bound<'_, LoopCore>,
        delay: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let when = deadline(slf.py(), LoopCore::now(slf)?, delay)?;
        let core = slf.get();
        core.check_closed()?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_later", true)?;
        }
        LoopCore::schedule_timer(slf, when, callback, args, context)
    }

    pub(crate) fn call_at(
        slf: &Bound<'_, LoopCore>,
        when: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let core = slf.get();
        if when.is_none() {
            // Before 3.11 asyncio looks at the loop being closed first.
            if slf.py().version_info() < (3, 11) {
                core.check_closed()?;
            }
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        core.check_closed()?;
        let when = deadline(slf.py(), 0.0, when)?;
        if core.debug.load(Ordering::Relaxed) {
            LoopCore::debug_checks(slf, &callback, "call_at", true)?;
        }
        LoopCore::schedule_timer(slf, when, callback, args, context)
    }
}
