//! `call_soon`, `call_soon_threadsafe`, `call_later` and `call_at` as hand-written
//! `METH_FASTCALL | METH_KEYWORDS` methods.
//!
//! These are the calls every task step and every future callback makes. Declared as
//! ordinary `#[pymethods]` with `*args`, each call would pack its positional arguments
//! into a tuple and go through the generic argument parser; here the arguments are read
//! straight off the vectorcall stack, and a single argument (a task wakeup's future, a
//! `set_result` value) is kept without a tuple at all.

use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::event_loop::LoopCore;
use crate::gil_cell::GilCell;
use crate::handles::CallArgs;

/// A method table entry the interpreter keeps a pointer to for the life of the type.
struct MethodDef(ffi::PyMethodDef);

// SAFETY: the entries are never written after construction, and what they point to (C
// string literals, functions) is immutable and 'static, so sharing them between
// threads is sound.
unsafe impl Sync for MethodDef {}

/// The signature of a scheduling call after its parsed leading arguments (`delay`,
/// `when`) and callback.
type Schedule = for<'py> fn(
    &Bound<'py, LoopCore>,
    Option<&Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Option<CallArgs>,
    Option<Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>>;

/// How a method is called: its name and the names of its required positional
/// arguments (one or two), the callback last.
struct Spec {
    name: &'static str,
    required: &'static [&'static str],
    schedule: Schedule,
    /// asyncio's C tasks and futures call this one (see `ASYNCIO_KWNAMES`).
    from_asyncio: bool,
}

const CALL_SOON: Spec = Spec {
    name: "call_soon",
    required: &["callback"],
    schedule: |slf, _, cb, args, ctx| Ok(LoopCore::call_soon(slf, cb, args, ctx)?.into_any()),
    from_asyncio: true,
};
const CALL_SOON_THREADSAFE: Spec = Spec {
    name: "call_soon_threadsafe",
    required: &["callback"],
    schedule: |slf, _, cb, args, ctx| {
        Ok(LoopCore::call_soon_threadsafe(slf, cb, args, ctx)?.into_any())
    },
    from_asyncio: false,
};
const CALL_LATER: Spec = Spec {
    name: "call_later",
    required: &["delay", "callback"],
    schedule: |slf, delay, cb, args, ctx| match delay {
        Some(delay) => Ok(LoopCore::call_later(slf, delay, cb, args, ctx)?.into_any()),
        None => Err(PyValueError::new_err("call_later() without a delay")),
    },
    from_asyncio: false,
};
const CALL_AT: Spec = Spec {
    name: "call_at",
    required: &["when", "callback"],
    schedule: |slf, when, cb, args, ctx| match when {
        Some(when) => Ok(LoopCore::call_at(slf, when, cb, args, ctx)?.into_any()),
        None => Err(PyValueError::new_err("call_at() without a time")),
    },
    from_asyncio: false,
};

