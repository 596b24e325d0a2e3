//! Free lists for `Handle` and `TimerHandle`, installed as the types' `tp_alloc` and
//! `tp_free`.
//!
//! Every task step and every timer allocates a handle. PyO3's own `freelist` option
//! guards its list with a mutex, and when `call_soon_threadsafe` allocates handles on one
//! thread that the loop frees on another, the mutex's cache line moves between cores
//! on every call. These lists are touched only by the interpreter's allocation slots,
//! which run with the GIL held, so they need no lock at all.
//!
//! A burst (a thread posting tens of thousands of `call_soon_threadsafe` callbacks
//! between two switches of the GIL, thousands of timers armed at once) frees as many
//! handles as it made; handed back to the allocator, they empty its arenas, which go
//! back to the kernel and are faulted in again by the next burst, a third of the cost
//! of such a burst. The lists therefore keep up to `MAX_KEPT` objects, and give back
//! what a busy program does not reuse: once a second, when the loop is about to wait,
//! each list frees the objects that stayed unused since the last such check
//! (`decay`), and a closing loop trims them to their floor (`trim`).

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::gil_cell::GilCell;

/// The most objects a list keeps.
const MAX_KEPT: usize = 32 * 1024;

/// Seconds between two `decay` passes.
const DECAY_INTERVAL_S: f64 = 1.0;

/// Freed objects of one exact type, kept for reuse.
struct FreeList {
    ty: AtomicPtr<ffi::PyTypeObject>,
    objects: UnsafeCell<Objects>,
    /// Kept however long they stay unused.
    floor: usize,
}

struct Objects {
    free: Vec<*mut ffi::PyObject>,
    /// The fewest objects the list held since the last `decay`: those above it were
    /// not needed in that time.
    low_water: usize,
}

// SAFETY: `objects` is touched only by `alloc` and `free`, which the interpreter calls
// as `tp_alloc`/`tp_free` with the GIL held (the module is declared `gil_used`, so the
// GIL exists even on free-threaded builds): never by two threads at once. The raw
// pointers are objects owned by the list.
unsafe impl Sync for FreeList {}

impl FreeList {
    const fn new(floor: usize) -> FreeList {
        FreeList {
            ty: AtomicPtr::new(ptr::null_mut()),
            objects: UnsafeCell::new(Objects {
                free: Vec::new(),
                low_water: 0,
            }),
            floor,
        }
    }

    /// `tp_alloc`: a freed object of the exact type if there is one (zeroed and
    /// initialised as `PyType_GenericAlloc` leaves it, but not tracked by the cyclic
    /// GC; the loop sets each handle's tracking itself), else the generic allocator.
    ///
    /// # Safety
    /// Called as `tp_alloc`, with the GIL held.
    unsafe fn alloc(
        &self,
        subtype: *mut ffi::PyTypeObject,
        nitems: ffi::Py_ssize_t,
    ) -> *mut ffi::PyObject {
        if nitems == 0 && subtype == self.ty.load(Ordering::Relaxed) {
            // SAFETY: the GIL is held (see the `Sync` impl).
            let objects = unsafe { &mut *self.objects.get() };
            if let Some(obj) = objects.free.pop() {
                objects.low_water = objects.low_water.min(objects.free.len());
                // SAFETY: `obj` was an object of exactly `subtype`, freed by `free`
                // (deallocated, untracked, its memory still allocated); its size is the
                // type's basicsize. Zeroing and `PyObject_Init` leave it as a fresh
                // allocation would, holding a new reference to its heap type.
                unsafe {
                    let size = usize::try_from((*subtype).tp_basicsize).unwrap_or(0);
                    ptr::write_bytes(obj.cast::<u8>(), 0, size);
                    ffi::PyObject_Init(obj, subtype);
                }
                return obj;
            }
        }
        // SAFETY: the generic allocator, as the type would use without this list.
        unsafe { ffi::PyType_GenericAlloc(subtype, nitems) }
    }

    /// `tp_free`: keeps an object of the exact type (up to `MAX_KEPT`), else frees it.
    ///
    /// # Safety
    /// Called as `tp_free` on a deallocated GC object, with the GIL held.
    unsafe fn free(&self, obj: *mut c_void) {
        let obj = obj.cast::<ffi::PyObject>();
        // SAFETY: the GIL is held (see the `Sync` impl); `obj` is a deallocated object
        // whose header (and so its type pointer) is still intact.
        unsafe {
            let objects = &mut *self.objects.get();
            if ffi::Py_TYPE(obj) == self.ty.load(Ordering::Relaxed) && objects.free.len() < MAX_KEPT
            {
                objects.free.push(obj);
            } else {
                ffi::PyObject_GC_Del(obj.cast());
            }
        }
    }

