//! `Handle` and `TimerHandle`: a callback scheduled on the loop, with asyncio's surface.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::event_loop::LoopCore;
use crate::gil_cell::GilCell;
use crate::pyhelpers;

/// The positional arguments of a callback. One argument (a task's wakeup, a future's
/// `set_result`) is kept without a tuple around it.
pub(crate) enum CallArgs {
    One(Py<PyAny>),
    Many(Py<PyTuple>),
}

impl CallArgs {
    /// `None` for an empty tuple or no tuple.
    pub fn from_tuple(args: Option<Bound<'_, PyTuple>>) -> Option<CallArgs> {
        args.filter(|a| !a.is_empty())
            .map(|a| CallArgs::Many(a.unbind()))
    }

    /// Releases the reference without the thread-local check a plain drop makes.
    fn drop_ref(self, py: Python<'_>) {
        match self {
            CallArgs::One(arg) => arg.drop_ref(py),
            CallArgs::Many(args) => args.drop_ref(py),
        }
    }

    fn clone_ref(&self, py: Python<'_>) -> CallArgs {
        match self {
            CallArgs::One(arg) => CallArgs::One(arg.clone_ref(py)),
            CallArgs::Many(args) => CallArgs::Many(args.clone_ref(py)),
        }
    }

    /// The arguments as the tuple asyncio's `Handle._args` holds.
    fn to_tuple<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        match self {
            CallArgs::One(arg) => PyTuple::new(py, [arg]),
            CallArgs::Many(args) => Ok(args.bind(py).clone()),
        }
    }

    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            CallArgs::One(arg) => visit.call(arg),
            CallArgs::Many(args) => visit.call(args),
        }
    }
}

/// The context a handle's callback runs in.
pub(crate) enum HandleContext {
    /// Passed by the caller (`context=`), or made for `get_context()`: tracked by the
    /// collector like any object.
    Given(Py<PyAny>),
    /// The handle's own copy of the caller's context, referenced by nothing else when it
    /// was made. The loop may keep it off the cyclic GC's lists (see the notes above
    /// `track`).
    Own(Py<PyAny>),
    /// The caller's context was empty. A copy of it would be an empty context that
    /// nothing else can see, so none is made: the callback runs in an empty context lent
    /// by `EMPTY_CONTEXT` (see `lend_empty_context`), and one is made only if the
    /// handle is asked for its context or the callback changes or keeps the lent one.
    Empty,
}

impl HandleContext {
    /// The context object, if one was made.
    fn object(&self) -> Option<&Py<PyAny>> {
        match self {
            HandleContext::Given(c) | HandleContext::Own(c) => Some(c),
            HandleContext::Empty => None,
        }
    }

    fn into_object(self) -> Option<Py<PyAny>> {
        match self {
            HandleContext::Given(c) | HandleContext::Own(c) => Some(c),
            HandleContext::Empty => None,
        }
    }
}

pub(crate) struct HandleState {
    pub callback: Option<Py<PyAny>>,
    /// `None` for a callback taking no arguments.
    pub args: Option<CallArgs>,
    /// `None` once the collector cleared the handle.
    pub context: Option<HandleContext>,
    pub loop_: Option<Py<PyAny>>,
    pub source_traceback: Option<Py<PyAny>>,
    /// Kept from `cancel()` in debug mode, as asyncio does, so logs can still name it.
    pub repr: Option<Py<PyAny>>,
}

impl HandleState {
    /// Puts a copied context back on the collector's lists. A `contextvars.Context`
    /// must be tracked when it is freed (its dealloc unlinks it from the collector's
    /// list without checking), so this runs before the handle lets go of it.
    fn retrack_context(&self) {
        if let Some(HandleContext::Own(context)) = &self.context {
            // SAFETY: handle state lives in a Python object and is only touched, and
            // dropped, by code attached to the interpreter (methods, tp_dealloc,
            // tp_clear); the context is a live GC object.
            unsafe { set_ptr_tracked(context.as_ptr(), true) };
        }
    }
}

