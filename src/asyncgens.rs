//! The loop's `firstiter` async-generator hook, which the interpreter calls each time an
//! async generator is first iterated while the loop runs. Frameworks start one per
//! message (every `@asynccontextmanager` is one: websockets opens one per frame sent),
//! so asyncio's Python hook, and the Python `WeakSet.add` it calls, were frames on the
//! per-message path. This one keeps asyncio's semantics: the `ResourceWarning` once
//! `shutdown_asyncgens` has been called, and the generator added to the loop's
//! `_asyncgens` weak set, which `shutdown_asyncgens` reads.

use pyo3::exceptions::PyResourceWarning;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PySet, PyWeakrefReference};

use crate::event_loop::LoopCore;

static WEAK_SET: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static WARN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// asyncio's `_asyncgen_firstiter_hook`.
pub(crate) fn firstiter(slf: &Bound<'_, LoopCore>, agen: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    if slf
        .getattr(intern!(py, "_asyncgens_shutdown_called"))?
        .is_truthy()?
    {
        warn_after_shutdown(slf, agen)?;
    }
    add_weakly(&slf.getattr(intern!(py, "_asyncgens"))?, agen)
}

/// `asyncgens.add(agen)`. For a `weakref.WeakSet` with no removals pending (the
/// removals it defers while iterated, which its `add` commits first), what its `add`
/// does is done here: a weak reference with the set's own `_remove` callback goes into
/// its `data`. Anything else (a subclass, a set put there by a test) gets its `add`.
fn add_weakly(asyncgens: &Bound<'_, PyAny>, agen: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = asyncgens.py();
    let weak_set = WEAK_SET.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("weakref")?.getattr("WeakSet")?.unbind())
    })?;
    // A WeakSet whose internals are not these (another Python's) gets its `add`.
    let no_removals_pending = || -> PyResult<bool> {
        match asyncgens.getattr_opt(intern!(py, "_pending_removals"))? {
            Some(pending) => Ok(!pending.is_truthy()?),
            None => Ok(false),
        }
    };
    if asyncgens.get_type().is(weak_set.bind(py)) && no_removals_pending()? {
        let data = asyncgens.getattr_opt(intern!(py, "data"))?;
        let callback = asyncgens.getattr_opt(intern!(py, "_remove"))?;
        if let (Some(data), Some(callback)) = (data, callback) {
            if let Ok(data) = data.cast::<PySet>() {
                return data.add(PyWeakrefReference::new_with(agen, callback)?);
            }
        }
    }
    asyncgens
        .call_method1(intern!(py, "add"), (agen,))
        .map(drop)
}

/// The warning asyncio gives for a generator started after `shutdown_asyncgens`, with
/// the loop as its source.
fn warn_after_shutdown(slf: &Bound<'_, LoopCore>, agen: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let warn = WARN.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("warnings")?.getattr("warn")?.unbind())
    })?;
    let message = format!(
        "asynchronous generator {} was scheduled after loop.shutdown_asyncgens() call",
        agen.repr()?
    );
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "source"), slf)?;
    warn.bind(py)
        .call((message, py.get_type::<PyResourceWarning>()), Some(&kwargs))?;
    Ok(())
}