macro_rules! method_def {
    ($static_name:ident, $fn_name:ident, $spec:expr, $pyname:literal, $doc:literal) => {
        /// # Safety
        /// Called by the interpreter, attached, with the vectorcall protocol's values.
        unsafe fn $fn_name(
            py: Python<'_>,
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargsf: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> PyResult<*mut ffi::PyObject> {
            // SAFETY: the interpreter calls a METH_FASTCALL | METH_KEYWORDS method with
            // these values as the vectorcall protocol defines them, `slf` type-checked.
            unsafe { parse_and_schedule(py, &$spec, slf, args, nargsf, kwnames) }.map(Py::into_ptr)
        }

        static $static_name: MethodDef = MethodDef(ffi::PyMethodDef {
            ml_name: $pyname.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                // The entry point `#[pymethods]` generates for its own fastcall methods
                // (the same pinned PyO3 version): it marks the thread attached without
                // a GILState call and turns a panic into PanicException.
                PyCFunctionFastWithKeywords: pyo3::impl_::trampoline::get_trampoline_function!(
                    fastcall_cfunction_with_keywords,
                    $fn_name
                ),
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: $doc.as_ptr(),
        });
    };
}

method_def!(
    CALL_SOON_DEF,
    call_soon_fastcall,
    CALL_SOON,
    c"call_soon",
    c"call_soon($self, callback, *args, context=None)\n--\n\nArrange for a callback to be called as soon as possible."
);
method_def!(
    CALL_SOON_THREADSAFE_DEF,
    call_soon_threadsafe_fastcall,
    CALL_SOON_THREADSAFE,
    c"call_soon_threadsafe",
    c"call_soon_threadsafe($self, callback, *args, context=None)\n--\n\nLike call_soon(), but thread-safe."
);
method_def!(
    CALL_LATER_DEF,
    call_later_fastcall,
    CALL_LATER,
    c"call_later",
    c"call_later($self, delay, callback, *args, context=None)\n--\n\nArrange for a callback to be called at a given time."
);
method_def!(
    CALL_AT_DEF,
    call_at_fastcall,
    CALL_AT,
    c"call_at",
    c"call_at($self, when, callback, *args, context=None)\n--\n\nLike call_later(), but uses an absolute time."
);

/// Gives a subclass of `LoopCore` (ferroloop's `Loop`) its own copy of each of
/// `LoopCore`'s methods that it does not define itself.
///
/// A method descriptor is bound to one type. CPython's specialised call of a method
/// descriptor is taken only for an instance of exactly that type; otherwise every call
/// goes the generic way and checks the instance's type by walking its MRO. So the class
/// programs actually instantiate gets descriptors of its own, made from the same method
/// definitions. What a name resolves to does not change: `LoopCore` precedes every
/// other base of the subclass that would define it.
#[pyfunction]
pub fn bind_methods_to(cls: &Bound<'_, PyType>) -> PyResult<()> {
    let py = cls.py();
    let core = py.get_type::<LoopCore>();
    // The methods take `self` as a LoopCore (call_soon and friends unchecked): the
    // descriptor's own type check is what guarantees it, so it must be a subclass.
    if cls.is(&core) || !cls.is_subclass_of::<LoopCore>()? {
        return Err(PyTypeError::new_err("not a subclass of LoopCore"));
    }
    let own = cls.getattr(pyo3::intern!(py, "__dict__"))?;
    let core_dict = core.getattr(pyo3::intern!(py, "__dict__"))?;
    for item in core_dict
        .call_method0(pyo3::intern!(py, "items"))?
        .try_iter()?
    {
        let (name, attr): (Bound<'_, PyString>, Bound<'_, PyAny>) = item?.extract()?;
        // SAFETY: reading the type pointer of a live object; PyMethodDescr_Type is a
        // static type object.
        let is_method = unsafe { ffi::Py_TYPE(attr.as_ptr()) == &raw mut ffi::PyMethodDescr_Type };
        if !is_method || own.contains(&name)? {
            continue;
        }
        // SAFETY: `attr` is exactly a method descriptor, so its layout is
        // PyMethodDescrObject. Its method definition lives as long as `LoopCore`'s type,
        // which is never freed (it belongs to this module for the process's life), so
        // the new descriptor may keep the pointer. PyDescr_NewMethod returns a new
        // reference or NULL with an error set.
        let descr = unsafe {
            let def = (*attr.as_ptr().cast::<ffi::PyMethodDescrObject>()).d_method;
            Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(cls.as_type_ptr(), def))
        }?;
        cls.setattr(name, descr)?;
    }
    Ok(())
}

/// Adds the four methods to `LoopCore`'s type.
pub fn install(ty: &Bound<'_, PyType>) -> PyResult<()> {
    let py = ty.py();
    for (name, def) in [
        ("call_soon", &CALL_SOON_DEF),
        ("call_soon_threadsafe", &CALL_SOON_THREADSAFE_DEF),
        ("call_later", &CALL_LATER_DEF),
        ("call_at", &CALL_AT_DEF),
    ] {
        // SAFETY: `def` is 'static and never written, as PyDescr_NewMethod requires (it
        // keeps the pointer; the interpreter only reads through it). `ty` is a live type
        // object. The call returns a new reference or NULL with an error set.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(ty.as_type_ptr(), ptr::from_ref(&def.0).cast_mut()),
            )
        }?;
        ty.setattr(name, descr)?;
    }
    Ok(())
}

/// The keyword-names tuple (`("context",)`) asyncio's C module passes when its tasks
/// and futures call `call_soon`; they drop the handle it returns unseen, so calls made
/// with exactly this tuple are queued without a handle object. Learnt once by
/// watching such a call (`probe_asyncio_kwnames`); `None` without the C module.
static ASYNCIO_KWNAMES: PyOnceLock<Option<Py<PyTuple>>> = PyOnceLock::new();
/// While the probe runs, `call_soon` records the keyword names it is called with.
static PROBING: AtomicBool = AtomicBool::new(false);
static PROBED: PyOnceLock<GilCell<Option<Py<PyTuple>>>> = PyOnceLock::new();