impl Drop for HandleState {
    fn drop(&mut self) {
        self.retrack_context();
        // SAFETY: handle state lives in a Python object and is dropped by tp_dealloc or
        // tp_clear, or (a handle never wrapped) by loop code: always attached.
        let py = unsafe { Python::assume_attached() };
        // Released through `drop_ref`: dropping a `Py` asks a thread-local whether the
        // thread is attached, for each field of every handle.
        let context = self.context.take().and_then(HandleContext::into_object);
        for obj in [
            self.callback.take(),
            context,
            self.loop_.take(),
            self.source_traceback.take(),
            self.repr.take(),
        ]
        .into_iter()
        .flatten()
        {
            obj.drop_ref(py);
        }
        if let Some(args) = self.args.take() {
            args.drop_ref(py);
        }
    }
}

/// A callback scheduled by `call_soon`, `add_reader` and friends. Freed handles are
/// kept on a free list (`freelist.rs`): every timer and many callbacks allocate one.
#[pyclass(module = "ferroloop._ferroloop", subclass, frozen, weakref)]
pub struct Handle {
    pub(crate) state: GilCell<HandleState>,
    cancelled: AtomicBool,
}

/// A callback scheduled for a point in time (`call_later`, `call_at`).
#[pyclass(module = "ferroloop._ferroloop", extends = Handle, frozen)]
pub struct TimerHandle {
    pub(crate) when: f64,
    /// True while the timer sits in the loop's heap.
    pub(crate) scheduled: AtomicBool,
}

