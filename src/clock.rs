//! The loop's clock and deadlines: `loop.time()` is `CLOCK_MONOTONIC` in seconds, the
//! clock of `time.monotonic()`, unless a test patched `time` on the loop (or a
//! subclass overrides it), in which case the turn and `call_later` read that one, as
//! asyncio's `self.time()` does.

use std::sync::atomic::Ordering;

use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyInt};

use crate::event_loop::LoopCore;

/// `CLOCK_MONOTONIC` in seconds: the clock of `time.monotonic()`.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // Whole nanoseconds divided once, as `time.monotonic()` converts them: the two give
    // the very same float for the same instant.
    #[allow(clippy::useless_conversion)] // time_t and c_long are not i64 on every target
    let ns = i64::from(ts.tv_sec) * 1_000_000_000 + i64::from(ts.tv_nsec);
    ns as f64 / 1e9
}

pub(crate) fn clock_resolution() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `monotonic`.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut ts) };
    let res = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    if res > 0.0 {
        res
    } else {
        1e-9
    }
}

/// A delay or deadline as asyncio computes it: `base + value`, with Python's own
/// arithmetic for anything that is not a plain int or float.
pub(crate) fn deadline(py: Python<'_>, base: f64, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    // An exact float by pointer comparison, then int by its type flag: the subclass
    // test for float walks the type's bases, which an int delay would pay for.
    if let Ok(f) = value.cast_exact::<PyFloat>() {
        return Ok(base + f.value());
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(base + value.extract::<f64>()?);
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        return Ok(base + f.value());
    }
    let sum = PyFloat::new(py, base).add(value)?;
    sum.extract::<f64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "unsupported deadline type: {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

impl LoopCore {
    /// The loop's clock: `CLOCK_MONOTONIC`, or the `time` a test patched in.
    #[inline]
    pub(crate) fn now(slf: &Bound<'_, LoopCore>) -> PyResult<f64> {
        if slf.get().custom_clock.load(Ordering::Relaxed) {
            LoopCore::patched_time(slf)
        } else {
            Ok(monotonic())
        }
    }

    /// A patched or overridden `time()`, kept out of line: the turn's code stays as
    /// small as without it.
    #[cold]
    #[inline(never)]
    fn patched_time(slf: &Bound<'_, LoopCore>) -> PyResult<f64> {
        slf.call_method0(intern!(slf.py(), "time"))?.extract()
    }

    /// The patched clock's reading for the poll timeout, taken where asyncio calls
    /// `self.time()` for it: nothing ready, not stopping, timers scheduled.
    #[cold]
    #[inline(never)]
    pub(crate) fn patched_now_for_timeout(slf: &Bound<'_, LoopCore>) -> PyResult<Option<f64>> {
        let core = slf.get();
        let needed = {
            let st = core.state.borrow_mut(slf.py())?;
            st.ready.is_empty() && !core.stopping.load(Ordering::Relaxed) && st.timers.len() > 0
        };
        if needed {
            LoopCore::patched_time(slf).map(Some)
        } else {
            Ok(None)
        }
    }
}