    /// Frees the objects beyond `keep(low water, length)`, and starts a new period.
    fn shrink(&self, _py: Python<'_>, keep: impl FnOnce(usize, usize) -> usize) {
        // SAFETY: the GIL is held (the token proves it; see the `Sync` impl).
        let objects = unsafe { &mut *self.objects.get() };
        let keep = keep(objects.low_water, objects.free.len()).max(self.floor);
        while objects.free.len() > keep {
            if let Some(obj) = objects.free.pop() {
                // SAFETY: a deallocated, untracked GC object the list owned, freed as
                // `tp_free` would have without the list.
                unsafe { ffi::PyObject_GC_Del(obj.cast()) };
            }
        }
        objects.low_water = objects.free.len();
    }

    fn holds_surplus(&self, _py: Python<'_>) -> bool {
        // SAFETY: the GIL is held (see the `Sync` impl).
        unsafe { (*self.objects.get()).free.len() > self.floor }
    }
}

static HANDLES: FreeList = FreeList::new(1024);
static TIMER_HANDLES: FreeList = FreeList::new(256);

/// When `decay` last ran (monotonic seconds), read and written with the GIL held.
static LAST_DECAY: GilCell<f64> = GilCell::new(0.0);

/// Called by a loop about to wait in the poller. Once per `DECAY_INTERVAL_S`, frees
/// the objects that stayed unused since the last pass. Returns whether the lists still
/// hold more than their floor, in which case the loop should not wait longer than
/// `DECAY_INTERVAL_S` (so that an idle program gives the memory back). With nothing
/// above the floor it returns at once, without reading the clock `now` gives.
pub fn decay(py: Python<'_>, now: impl FnOnce() -> f64) -> bool {
    if !(HANDLES.holds_surplus(py) || TIMER_HANDLES.holds_surplus(py)) {
        return false;
    }
    let Ok(mut last) = LAST_DECAY.borrow_mut(py) else {
        return false;
    };
    let now = now();
    if now - *last >= DECAY_INTERVAL_S {
        *last = now;
        for list in [&HANDLES, &TIMER_HANDLES] {
            list.shrink(py, |low_water, len| len.saturating_sub(low_water));
        }
    }
    HANDLES.holds_surplus(py) || TIMER_HANDLES.holds_surplus(py)
}

/// Trims the lists to their floor: a loop is closing.
pub fn trim(py: Python<'_>) {
    for list in [&HANDLES, &TIMER_HANDLES] {
        list.shrink(py, |_, _| 0);
    }
}

unsafe extern "C" fn handle_alloc(
    subtype: *mut ffi::PyTypeObject,
    nitems: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: called by the interpreter as tp_alloc.
    unsafe { HANDLES.alloc(subtype, nitems) }
}

unsafe extern "C" fn handle_free(obj: *mut c_void) {
    // SAFETY: called by the interpreter as tp_free.
    unsafe { HANDLES.free(obj) }
}

unsafe extern "C" fn timer_handle_alloc(
    subtype: *mut ffi::PyTypeObject,
    nitems: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: called by the interpreter as tp_alloc.
    unsafe { TIMER_HANDLES.alloc(subtype, nitems) }
}

unsafe extern "C" fn timer_handle_free(obj: *mut c_void) {
    // SAFETY: called by the interpreter as tp_free.
    unsafe { TIMER_HANDLES.free(obj) }
}

type AllocFn = unsafe extern "C" fn(*mut ffi::PyTypeObject, ffi::Py_ssize_t) -> *mut ffi::PyObject;
type FreeFn = unsafe extern "C" fn(*mut c_void);

/// Installs the lists on the two handle types, before any handle exists.
pub fn install(handle: &Bound<'_, PyType>, timer_handle: &Bound<'_, PyType>) -> PyResult<()> {
    let lists: [(&Bound<'_, PyType>, &FreeList, AllocFn, FreeFn); 2] = [
        (handle, &HANDLES, handle_alloc, handle_free),
        (
            timer_handle,
            &TIMER_HANDLES,
            timer_handle_alloc,
            timer_handle_free,
        ),
    ];
    for (ty, list, alloc, free) in lists {
        let raw = ty.as_type_ptr();
        list.ty.store(raw, Ordering::Relaxed);
        // SAFETY: `raw` is a live heap type of this module with no instances yet; its
        // slots may be replaced, after which PyType_Modified drops cached lookups.
        // Both functions match the slots' signatures.
        unsafe {
            (*raw).tp_alloc = Some(alloc);
            (*raw).tp_free = Some(free);
            ffi::PyType_Modified(raw);
        }
    }
    Ok(())
}
