"""Certificates of the TLS workloads, made at run time and never stored in the tree.

The harness makes a CA and a `localhost` certificate with trustme when it is installed
(the `bench` extra installs it), in a temporary folder removed when the run ends, and
hands the servers their certificate and key through the environment; without trustme
(or for a server started by hand) the CPython test suite's `localhost` certificate and
its CA are used. The load generator trusts the CA and checks the name `localhost`.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

CERT_ENV = "FERROLOOP_BENCH_CERTFILE"
KEY_ENV = "FERROLOOP_BENCH_KEYFILE"


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str

    def server_env(self) -> dict[str, str]:
        return {CERT_ENV: self.cert, KEY_ENV: self.key}


def test_suite_files() -> TlsFiles:
    from test.test_asyncio import utils

    # keycert3.pem holds the key and the certificate chain.
    return TlsFiles(utils.SIGNING_CA, utils.SIGNED_CERTFILE, utils.SIGNED_CERTFILE)


@contextlib.contextmanager
def tls_files() -> Iterator[TlsFiles]:
    try:
        import trustme
    except ImportError:
        yield test_suite_files()
        return
    with tempfile.TemporaryDirectory(prefix="ferroloop-bench-tls-") as folder:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        files = TlsFiles(
            os.path.join(folder, "ca.pem"),
            os.path.join(folder, "cert.pem"),
            os.path.join(folder, "key.pem"),
        )
        ca.cert_pem.write_to_path(files.ca)
        leaf.private_key_pem.write_to_path(files.key)
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(files.cert, append=True)
        yield files


def server_files() -> tuple[str, str]:
    """(certificate chain, key) for a server: the harness's, else the test suite's."""
    cert = os.environ.get(CERT_ENV)
    if cert:
        return cert, os.environ[KEY_ENV]
    files = test_suite_files()
    return files.cert, files.key


def server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*server_files())
    return ctx
