"""What a TLS connection runs once, outside its records: ferroloop's `SSLProtocol`
makes asyncio's `__init__` helpers inline, and `_set_state` and the end of a handshake
in Rust, with asyncio's results (the attributes, the transitions and their errors, the
extra info)."""

from __future__ import annotations

import asyncio
import collections
import ssl
import sys
from asyncio import sslproto

import pytest
from ferroloop import _ferroloop

from tests.test_tls import server_context

certs = pytest.importorskip("test.test_asyncio.utils")

OWN_SSLPROTO = (3, 11) <= sys.version_info < (3, 14)
# False with FERROLOOP_NATIVE_TLS=0: handshakes end in asyncio's Python method.
NATIVE = OWN_SSLPROTO and _ferroloop.native_tls_unavailable() is None
pytestmark = pytest.mark.skipif(
    not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version"
)


def protocol_class(loop_name):
    if loop_name == "ferroloop":
        from ferroloop._sslproto import SSLProtocol

        return SSLProtocol
    return sslproto.SSLProtocol


def attributes(proto):
    """What asyncio's `__init__` assigns, comparable across two protocols: objects
    made per protocol by their type, the rest by value."""
    made = ("_incoming", "_outgoing", "_sslobj", "_write_backlog", "_app_transport")
    names = (
        "_server_side",
        "_server_hostname",
        "_sslcontext",
        "_extra",
        "_write_buffer_size",
        "_waiter",
        "_loop",
        "_app_protocol",
        "_app_protocol_is_buffer",
        "_app_transport_created",
        "_transport",
        "_ssl_handshake_timeout",
        "_ssl_shutdown_timeout",
        "_state",
        "_conn_lost",
        "_app_state",
        "_ssl_writing_paused",
        "_app_reading_paused",
        "_ssl_reading_paused",
        "_incoming_high_water",
        "_incoming_low_water",
        "_eof_received",
        "_app_writing_paused",
        "_outgoing_high_water",
        "_outgoing_low_water",
    )
    got = {name: getattr(proto, name) for name in names}
    got.update((name, type(getattr(proto, name)).__mro__[-2]) for name in made)
    got["_write_backlog"] = list(proto._write_backlog)
    got["_sslobj.server_side"] = proto._sslobj.server_side
    got["_sslobj.server_hostname"] = proto._sslobj.server_hostname
    got["_app_transport._ssl_protocol"] = proto._app_transport._ssl_protocol is proto
    if proto._app_protocol_is_buffer:
        got["get_buffer"] = proto._app_protocol_get_buffer
        got["buffer_updated"] = proto._app_protocol_buffer_updated
    return got


class Buffered(asyncio.BufferedProtocol):
    def get_buffer(self, sizehint):
        return bytearray(16)

    def buffer_updated(self, nbytes):
        pass


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_side": True},
        {"server_side": False, "server_hostname": "localhost", "call_connection_made": False},
        {"server_side": True, "server_hostname": "ignored", "ssl_handshake_timeout": 5.0},
        {"server_side": False, "ssl_shutdown_timeout": 1.5},
    ],
)
@pytest.mark.parametrize("app", [asyncio.Protocol, Buffered])
def test_init_assigns_what_asyncios_assigns(loop, loop_name, kwargs, app):
    app_protocol = app()
    ctx = server_context() if kwargs["server_side"] else ssl.create_default_context()
    waiter = loop.create_future()
    ours = protocol_class(loop_name)(loop, app_protocol, ctx, waiter, **kwargs)
    theirs = sslproto.SSLProtocol(loop, app_protocol, ctx, waiter, **kwargs)
    assert attributes(ours) == attributes(theirs)
    assert ours._state is sslproto.SSLProtocolState.UNWRAPPED
    assert ours._incoming_high_water == 256 * 1024 and ours._outgoing_low_water == 128 * 1024
    ours._app_transport.close()
    theirs._app_transport.close()


@pytest.mark.parametrize("name", ["ssl_handshake_timeout", "ssl_shutdown_timeout"])
def test_init_refuses_what_asyncio_refuses(loop, loop_name, name):
    def error(cls):
        with pytest.raises(ValueError) as info:
            cls(loop, asyncio.Protocol(), server_context(), None, True, **{name: 0})
        return str(info.value)

    assert error(protocol_class(loop_name)) == error(sslproto.SSLProtocol)
    assert error(protocol_class(loop_name)) == f"{name} should be a positive number, got 0"


