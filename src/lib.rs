//! ferroloop: Python's asyncio event loop in Rust. This file only registers the module.

mod accept;
mod asyncgens;
mod clock;
mod errors;
mod event_loop;
mod fastcall;
mod freelist;
mod fs_ops;
mod gil_cell;
mod handles;
mod libssl;
mod loop_attrs;
mod poller;
mod pyhelpers;
mod ready;
mod scheduling;
mod sock_ops;
mod sockaddr;
mod stats;
mod sys;
mod timers;
mod tls;
mod transport_registry;
mod transports;
mod waiters;
mod watchdog;

use pyo3::prelude::*;

#[pymodule(gil_used = true)]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::LoopCore>()?;
    fastcall::install(&m.py().get_type::<event_loop::LoopCore>())?;
    m.add_function(wrap_pyfunction!(fastcall::bind_methods_to, m)?)?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    freelist::install(
        &m.py().get_type::<handles::Handle>(),
        &m.py().get_type::<handles::TimerHandle>(),
    )?;
    // Makes one handle: after the free lists are in place.
    fastcall::probe_asyncio_kwnames(m.py());
    m.add_function(wrap_pyfunction!(tls::ssl_protocol_methods, m)?)?;
    m.add_class::<tls::TlsState>()?;
    m.add_function(wrap_pyfunction!(libssl::native_tls_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(fs_ops::stat_path, m)?)?;
    m.add_function(wrap_pyfunction!(fs_ops::unlink_path, m)?)?;
    m.add_function(wrap_pyfunction!(fs_ops::sendfile, m)?)?;
    m.add_function(wrap_pyfunction!(accept::accept_connections, m)?)?;
    m.add_class::<transports::stream::StreamTransport>()?;
    m.add_class::<transports::datagram::DatagramTransport>()?;
    Ok(())
}
