//! The read path of a `Protocol`: one `recv` into a reused buffer, copied into the
//! `bytes` that `data_received` takes.

use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::{call_method_one, Outcome, Reader, Sink};

/// Bytes read per readiness event: asyncio's `max_size`. One read per event keeps one
/// fast peer from starving the others.
const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// The buffer every `Protocol` read lands in before it is copied into the `bytes`
    /// handed to `data_received`: one allocation per read, the `bytes` itself.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_READ]);
}

/// `data_received(bytes)`.
pub(crate) struct DataSink;

impl Sink for DataSink {
    type Got<'py> = Bound<'py, PyBytes>;
    const DELIVERY_FAILED: &'static str = "Fatal error: protocol.data_received() call failed.";

    #[inline]
    fn receive<'py>(reader: &mut Reader<'_, 'py>) -> Outcome<Bound<'py, PyBytes>> {
        let py = reader.protocol.py();
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            reader.recv(&mut buf).map(|n| PyBytes::new(py, &buf[..n]))
        })
    }

    #[inline]
    fn deliver<'py>(protocol: &Bound<'py, PyAny>, data: Bound<'py, PyBytes>) -> PyResult<()> {
        let name = pyo3::intern!(protocol.py(), "data_received");
        call_method_one(protocol, name, data.as_any()).map(drop)
    }
}