impl Handle {
    /// Builds a handle; `context=None` takes a copy of the current context, as asyncio does.
    pub(crate) fn build(
        py: Python<'_>,
        callback: Bound<'_, PyAny>,
        args: Option<CallArgs>,
        loop_: Option<Py<PyAny>>,
        context: Option<Bound<'_, PyAny>>,
        debug: bool,
    ) -> PyResult<Handle> {
        let context = match context {
            Some(ctx) if !ctx.is_none() => HandleContext::Given(ctx.unbind()),
            _ => {
                let copy = copy_context(py)?;
                if is_empty_context(&copy) {
                    HandleContext::Empty
                } else {
                    HandleContext::Own(copy.unbind())
                }
            }
        };
        let source_traceback = if debug {
            Some(pyhelpers::extract_stack(py)?)
        } else {
            None
        };
        Ok(Handle {
            state: GilCell::new(HandleState {
                callback: Some(callback.unbind()),
                args,
                context: Some(context),
                loop_,
                source_traceback,
                repr: None,
            }),
            cancelled: AtomicBool::new(false),
        })
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Runs the callback inside its context. Exceptions other than `SystemExit` and
    /// `KeyboardInterrupt` go to the loop's exception handler; those two propagate.
    pub(crate) fn run(slf: &Bound<'_, Handle>) -> PyResult<()> {
        let mut lent = LentContext::default();
        let outcome = Handle::run_lent(slf, &mut lent);
        let left = lent.leave(slf.py());
        outcome.and(left)
    }

    /// `run`, for the loop's turn: a callback whose context is `Empty` runs in the
    /// empty context `lent` has entered, which stays entered for the next such callback
    /// (see `LentContext`). Any other callback leaves it first.
    pub(crate) fn run_lent(slf: &Bound<'_, Handle>, lent: &mut LentContext) -> PyResult<()> {
        let py = slf.py();
        let handle = slf.get();
        if handle.is_cancelled() {
            return Ok(());
        }
        let (callback, args, context) = {
            let state = handle.state.borrow_mut(py)?;
            let (Some(cb), Some(ctx)) = (&state.callback, &state.context) else {
                return Ok(());
            };
            // Bound references: they are released without asking a thread-local
            // whether the thread is attached, as dropping a `Py` does.
            (
                cb.bind(py).clone(),
                state.args.as_ref().map(|a| a.clone_ref(py)),
                ctx.object().map(|c| c.bind(py).clone()),
            )
        };
        let callback = callback.as_unbound();
        let outcome = match &context {
            Some(context) => {
                lent.leave(py)?;
                in_context(py, Some(context.as_unbound()), || {
                    call(py, callback, args.as_ref())
                })
            }
            None => {
                // Changed since the last callback (by a `__del__` as the loop let a
                // handle go): not empty any more, so not for this one.
                if !lent.is_clean(py) {
                    lent.leave(py)?;
                }
                lent.enter(py)?;
                let outcome = call(py, callback, args.as_ref());
                // SAFETY: reading the reference count of a live object while attached.
                let shared = unsafe { ffi::Py_REFCNT(slf.as_ptr()) } > 1;
                // A handle only the loop holds dies after this run, and nothing can see
                // its context; one held elsewhere (an fd's callback, a handle someone
                // kept) must keep what its callback did to it. An error is reported
                // from the thread's own context.
                if outcome.is_err() || (shared && !lent.is_clean(py)) {
                    if let Some(changed) = lent.exit(py)? {
                        // The callback set a variable in it or kept a reference (a
                        // `ContextVar.set` token): from now on it is this handle's
                        // context, as the copy asyncio would have made would be.
                        let mut state = handle.state.borrow_mut(py)?;
                        if matches!(state.context, Some(HandleContext::Empty)) {
                            state.context = Some(HandleContext::Given(changed));
                        }
                    }
                }
                outcome
            }
        };
        let result = match outcome {
            Ok(()) => Ok(()),
            Err(err) => {
                if err.is_instance_of::<PySystemExit>(py)
                    || err.is_instance_of::<PyKeyboardInterrupt>(py)
                {
                    Err(err)
                } else {
                    report_callback_error(slf, callback, args.as_ref(), err)
                }
            }
        };
        if let Some(args) = args {
            args.drop_ref(py);
        }
        result
    }

    pub(crate) fn do_cancel(slf: &Bound<'_, Handle>) -> PyResult<()> {
        let py = slf.py();
        let handle = slf.get();
        if handle.cancelled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let debug = match handle.state.borrow_mut(py)?.loop_.as_ref() {
            Some(lp) => LoopCore::debug_of(lp.bind(py))?,
            None => false,
        };
        let repr = if debug {
            Some(Handle::repr_of(slf)?.into_any().unbind())
        } else {
            None
        };
        // Taken out first and dropped after the borrow ends: dropping a callback may
        // run arbitrary Python code (`__del__`) that touches this handle again.
        let released = {
            let mut state = handle.state.borrow_mut(py)?;
            if repr.is_some() {
                state.repr = repr;
            }
            (state.callback.take(), state.args.take())
        };
        if let Some(callback) = released.0 {
            callback.drop_ref(py);
        }
        if let Some(args) = released.1 {
            args.drop_ref(py);
        }
        Ok(())
    }

    fn repr_of<'py>(slf: &Bound<'py, Handle>) -> PyResult<Bound<'py, PyString>> {
        let py = slf.py();
        let handle = slf.get();
        let (callback, args, traceback) = {
            let state = handle.state.borrow_mut(py)?;
            if let Some(repr) = &state.repr {
                return Ok(repr.bind(py).cast::<PyString>()?.clone());
            }
            (
                state.callback.as_ref().map(|c| c.clone_ref(py)),
                state.args.as_ref().map(|a| a.to_tuple(py)).transpose()?,
                state.source_traceback.as_ref().map(|t| t.clone_ref(py)),
            )
        };
        let mut info: Vec<String> = vec![slf.get_type().name()?.to_string()];
        if handle.is_cancelled() {
            info.push("cancelled".into());
        }
        if let Ok(timer) = slf.cast::<TimerHandle>() {
            let pos = if handle.is_cancelled() { 2 } else { 1 };
            info.insert(
                pos,
                format!("when={}", py_float_repr(py, timer.get().when)?),
            );
        }
        if let Some(cb) = callback {
            info.push(pyhelpers::format_callback_source(
                py,
                cb.bind(py),
                args.as_ref(),
            )?);
        }
        if let Some(tb) = traceback {
            if let Some(frame_info) = pyhelpers::last_frame_location(tb.bind(py))? {
                info.push(format!("created at {frame_info}"));
            }
        }
        Ok(PyString::new(py, &format!("<{}>", info.join(" "))))
    }
}

// Cyclic-GC tracking of handles.
//
// A handle the loop makes for one run (`call_soon`, `call_later`...) is owned by the
// loop's queues until it runs or is cancelled, and most are referenced by nothing else:
// the collector walking thousands of queued handles and the contexts they copied is
// pure cost. Such a handle and its own context are therefore taken off the collector's
// lists when made (`Handle::untrack_own_context`, `untrack`). While untracked, their
// references only make what they point to look reachable, which is true while the loop
// holds them. When the loop lets go, `release_from_loop` tracks again whatever is still
// referenced elsewhere, so cycles through stored handles stay collectable; a context is
// also tracked again before its handle drops it (`HandleState::retrack_context`).
// Every other handle is tracked explicitly (`track`): the free list in `freelist.rs`
// hands back objects the collector does not track.

