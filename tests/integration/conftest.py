"""Real servers for the integration tests, on 127.0.0.1 only, in temporary directories.

A missing server binary is a failure, not a skip: `make test` installs PostgreSQL and
Redis first (scripts/ensure-servers.sh)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def find_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"{name} is not installed (make test installs it: scripts/ensure-servers.sh)")
    return found


def serve(argv, port: int, what: str, workdir: str, preexec_fn=None):
    """Runs a server process until the generator is closed, then stops it and removes
    its working directory; yields once it listens on `port`."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec_fn,  # noqa: PLW1509 - the test process has no threads yet here
    )
    try:
        wait_for_port(port, proc, what)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_port():
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ferroloop-redis-")
    argv = [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir]
    yield from serve(argv, port, "redis-server", workdir)


@pytest.fixture(scope="session")
def postgres_port():
    """A throwaway PostgreSQL cluster with trust authentication on 127.0.0.1."""
    initdb, postgres = find_binary("initdb"), find_binary("postgres")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ferroloop-pg-")
    data = os.path.join(workdir, "data")
    demote = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(workdir, user.pw_uid, user.pw_gid)

        def demote():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    subprocess.run(
        [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, stdout=subprocess.DEVNULL, preexec_fn=demote,
    )
    argv = [postgres, "-D", data, "-p", str(port), "-h", "127.0.0.1", "-k", workdir,
            "-c", "fsync=off", "-c", "max_connections=100"]
    yield from serve(argv, port, "postgres", workdir, preexec_fn=demote)


@pytest.fixture(scope="session")
def tls_contexts():
    """(server context, client context) from the CPython test suite's certificates."""
    import ssl

    certs = pytest.importorskip("test.test_asyncio.utils")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.SIGNED_CERTFILE)
    client = ssl.create_default_context(cafile=certs.SIGNING_CA)
    return server, client