fn probed(py: Python<'_>) -> PyResult<std::cell::RefMut<'_, Option<Py<PyTuple>>>> {
    PROBED.get_or_init(py, || GilCell::new(None)).borrow_mut(py)
}

/// Learns `ASYNCIO_KWNAMES`: a C `asyncio.Future` of a throwaway loop gets a done
/// callback and a result, which makes the C module call `call_soon` once. Any failure
/// leaves the fast path off.
pub fn probe_asyncio_kwnames(py: Python<'_>) {
    let learnt = (|| -> PyResult<Option<Py<PyTuple>>> {
        let Ok(c_asyncio) = py.import("_asyncio") else {
            return Ok(None);
        };
        let probe = Bound::new(py, LoopCore::new_core()?)?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("loop", &probe)?;
        let future = c_asyncio.getattr("Future")?.call((), Some(&kwargs))?;
        let noop = py.import("builtins")?.getattr("id")?;
        future.call_method1("add_done_callback", (noop,))?;
        PROBING.store(true, Ordering::Relaxed);
        let scheduled = future.call_method1("set_result", (py.None(),));
        PROBING.store(false, Ordering::Relaxed);
        probe.call_method0("_close_core")?;
        scheduled?;
        let Some(names) = probed(py)?.take() else {
            return Ok(None);
        };
        let names_ref = names.bind(py);
        let only_context = names_ref.len() == 1
            && names_ref.get_item(0)?.cast::<PyString>()?.to_str()? == "context";
        // The interned name is what Python code passes: never taken for asyncio's.
        let interned = names_ref.get_item(0)?.is(pyo3::intern!(py, "context"));
        Ok((only_context && !interned).then_some(names))
    })();
    let _ = ASYNCIO_KWNAMES.set(py, learnt.unwrap_or(None));
}

/// Whether a keyword name is `context`: by identity for the interned name Python code
/// passes, by value for any other (asyncio's C module passes a non-interned one, in a
/// tuple `parse_and_schedule` recognises before it looks at names).
fn is_context_name(name: &Bound<'_, PyAny>) -> PyResult<bool> {
    if name.is(pyo3::intern!(name.py(), "context")) {
        return Ok(true);
    }
    Ok(name.cast::<PyString>()?.to_str()? == "context")
}

/// The `TypeError` of a keyword argument other than `context`.
#[cold]
fn unexpected_keyword(spec: &Spec, name: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!(
        "{}() got an unexpected keyword argument '{}'",
        spec.name, name
    ))
}

/// The `TypeError` of a call with `nargs` positional arguments, fewer than required.
#[cold]
fn missing_arguments(spec: &Spec, nargs: usize) -> PyErr {
    let missing = &spec.required[nargs..];
    let names = missing
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(" and ");
    PyTypeError::new_err(format!(
        "{}() missing {} required positional argument{}: {}",
        spec.name,
        missing.len(),
        if missing.len() == 1 { "" } else { "s" },
        names
    ))
}

/// # Safety
/// `slf` is an instance of `LoopCore` (the method descriptor checks this before the
/// call), and `args`, `nargsf`, `kwnames` follow the vectorcall protocol.
unsafe fn parse_and_schedule(
    py: Python<'_>,
    spec: &Spec,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Py<PyAny>> {
    // SAFETY: `slf` is a live instance of LoopCore or a subclass, borrowed for the call:
    // the method descriptor checked its type before calling us.
    let slf = unsafe { Bound::from_borrowed_ptr(py, slf).cast_into_unchecked::<LoopCore>() };
    let slf = &slf;
    // SAFETY: vectorcall's argument count, with the offset flag masked off.
    let nargs = usize::try_from(unsafe { ffi::PyVectorcall_NARGS(nargsf as usize) }).unwrap_or(0);
    let nkw = if kwnames.is_null() {
        0
    } else {
        // SAFETY: a non-NULL kwnames is a tuple of str.
        usize::try_from(unsafe { ffi::PyTuple_GET_SIZE(kwnames) }).unwrap_or(0)
    };
    let stack: &[*mut ffi::PyObject] = if nargs + nkw == 0 {
        &[]
    } else {
        // SAFETY: vectorcall passes nargs positional values followed by one value per
        // keyword name, all borrowed references alive for the call.
        unsafe { std::slice::from_raw_parts(args, nargs + nkw) }
    };
    // SAFETY: every entry of the stack is a live borrowed reference (see above).
    let arg = |i: usize| unsafe { Bound::from_borrowed_ptr(py, stack[i]) };

    if spec.from_asyncio && nkw == 1 && (nargs == 1 || nargs == 2) {
        if PROBING.load(Ordering::Relaxed) {
            // SAFETY: a non-NULL kwnames is a live tuple, borrowed for the call.
            let names = unsafe { Bound::from_borrowed_ptr(py, kwnames) };
            *probed(py)? = Some(names.cast_into::<PyTuple>()?.unbind());
        } else if ASYNCIO_KWNAMES
            .get(py)
            .and_then(Option::as_ref)
            .is_some_and(|names| names.as_ptr() == kwnames)
        {
            let extra = (nargs == 2).then(|| arg(1));
            return LoopCore::call_soon_from_asyncio(slf, arg(0), extra, arg(nargs));
        }
    }

    let mut context = None;
    for i in 0..nkw {
        // SAFETY: i < len(kwnames); the item is a borrowed str.
        let name = unsafe {
            Bound::from_borrowed_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, i as ffi::Py_ssize_t))
        };
        if !is_context_name(&name)? {
            return Err(unexpected_keyword(spec, &name));
        }
        context = Some(arg(nargs + i));
    }

    let required = spec.required.len();
    if nargs < required {
        return Err(missing_arguments(spec, nargs));
    }
    let leading = (required == 2).then(|| arg(0));
    let callback = arg(required - 1);
    let call_args = match nargs - required {
        0 => None,
        1 => Some(CallArgs::One(arg(required).unbind())),
        _ => Some(CallArgs::Many(
            PyTuple::new(py, (required..nargs).map(arg))?.unbind(),
        )),
    };
    (spec.schedule)(slf, leading.as_ref(), callback, call_args, context)
}