/// Puts a handle, and the context it copied, on the collector's lists.
pub(crate) fn track(handle: &Bound<'_, Handle>) {
    set_object_tracked(handle.as_any(), true);
    if let Ok(state) = handle.get().state.borrow_mut(handle.py()) {
        state.retrack_context();
    }
}

/// Takes a newly made one-shot handle object off the collector's lists (its context
/// went off before the handle was wrapped, without borrowing the shared object).
pub(crate) fn untrack(handle: &Bound<'_, Handle>) {
    set_object_tracked(handle.as_any(), false);
}

impl Handle {
    /// Takes the context this handle copied for itself off the collector's lists;
    /// done before the handle is shared.
    pub(crate) fn untrack_own_context(&self, py: Python<'_>) {
        if let Ok(state) = self.state.borrow_mut(py) {
            if let Some(HandleContext::Own(context)) = &state.context {
                set_object_tracked(context.bind(py), false);
            }
        }
    }
}

fn set_object_tracked(obj: &Bound<'_, PyAny>, tracked: bool) {
    // SAFETY: a `Bound` proves the thread is attached and the object live; both callers
    // pass objects of GC types (a PyO3 class; a contextvars.Context).
    unsafe { set_ptr_tracked(obj.as_ptr(), tracked) }
}

/// # Safety
/// The thread is attached and `ptr` is a live object of a GC type. Tracking changes
/// only when it is not already in the wanted state, as `PyObject_GC_Track` requires.
unsafe fn set_ptr_tracked(ptr: *mut ffi::PyObject, tracked: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        let is_tracked = ffi::PyObject_GC_IsTracked(ptr) == 1;
        if tracked && !is_tracked {
            ffi::PyObject_GC_Track(ptr.cast());
        } else if !tracked && is_tracked {
            ffi::PyObject_GC_UnTrack(ptr.cast());
        }
    }
}

/// The loop drops its reference to a handle (it ran, or was cancelled, or the loop
/// closed): a handle still referenced elsewhere goes back under the collector, with
/// its context. (One that dies with this reference re-tracks its context as it is
/// dropped: see `HandleState::retrack_context`.)
pub(crate) fn release_from_loop(handle: Bound<'_, Handle>) {
    // SAFETY: reading the reference count of a live object with the GIL held.
    if unsafe { ffi::Py_REFCNT(handle.as_ptr()) } > 1 {
        track(&handle);
    }
}

fn py_float_repr(py: Python<'_>, value: f64) -> PyResult<String> {
    Ok(value.into_pyobject(py)?.repr()?.to_string())
}

/// A callback queued by asyncio's own C code (a task step, a future's done callback),
/// which drops the handle `call_soon` returns unseen: queued without a `Handle` object.
/// One is made only if the callback fails (for the exception handler's `handle`) or
/// someone looks at the ready queue.
pub(crate) struct QueuedCall {
    pub callback: Py<PyAny>,
    pub arg: Option<Py<PyAny>>,
    pub context: Py<PyAny>,
}

impl QueuedCall {
    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.callback)?;
        if let Some(arg) = &self.arg {
            visit.call(arg)?;
        }
        visit.call(&self.context)
    }

    /// The `Handle` this call stands for.
    pub(crate) fn to_handle(
        &self,
        py: Python<'_>,
        loop_: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Handle>> {
        let handle = Handle::build(
            py,
            self.callback.bind(py).clone(),
            self.arg.as_ref().map(|a| CallArgs::One(a.clone_ref(py))),
            Some(loop_.clone().unbind()),
            Some(self.context.bind(py).clone()),
            false,
        )?;
        let handle = Py::new(py, handle)?;
        track(handle.bind(py));
        Ok(handle)
    }

    /// Runs the call as `Handle._run` would run its handle.
    pub(crate) fn run(self, py: Python<'_>, loop_: &Bound<'_, PyAny>) -> PyResult<()> {
        let args = self.arg.as_ref().map(|a| CallArgs::One(a.clone_ref(py)));
        match in_context(py, Some(&self.context), || {
            call(py, &self.callback, args.as_ref())
        }) {
            Ok(()) => Ok(()),
            Err(err)
                if err.is_instance_of::<PySystemExit>(py)
                    || err.is_instance_of::<PyKeyboardInterrupt>(py) =>
            {
                Err(err)
            }
            Err(err) => {
                let handle = self.to_handle(py, loop_)?;
                report_callback_error(handle.bind(py), &self.callback, args.as_ref(), err)
            }
        }
    }
}

