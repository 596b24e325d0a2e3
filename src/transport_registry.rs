//! Native transports on the loop: what the registry holds for one, claiming an fd for
//! it, changing its interest, letting it go, and the list of those written to during a
//! turn, flushed at its end.

use std::os::fd::RawFd;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{closed_loop, os_error};
use crate::event_loop::{FdOwner, LoopCore};
use crate::poller::{Interest, Readiness, Token};
use crate::transports::datagram::DatagramTransport;
use crate::transports::stream::StreamTransport;

/// A transport implemented in Rust, which handles its fd's readiness itself.
pub(crate) enum NativeTransport {
    Stream(Py<StreamTransport>),
    Datagram(Py<DatagramTransport>),
}

impl NativeTransport {
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> NativeTransport {
        match self {
            NativeTransport::Stream(t) => NativeTransport::Stream(t.clone_ref(py)),
            NativeTransport::Datagram(t) => NativeTransport::Datagram(t.clone_ref(py)),
        }
    }

    pub(crate) fn on_ready(&self, py: Python<'_>, events: Readiness) -> PyResult<()> {
        match self {
            NativeTransport::Stream(t) => StreamTransport::on_ready(t.bind(py), events),
            NativeTransport::Datagram(t) => DatagramTransport::on_ready(t.bind(py), events),
        }
    }

    pub(crate) fn as_any<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        match self {
            NativeTransport::Stream(t) => t.bind(py).as_any(),
            NativeTransport::Datagram(t) => t.bind(py).as_any(),
        }
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            NativeTransport::Stream(t) => visit.call(t),
            NativeTransport::Datagram(t) => visit.call(t),
        }
    }
}

impl LoopCore {
    /// Claims `fd` for a transport. Callbacks added with `add_reader`/`add_writer` on it
    /// are cancelled (the transport takes over the fd, as asyncio's would); an fd already
    /// owned by another live transport is an error.
    pub(crate) fn register_transport(
        &self,
        py: Python<'_>,
        fd: RawFd,
        transport: NativeTransport,
    ) -> PyResult<Token> {
        let replaced = {
            let mut st = self.state.borrow_mut(py)?;
            let st = &mut *st;
            let Some(poller) = &st.poller else {
                return Err(closed_loop());
            };
            let replaced = match st.fds.token_of(fd) {
                Some(token) => match st.fds.get_mut(token) {
                    Some((FdOwner::Transport(other), _)) => {
                        let other = other.clone_ref(py);
                        return Err(fd_in_use(fd, other.as_any(py)));
                    }
                    _ => poller.deregister(&mut st.fds, token),
                },
                None => None,
            };
            let token = poller
                .register(
                    &mut st.fds,
                    fd,
                    Interest::NONE,
                    FdOwner::Transport(transport),
                )
                .map_err(os_error)?;
            (token, replaced)
        };
        let (token, replaced) = replaced;
        if let Some(FdOwner::Callbacks(cbs)) = replaced {
            cbs.retire(py)?;
        }
        Ok(token)
    }

    pub(crate) fn set_transport_interest(
        &self,
        py: Python<'_>,
        token: Token,
        interest: Interest,
    ) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        match &st.poller {
            Some(poller) => poller
                .set_interest(&mut st.fds, token, interest)
                .map_err(os_error),
            None => Ok(()),
        }
    }

    pub(crate) fn deregister_transport(&self, py: Python<'_>, token: Token) -> PyResult<()> {
        let released = {
            let mut st = self.state.borrow_mut(py)?;
            let st = &mut *st;
            match &st.poller {
                Some(poller) => poller.deregister(&mut st.fds, token),
                None => None,
            }
        };
        drop(released);
        Ok(())
    }

    /// The open connections `server` accepted (`Server.close_clients` and
    /// `abort_clients`): the fd registry already holds every live transport, so the
    /// server keeps no set of its own.
    pub(crate) fn server_transports(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<StreamTransport>>> {
        let transports: Vec<Py<StreamTransport>> = self
            .state
            .borrow_mut(py)?
            .fds
            .owners()
            .filter_map(|owner| match owner {
                FdOwner::Transport(NativeTransport::Stream(t)) => Some(t.clone_ref(py)),
                _ => None,
            })
            .collect();
        let mut served = Vec::new();
        for transport in transports {
            if transport.get().server_is(py, server)? {
                served.push(transport);
            }
        }
        Ok(served)
    }
}

pub(crate) fn fd_in_use(fd: RawFd, transport: &Bound<'_, PyAny>) -> PyErr {
    let repr = transport.repr().map(|r| r.to_string()).unwrap_or_default();
    PyRuntimeError::new_err(format!("File descriptor {fd} is used by transport {repr}"))
}

/// The turn's flush list: transports written to during a turn send at its end.
impl LoopCore {
    /// Puts a transport on the list flushed at the end of the turn.
    pub(crate) fn queue_flush(
        &self,
        py: Python<'_>,
        transport: Py<StreamTransport>,
    ) -> PyResult<()> {
        self.state.borrow_mut(py)?.flush.push(transport);
        Ok(())
    }

    /// The last step of a turn: one send per transport written to during it. The list's
    /// allocation is kept for the next turn.
    pub(crate) fn flush_transports(&self, py: Python<'_>) -> PyResult<()> {
        let mut pending = {
            let mut st = self.state.borrow_mut(py)?;
            if st.flush.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut st.flush)
        };
        let mut outcome = Ok(());
        for transport in pending.drain(..) {
            if outcome.is_ok() {
                outcome = StreamTransport::flush_if_queued(transport.bind(py));
            }
        }
        let mut st = self.state.borrow_mut(py)?;
        if st.flush.is_empty() {
            st.flush = pending;
        }
        outcome
    }
}