def test_set_state_allows_and_refuses_what_asyncio_does(loop, loop_name):
    states = list(sslproto.SSLProtocolState)

    def table(cls):
        proto = cls(loop, asyncio.Protocol(), server_context(), None, True)
        outcomes = {}
        for current in states:
            for new in [*states, "WRAPPED"]:
                proto._state = current
                try:
                    proto._set_state(new)
                except RuntimeError as exc:
                    outcomes[current, new] = str(exc), proto._state
                else:
                    outcomes[current, new] = proto._state
        proto._app_transport.close()
        return outcomes

    ours = table(protocol_class(loop_name))
    assert ours == table(sslproto.SSLProtocol)
    wrapped = sslproto.SSLProtocolState.WRAPPED
    assert ours[wrapped, sslproto.SSLProtocolState.FLUSHING] is sslproto.SSLProtocolState.FLUSHING
    assert ours[wrapped, "WRAPPED"] == (
        "cannot switch state from SSLProtocolState.WRAPPED to WRAPPED",
        wrapped,
    )


def test_a_connection_runs_none_of_the_replaced_python_steps(loop, loop_name):
    """The Python functions a server's TLS connection no longer calls on ferroloop
    (asyncio's run them all)."""
    helpers = {
        "_set_state",
        "_on_handshake_complete",
        "_wakeup_waiter",
    }
    ssl_helpers = {"_msg_callback", "getpeercert", "cipher", "compression"}
    calls = collections.Counter()

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call":
            return
        counted = {sslproto.__file__: helpers, ssl.__file__: ssl_helpers}
        if code.co_name in counted.get(code.co_filename, ()):
            calls[code.co_name] += 1

    sys.setprofile(profile)
    try:
        loop.run_until_complete(asyncio.wait_for(one_connection(loop, extra_info=None), 30))
    finally:
        sys.setprofile(None)
    if loop_name == "ferroloop" and NATIVE:
        # connection_lost's _wakeup_waiter, on both sides.
        assert calls == {"_wakeup_waiter": 2}
    elif loop_name == "ferroloop":
        handshake_ends = ("_on_handshake_complete", "getpeercert", "cipher", "compression")
        assert calls == {"_wakeup_waiter": 4, **dict.fromkeys(handshake_ends, 2)}
    else:
        assert calls["_set_state"] >= 8
        assert calls["_on_handshake_complete"] == calls["getpeercert"] == 2


def extra_info(writer):
    sslobj = writer.get_extra_info("ssl_object")
    assert isinstance(sslobj, ssl.SSLObject)
    got = {
        name: writer.get_extra_info(name)
        for name in ("peercert", "cipher", "compression", "sslcontext")
    }
    assert got["peercert"] == sslobj.getpeercert()
    assert got["cipher"] == sslobj.cipher() and len(got["cipher"]) == 3
    assert got["compression"] == sslobj.compression()
    assert got["sslcontext"] is sslobj.context
    got["ssl_object"] = type(sslobj)
    got["sslcontext"] = None
    return got


async def one_connection(loop, extra_info=extra_info):
    """One echo over TLS; what `extra_info` gives for both sides' writers."""
    extra_info = extra_info or (lambda writer: None)
    done = loop.create_future()

    async def serve(reader, writer):
        writer.write(await reader.readexactly(4))
        await reader.read()
        done.set_result(extra_info(writer))
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context())
    reader, writer = await asyncio.open_connection(
        *server.sockets[0].getsockname(),
        ssl=ssl.create_default_context(cafile=certs.SIGNING_CA),
        server_hostname="localhost",
    )
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    client = extra_info(writer)
    writer.close()
    await writer.wait_closed()
    served = await done
    server.close()
    await server.wait_closed()
    return client, served


@pytest.mark.parametrize("debug", [False, True])
def test_the_extra_info_after_the_handshake_is_asyncios(loop, debug):
    loop.set_debug(debug)
    client, served = loop.run_until_complete(asyncio.wait_for(one_connection(loop), 30))
    assert client["peercert"]["subject"] == (
        (("countryName", "XY"),),
        (("localityName", "Castle Anthrax"),),
        (("organizationName", "Python Software Foundation"),),
        (("commonName", "localhost"),),
    )
    # The server asks for no client certificate.
    assert served["peercert"] is None
    assert client["cipher"] == served["cipher"]