/// `contextvars.copy_context()` through the C API.
pub(crate) fn copy_context(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: called with the GIL held; returns a new reference or NULL with an error set.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent()) }
}

/// A context that sets no variable. (`False` also if its size cannot be read.)
pub(crate) fn is_empty_context(context: &Bound<'_, PyAny>) -> bool {
    // SAFETY: attached, with a live object; PyMapping_Size returns -1 with an error set
    // on failure, which is cleared here (such a context is treated as not empty).
    let size = unsafe { ffi::PyMapping_Size(context.as_ptr()) };
    if size < 0 {
        drop(PyErr::take(context.py()));
    }
    size == 0
}

/// One empty context, kept between the runs of handles whose context is
/// `HandleContext::Empty`. Taken out while lent, so two callbacks (a loop in another
/// thread, a nested run) never share it.
static EMPTY_CONTEXT: GilCell<Option<Py<PyAny>>> = GilCell::new(None);

/// An empty context nobody else references, to run one callback in.
fn lend_empty_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    if let Some(spare) = EMPTY_CONTEXT.borrow_mut(py).ok().and_then(|mut s| s.take()) {
        return Ok(spare);
    }
    new_context(py)
}

/// A new, empty `contextvars.Context`.
fn new_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: attached; returns a new reference or NULL with an error set.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_New()) }.map(Bound::unbind)
}

/// An empty context lent by `lend_empty_context` and entered for a stretch of
/// consecutive callbacks whose handles' context is `HandleContext::Empty`: one
/// `PyContext_Enter`/`PyContext_Exit` for the stretch instead of one per callback.
///
/// Sharing it is invisible as long as it stays as it was entered: empty, and
/// referenced by nothing new (no `ContextVar.set` token holds it). It is checked before
/// each callback and after any whose handle outlives the run, and left (`leave`)
/// before anything else runs (another callback, a transport, an exception handler), so
/// they see the thread's own context as they would in asyncio.
#[derive(Default)]
pub(crate) struct LentContext {
    /// The entered context, and its reference count just after it was entered.
    entered: Option<(Py<PyAny>, ffi::Py_ssize_t)>,
}

