//! The few pieces of the standard library the Rust core calls on its cold paths
//! (debug mode, error reports, reprs), imported once.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

static EXTRACT_STACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FORMAT_CALLBACK_SOURCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

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
