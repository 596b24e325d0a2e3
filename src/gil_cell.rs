//! Interior mutability for state that only the thread holding the GIL touches.

use std::cell::{RefCell, RefMut};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// A `RefCell` that may live inside a `#[pyclass]`.
///
/// Callers must hold the GIL (they pass a `Python` token) and must not keep a borrow
/// alive across `Python::detach` or across a call into Python code. A borrow taken
/// while another one is alive (re-entrancy through a Python callback or a `__del__`)
/// is reported as `RuntimeError`, never as undefined behaviour.
pub struct GilCell<T>(RefCell<T>);

// SAFETY: the RefCell is only reached through `borrow_mut`, which requires a `Python`
// token, so only the thread currently holding the GIL can touch it. The extension is
// declared `gil_used`, so on free-threaded builds the interpreter re-enables the GIL,
// and no borrow is held while the GIL is released (see the type's contract).
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub const fn new(value: T) -> Self {
        GilCell(RefCell::new(value))
    }

    /// Borrow mutably; fails with `RuntimeError` on re-entrant access.
    #[inline]
    pub fn borrow_mut<'a>(&'a self, _py: Python<'_>) -> PyResult<RefMut<'a, T>> {
        self.0
            .try_borrow_mut()
            .map_err(|_| PyRuntimeError::new_err("ferroloop: re-entrant access to loop state"))
    }
}

impl<T> GilCell<T> {
    /// For `__traverse__`, which the collector calls with the GIL held but without a
    /// `Python` token. `None` if a borrow is active (the object is being updated).
    pub fn borrow_for_gc(&self) -> Option<std::cell::Ref<'_, T>> {
        self.0.try_borrow().ok()
    }

    /// For `__clear__`, under the same conditions as `borrow_for_gc`.
    pub fn borrow_mut_for_gc(&self) -> Option<RefMut<'_, T>> {
        self.0.try_borrow_mut().ok()
    }
}