impl LentContext {
    fn enter(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.entered.is_some() {
            return Ok(());
        }
        let context = lend_empty_context(py)?;
        // SAFETY: a live context nothing else references (so not entered anywhere);
        // attached, PyContext_Enter enters it or sets an error and returns -1.
        if unsafe { ffi::PyContext_Enter(context.as_ptr()) } < 0 {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: reading the reference count of a live object while attached.
        let count = unsafe { ffi::Py_REFCNT(context.as_ptr()) };
        self.entered = Some((context, count));
        Ok(())
    }

    /// Nothing entered, or the entered context is still empty and referenced only by
    /// this and the thread state.
    fn is_clean(&self, py: Python<'_>) -> bool {
        let Some((context, count)) = &self.entered else {
            return true;
        };
        // SAFETY: reading the reference count of a live object while attached.
        let unshared = unsafe { ffi::Py_REFCNT(context.as_ptr()) } == *count;
        unshared && is_empty_context(context.bind(py))
    }

    /// Leaves the entered context. A clean one is kept for the next callbacks; one the
    /// callbacks changed is returned.
    fn exit(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let clean = self.is_clean(py);
        let Some((context, _)) = self.entered.take() else {
            return Ok(None);
        };
        // SAFETY: the context entered by `enter` on this thread, still the current one
        // (every callback leaves the contexts it entered).
        if unsafe { ffi::PyContext_Exit(context.as_ptr()) } < 0 {
            return Err(PyErr::fetch(py));
        }
        if !clean {
            return Ok(Some(context));
        }
        if let Ok(mut spare) = EMPTY_CONTEXT.borrow_mut(py) {
            if spare.is_none() {
                *spare = Some(context);
                return Ok(None);
            }
        }
        context.drop_ref(py);
        Ok(None)
    }

    /// Leaves the entered context, if any: something other than an `Empty` handle's
    /// callback runs next.
    pub(crate) fn leave(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.entered.is_some() {
            if let Some(changed) = self.exit(py)? {
                changed.drop_ref(py);
            }
        }
        Ok(())
    }
}

impl Drop for LentContext {
    /// An error leaves the turn with the context still entered: leave it.
    fn drop(&mut self) {
        if let Some((context, _)) = self.entered.take() {
            // SAFETY: the loop's turn, which owns this, runs attached.
            let py = unsafe { Python::assume_attached() };
            // SAFETY: as in `exit`.
            if unsafe { ffi::PyContext_Exit(context.as_ptr()) } < 0 {
                PyErr::fetch(py).write_unraisable(py, None);
            }
            context.drop_ref(py);
        }
    }
}

/// Runs `f` with `context` entered, as `Context.run` would (no context: as it is).
/// Handles run their callbacks so, and transports their protocol's methods.
pub(crate) fn in_context<R>(
    py: Python<'_>,
    context: Option<&Py<PyAny>>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    let Some(context) = context else {
        return f();
    };
    // SAFETY: `context` is a live object (a context copied by copy_context or given as
    // `context=`); attached, PyContext_Enter either enters it or sets an error (a
    // TypeError for anything but a Context) and returns -1.
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

/// Runs `f` in `context`, or, with none (the context it would have copied was empty),
/// in a lent empty context; a lent context that `f` changed (a variable set, a token
/// holding it) is left in `context`, to be the caller's own from then on, as the copy
/// it stood for would have kept the change.
pub(crate) fn in_context_or_lent<R>(
    py: Python<'_>,
    context: &mut Option<Py<PyAny>>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    if let Some(context) = context.as_ref() {
        return in_context(py, Some(context), f);
    }
    let mut lent = LentContext::default();
    lent.enter(py)?;
    let outcome = f();
    *context = lent.exit(py)?;
    outcome
}

/// Calls `callback(*args)` in the current context.
fn call(py: Python<'_>, callback: &Py<PyAny>, args: Option<&CallArgs>) -> PyResult<()> {
    // SAFETY: callback and args are live references kept alive by the caller for the
    // whole call; each call returns a new reference or NULL with an error set.
    let result = unsafe {
        match args {
            None => ffi::PyObject_CallNoArgs(callback.as_ptr()),
            Some(CallArgs::One(arg)) => ffi::PyObject_CallOneArg(callback.as_ptr(), arg.as_ptr()),
            Some(CallArgs::Many(args)) if ffi::PyTuple_GET_SIZE(args.as_ptr()) == 1 => {
                ffi::PyObject_CallOneArg(callback.as_ptr(), ffi::PyTuple_GET_ITEM(args.as_ptr(), 0))
            }
            Some(CallArgs::Many(args)) => {
                ffi::PyObject_Call(callback.as_ptr(), args.as_ptr(), std::ptr::null_mut())
            }
        }
    };
    if result.is_null() {
        Err(PyErr::fetch(py))
    } else {
        // SAFETY: a non-NULL result is a new reference we own and release here.
        unsafe { ffi::Py_DECREF(result) };
        Ok(())
    }
}

fn report_callback_error(
    slf: &Bound<'_, Handle>,
    callback: &Py<PyAny>,
    args: Option<&CallArgs>,
    err: PyErr,
) -> PyResult<()> {
    let py = slf.py();
    let (loop_, traceback) = {
        let state = slf.get().state.borrow_mut(py)?;
        (
            state.loop_.as_ref().map(|l| l.clone_ref(py)),
            state.source_traceback.as_ref().map(|t| t.clone_ref(py)),
        )
    };
    let Some(loop_) = loop_ else {
        return Err(err);
    };
    let args = args.map(|a| a.to_tuple(py)).transpose()?;
    let source = pyhelpers::format_callback_source(py, callback.bind(py), args.as_ref())?;
    let context = PyDict::new(py);
    context.set_item("message", format!("Exception in callback {source}"))?;
    context.set_item("exception", err.value(py))?;
    context.set_item("handle", slf)?;
    if let Some(tb) = traceback {
        if tb.bind(py).is_truthy()? {
            context.set_item("source_traceback", tb)?;
        }
    }
    loop_
        .bind(py)
        .call_method1("call_exception_handler", (context,))?;
    Ok(())
}

#[pymethods]
impl Handle {
    #[new]
    #[pyo3(signature = (callback, args, r#loop, context=None))]
    fn py_new(
        py: Python<'_>,
        callback: Bound<'_, PyAny>,
        args: Option<Bound<'_, PyTuple>>,
        r#loop: Bound<'_, PyAny>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        let debug = LoopCore::debug_of(&r#loop)?;
        let args = CallArgs::from_tuple(args);
        Handle::build(py, callback, args, Some(r#loop.unbind()), context, debug)
    }

    fn cancel(slf: &Bound<'_, Handle>) -> PyResult<()> {
        Handle::do_cancel(slf)
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    fn get_context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let mut state = self.state.borrow_mut(py)?;
        if let Some(HandleContext::Empty) = state.context {
            state.context = Some(HandleContext::Given(new_context(py)?));
        }
        Ok(state
            .context
            .as_ref()
            .and_then(HandleContext::object)
            .map(|c| c.clone_ref(py)))
    }

    fn _run(slf: &Bound<'_, Handle>) -> PyResult<()> {
        Handle::run(slf)
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .callback
            .as_ref()
            .map(|c| c.clone_ref(py)))
    }

    #[getter]
    fn _args<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let state = self.state.borrow_mut(py)?;
        Ok(match (&state.callback, &state.args) {
            (None, _) => None,
            (Some(_), Some(args)) => Some(args.to_tuple(py)?),
            (Some(_), None) => Some(PyTuple::empty(py)),
        })
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.get_context(py)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .loop_
            .as_ref()
            .map(|c| c.clone_ref(py)))
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .source_traceback
            .as_ref()
            .map(|c| c.clone_ref(py)))
    }

