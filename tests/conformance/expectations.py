"""What CPython's test_asyncio is not expected to pass on ferroloop, and why.

Two kinds:
- "xfail": behaviour ferroloop does not have yet; the reason names what it waits for.
  A listed test that starts passing fails the run, so the list stays true.
- "skip": the test checks asyncio's private internals rather than behaviour.
Keys are "Class.test_method" or a bare "test_method" (any class).
"""

from __future__ import annotations

UDP = "waits for the datagram transport"
PIPES = "waits for the pipe transports"
SUBPROCESS = "waits for subprocess support"
INTERNALS = "checks asyncio's private internals, not behaviour"

COMMON: dict[str, tuple[str, str]] = {
    "test_timeout_rounding": ("skip", INTERNALS),
    "test_internal_fds": ("skip", INTERNALS),
    "test_prompt_cancellation": ("skip", INTERNALS),
    "test_log_destroyed_pending_task": ("skip", INTERNALS),
    "test_issue46672": ("skip", INTERNALS),
}

MODULES: dict[str, dict[str, tuple[str, str]]] = {
    "test_events": {
        "test_bidirectional_pty": ("xfail", PIPES),
        "test_create_datagram_endpoint": ("xfail", UDP),
        "test_create_datagram_endpoint_ipv6": ("xfail", UDP),
        "test_create_datagram_endpoint_sock": ("xfail", UDP),
        "test_read_pipe": ("xfail", PIPES),
        "test_read_pty_output": ("xfail", PIPES),
        "test_subprocess_close_after_finish": ("xfail", SUBPROCESS),
        "test_subprocess_close_client_stream": ("xfail", SUBPROCESS),
        "test_subprocess_exec": ("xfail", SUBPROCESS),
        "test_subprocess_exitcode": ("xfail", SUBPROCESS),
        "test_subprocess_interactive": ("xfail", SUBPROCESS),
        "test_subprocess_kill": ("xfail", SUBPROCESS),
        "test_subprocess_send_signal": ("xfail", SUBPROCESS),
        "test_subprocess_shell": ("xfail", SUBPROCESS),
        "test_subprocess_stderr": ("xfail", SUBPROCESS),
        "test_subprocess_stderr_redirect_to_stdout": ("xfail", SUBPROCESS),
        "test_subprocess_terminate": ("xfail", SUBPROCESS),
        "test_subprocess_wait_no_same_group": ("xfail", SUBPROCESS),
        "test_unclosed_pipe_transport": ("xfail", PIPES),
        "test_write_pipe": ("xfail", PIPES),
        "test_write_pipe_disconnect_on_close": ("xfail", PIPES),
        "test_write_pty": ("xfail", PIPES),
    },
    "test_streams": {
        "test_read_all_from_pipe_reader": ("xfail", PIPES),
        # Counts ResourceWarnings during a gc.collect(); the pipe file left open by the
        # failing pipe test above is collected then and adds a second warning.
        "test_unclosed_resource_warnings": ("xfail", PIPES),
    },
    "test_sendfile": {
        "test_sendfile_not_supported": ("xfail", UDP),
    },
}


def for_module(module: str) -> dict[str, tuple[str, str]]:
    marks = dict(COMMON)
    marks.update(MODULES.get(module, {}))
    return marks