    fn __repr__<'py>(slf: &Bound<'py, Handle>) -> PyResult<Bound<'py, PyString>> {
        Handle::repr_of(slf)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The GC runs with the GIL held. A borrow that is already active means we are in
        // the middle of updating this handle; skipping one traversal is harmless.
        if let Some(state) = self.state.borrow_for_gc() {
            let context = state.context.as_ref().and_then(HandleContext::object);
            for obj in [
                state.callback.as_ref(),
                context,
                state.loop_.as_ref(),
                state.source_traceback.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                visit.call(obj)?;
            }
            if let Some(args) = &state.args {
                args.visit(&visit)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let taken = self.state.borrow_mut_for_gc().map(|mut state| {
            state.retrack_context();
            (
                state.callback.take(),
                state.args.take(),
                state.context.take(),
                state.loop_.take(),
            )
        });
        drop(taken);
    }
}

impl TimerHandle {
    pub(crate) fn new_initializer(handle: Handle, when: f64) -> PyClassInitializer<TimerHandle> {
        PyClassInitializer::from(handle).add_subclass(TimerHandle {
            when,
            scheduled: AtomicBool::new(false),
        })
    }
}

#[pymethods]
impl TimerHandle {
    #[new]
    #[pyo3(signature = (when, callback, args, r#loop, context=None))]
    fn py_new(
        py: Python<'_>,
        when: f64,
        callback: Bound<'_, PyAny>,
        args: Option<Bound<'_, PyTuple>>,
        r#loop: Bound<'_, PyAny>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyClassInitializer<TimerHandle>> {
        let debug = LoopCore::debug_of(&r#loop)?;
        let args = CallArgs::from_tuple(args);
        let handle = Handle::build(py, callback, args, Some(r#loop.unbind()), context, debug)?;
        Ok(TimerHandle::new_initializer(handle, when))
    }

    fn when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    fn cancel(slf: &Bound<'_, TimerHandle>) -> PyResult<()> {
        let py = slf.py();
        let base = slf.as_super();
        if !base.get().is_cancelled() && slf.get().scheduled.load(Ordering::Relaxed) {
            let loop_ = base
                .get()
                .state
                .borrow_mut(py)?
                .loop_
                .as_ref()
                .map(|l| l.clone_ref(py));
            if let Some(loop_) = loop_ {
                LoopCore::timer_cancelled(loop_.bind(py), slf)?;
            }
        }
        Handle::do_cancel(base)
    }

    fn __hash__(&self) -> u64 {
        self.when.to_bits()
    }

    fn __richcmp__(
        slf: &Bound<'_, TimerHandle>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let (a, b) = (slf.get().when, other.get().when);
        let result = match op {
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
            CompareOp::Eq => slf.is(other),
            CompareOp::Ne => !slf.is(other),
        };
        Ok(result.into_pyobject(py)?.to_owned().into_any().unbind())
    }
}
