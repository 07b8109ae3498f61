"""TLS on the proxy listener (``listen.tls``), against the real ``sigproxy serve``
process: curl and Python's ssl module as clients, a throwaway CA from trustme, the fake
Function URL checking every signature. Client certificates (``client_ca``) as inbound
auth, renewed files on SIGHUP without dropping connections, broken files refused at load
and at reload, the connection cap through failed handshakes, and ``--workers``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sigproxy.config import check_exposure, parse_config, with_listen
from sigproxy.errors import ConfigError

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, verify_sigv4
from .test_http1_adversarial import raw_upstream
from .test_operations import scrape, value
from .test_process import Served, creds_env, run_cli, serve_process, write

# --- certificates -------------------------------------------------------------------


@dataclass
class Pki:
    """A server CA (whose ca.pem clients trust), the listener's cert.pem and key.pem in
    ``folder``, and a CA for client certificates (client-ca.pem)."""

    folder: Path
    ca: trustme.CA
    clients: trustme.CA

    @property
    def ca_pem(self) -> Path:
        return self.folder / "ca.pem"

    def renew(self, cert: str = "cert.pem", key: str = "key.pem") -> int:
        """A new server certificate for localhost and 127.0.0.1 written to ``cert`` and
        ``key``; its serial number."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(self.folder / cert))
        leaf.private_key_pem.write_to_path(str(self.folder / key))
        return serial_of(leaf)

    def client(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A client context trusting the server CA, with a client certificate from
        ``ca`` when given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        if ca is not None:
            ca.issue_cert("client@example.com").configure_cert(context)
        return context


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, clients = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    clients.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    made = Pki(tmp_path, ca, clients)
    made.renew()
    return made


def tls_config(port: int, tls: str = "{cert: cert.pem, key: key.pem}", extra: str = "") -> str:
    """One aws_iam upstream on the fake server behind a TLS listener; the files are named
    relative to the config file (the process runs elsewhere)."""
    return f"listen:\n  tls: {tls}\n{extra}" + one_upstream(port)


MTLS = "{cert: cert.pem, key: key.pem, client_ca: client-ca.pem}"

# --- the process --------------------------------------------------------------------


def serve_tls(config_path: str, *args: str) -> contextlib.AbstractAsyncContextManager[Served]:
    """``sigproxy serve --port 0`` until it has logged its https:// and admin listeners."""
    return serve_process(config_path, *args, env=creds_env(), scheme="https")


async def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- clients (blocking, so each runs in a thread: the fake upstream is on this loop) ----


class Client:
    """One keep-alive HTTPS connection to the proxy, as http.client keeps it."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)

    def _get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    async def get(self, path: str) -> tuple[int, bytes]:
        return await asyncio.to_thread(self._get, path)

    @property
    def sock(self) -> ssl.SSLSocket:
        sock = self.conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        return sock

    @property
    def serial(self) -> int:
        cert = self.sock.getpeercert()
        assert cert is not None
        return int(str(cert["serialNumber"]), 16)

    def close(self) -> None:
        self.conn.close()


async def fresh(port: int, context: ssl.SSLContext, path: str = "/") -> tuple[int, int]:
    """(status, the serial of the certificate served) on a new connection."""
    client = Client(port, context)
    try:
        status, _ = await client.get(path)
        return status, client.serial
    finally:
        client.close()


async def served_again(port: int, context: ssl.SSLContext, path: str = "/") -> None:
    """Wait (up to 10 s) until a new connection is served again."""
    deadline = time.monotonic() + 10
    while True:
        try:
            assert (await fresh(port, context, path))[0] == 200
            return
        except (ssl.SSLError, OSError, http.client.HTTPException):
            assert time.monotonic() < deadline, "not served again in time"
            await asyncio.sleep(0.1)


async def refused(port: int, context: ssl.SSLContext) -> BaseException:
    """What a request on a new connection gets instead of an HTTP answer."""
    client = Client(port, context)
    try:
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)) as info:
            await client.get("/refused")
        return info.value
    finally:
        client.close()


# --- serving over TLS ---------------------------------------------------------------


async def test_curl_over_tls_reaches_the_upstream_signed(
    upstream: FakeFunctionUrl, pki: Pki
) -> None:
    path = write(pki.folder, tls_config(upstream.port))
    async with serve_tls(path) as served:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--cacert", str(pki.ca_pem), "-X", "POST", "--data", '{"a": 1}',
            "-w", "\n%{http_code} %{http_version}",
            f"https://localhost:{served.port}/hello?name=John",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(curl.communicate(), 30)
        assert curl.returncode == 0, err.decode()
        body, _, status = out.decode().rpartition("\n")
        # curl offers h2 and http/1.1; the listener speaks HTTP/1.1 only.
        assert status == "200 1.1"
        assert '"target": "/hello?name=John"' in body
        verify_sigv4(upstream.last, region="us-east-1")
        # The client came over TLS: the function hears https.
        assert upstream.last.header("X-Forwarded-Proto") == "https"
        assert upstream.last.header("X-Forwarded-Host") == f"localhost:{served.port}"

        # Plain HTTP to the TLS port gets no answer, and the log says why.
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.to_thread(plain.recv, 100) == b""
        await wait_for(lambda: "a plain HTTP request; this listener speaks HTTPS" in served.log())
        assert len(upstream.requests) == 1
        assert await served.stop() == 0
    assert "Traceback" not in served.log()


async def test_alpn_is_http_1_1_and_tls_1_2_is_served(upstream: FakeFunctionUrl, pki: Pki) -> None:
    path = write(pki.folder, tls_config(upstream.port))
    async with serve_tls(path) as served:

        def handshake(context: ssl.SSLContext) -> tuple[str | None, str | None]:
            with (
                socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                return tls.selected_alpn_protocol(), tls.version()

        context = pki.client()
        context.set_alpn_protocols(["h2", "http/1.1"])
        alpn, version = await asyncio.to_thread(handshake, context)
        assert alpn == "http/1.1"
        assert version in ("TLSv1.2", "TLSv1.3")

        tls12 = pki.client()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert (await asyncio.to_thread(handshake, tls12))[1] == "TLSv1.2"
        assert await served.stop() == 0


# --- client certificates ------------------------------------------------------------


async def test_client_certificates_are_inbound_auth(upstream: FakeFunctionUrl, pki: Pki) -> None:
    path = write(pki.folder, tls_config(upstream.port, MTLS))
    async with serve_tls(path) as served:
        # No certificate: refused in the handshake, nothing forwarded.
        await refused(served.port, pki.client())
        await wait_for(
            lambda: (
                "TLS handshake with 127.0.0.1 failed: peer did not return a certificate"
                in served.log()
            )
        )
        # A certificate from another CA: refused alike.
        await refused(served.port, pki.client(trustme.CA()))
        # Even one the server's own CA issued: only client_ca's count.
        await refused(served.port, pki.client(pki.ca))
        assert upstream.requests == []

        status, _ = await fresh(served.port, pki.client(pki.clients), "/mtls")
        assert status == 200
        assert upstream.last.raw_target == "/mtls"
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


def test_client_ca_counts_as_authentication_for_a_non_loopback_listener(pki: Pki) -> None:
    upstream = "upstreams: [{name: fn, url: 'http://127.0.0.1:9', region: us-east-1}]\n"
    folder = pki.folder
    files = f"cert: {folder}/cert.pem, key: {folder}/key.pem"
    mtls = parse_config(
        f"listen: {{host: 0.0.0.0, tls: {{{files}, client_ca: {folder}/client-ca.pem}}}}\n"
        + upstream
    )
    assert mtls.inbound_auth is None and not mtls.allow_unauthenticated
    assert mtls.listen.client_certificates

    # Without client_ca, TLS alone authenticates nobody: refused as before.
    with pytest.raises(ConfigError) as info:
        parse_config(f"listen: {{host: 0.0.0.0, tls: {{{files}}}}}\n" + upstream)
    assert info.value.path == "listen.host"
    assert "listen.tls.client_ca (client certificates)" in info.value.message

    # --host/--port keep the tls section, and the rule is checked with it.
    local = parse_config(
        f"listen: {{tls: {{{files}, client_ca: {folder}/client-ca.pem}}}}\n" + upstream
    )
    moved = with_listen(local, "0.0.0.0", 8443)
    assert (moved.listen.host, moved.listen.port, moved.listen.tls) == (
        "0.0.0.0",
        8443,
        local.listen.tls,
    )
    check_exposure(moved)
    plain_tls = parse_config(f"listen: {{tls: {{{files}}}}}\n" + upstream)
    with pytest.raises(ConfigError, match=r"^--host: 0\.0\.0\.0 is not a loopback address"):
        with_listen(plain_tls, "0.0.0.0", None)

    # The command line agrees: check accepts the first, refuses the second.
    path = write(
        folder,
        "listen: {host: 0.0.0.0, tls: {cert: cert.pem, key: key.pem, client_ca: client-ca.pem}}\n"
        + upstream,
        "exposed.yaml",
    )
    result = run_cli("check", "--config", path, "--no-credentials")
    assert result.returncode == 0, result.stderr
    path = write(
        folder,
        "listen: {host: 0.0.0.0, tls: {cert: cert.pem, key: key.pem}}\n" + upstream,
        "open.yaml",
    )
    result = run_cli("check", "--config", path, "--no-credentials")
    assert result.returncode == 2
    assert (
        f"sigproxy: error: {path}: listen.host: 0.0.0.0 is not a loopback address" in result.stderr
    )


# --- renewed files on SIGHUP ----------------------------------------------------------


async def test_sighup_serves_renewed_files_and_keeps_connections(
    upstream: FakeFunctionUrl, pki: Pki
) -> None:
    first = serial_of_file(pki.folder / "cert.pem")
    path = write(pki.folder, tls_config(upstream.port))
    async with serve_tls(path) as served:
        kept = Client(served.port, pki.client())
        try:
            assert (await kept.get("/before"))[0] == 200
            sock = kept.sock
            assert kept.serial == first

            second = pki.renew()
            served.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "config reloaded" in served.log())
            assert "reload: new TLS handshakes use" in served.log()

            # The connection opened before goes on, with the certificate it was made with.
            assert (await kept.get("/kept"))[0] == 200
            assert kept.sock is sock
            assert kept.serial == first
            # New connections get the renewed certificate.
            assert await fresh(served.port, pki.client()) == (200, second)

            # A renewal gone wrong (a certificate without its key) is refused: the last
            # good files keep serving, and the failed reload is counted.
            pki.renew(cert="cert.pem", key="unused-key.pem")
            served.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "reload rejected" in served.log())
            (line,) = [x for x in served.log().splitlines() if "reload rejected" in x]
            assert "listen.tls.key:" in line and "does not match the certificate" in line
            assert await fresh(served.port, pki.client()) == (200, second)
            assert (await kept.get("/still"))[0] == 200
            assert kept.sock is sock
            assert upstream.last.raw_target == "/still"
            samples = await scrape(served.admin_port or 0)
            assert value(samples, "sigproxy_config_reloads_total", result="failure") == 1
            assert value(samples, "sigproxy_config_reloads_total", result="success") == 1
        finally:
            kept.close()
        assert await served.stop() == 0
    assert "Traceback" not in served.log()


def serial_of_file(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# --- broken files at load -------------------------------------------------------------


def _encrypted_key(pki: Pki) -> str:
    leaf = pki.ca.issue_cert("localhost")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (pki.folder / "encrypted.pem").write_bytes(pem)
    return "encrypted.pem"


BROKEN: list[tuple[str, str]] = [
    ("{cert: missing.pem, key: key.pem}",
     r"listen\.tls\.cert: cannot read {d}/missing\.pem: No such file or directory$"),
    ("{cert: cert.pem, key: other-key.pem}",
     r"listen\.tls\.key: {d}/other-key\.pem does not match the certificate in listen\.tls\.cert \({d}/cert\.pem\)$"),
    ("{cert: key.pem, key: key.pem}", r"listen\.tls\.cert: {d}/key\.pem holds no readable PEM certificate$"),
    ("{cert: cert.pem, key: cert.pem}", r"listen\.tls\.key: {d}/cert\.pem holds no PEM private key \(.+\)$"),
    ("{cert: cert.pem, key: ENCRYPTED}", r"listen\.tls\.key: {d}/encrypted\.pem is encrypted; give sigproxy an unencrypted key"),
    ("{cert: cert.pem}", r"listen\.tls\.key: is required$"),
    ("{cert: cert.pem, key: key.pem, client_ca: key.pem}",
     r"listen\.tls\.client_ca: {d}/key\.pem holds no readable PEM certificate$"),
    ("{cert: cert.pem, key: key.pem, client_ca: .}", r"listen\.tls\.client_ca: cannot read {d}/\.: Is a directory$"),
]  # fmt: skip


@pytest.mark.parametrize(("tls", "expected"), BROKEN)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_broken_files_are_one_line_naming_the_key(
    pki: Pki, tls: str, expected: str, command: str
) -> None:
    pki.renew(cert="other-cert.pem", key="other-key.pem")
    tls = tls.replace("ENCRYPTED", _encrypted_key(pki))
    path = write(pki.folder, tls_config(9, tls))
    result = run_cli(command, "--config", path, env=creds_env())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"sigproxy: error: {path}: "
    assert lines[0].startswith(prefix), lines[0]
    message = lines[0][len(prefix) :]
    assert re.search(expected.format(d=re.escape(str(pki.folder))), message), message
    assert "Traceback" not in result.stderr


# --- the connection cap through handshakes ---------------------------------------------


async def test_failed_handshakes_give_their_place_back(upstream: FakeFunctionUrl, pki: Pki) -> None:
    """A connection counts against limits.max_client_connections from its accept; one
    whose handshake fails (no certificate, plain HTTP, a client that hangs up) must give
    its place back, or a few scanners would lock every client out."""
    path = write(
        pki.folder, tls_config(upstream.port, MTLS, "limits: {max_client_connections: 2}\n")
    )
    async with serve_tls(path) as served:
        for _ in range(3):
            await refused(served.port, pki.client())
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as plain:
                plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    await asyncio.to_thread(plain.recv, 100)
            socket.create_connection(("127.0.0.1", served.port), timeout=10).close()
        good = pki.client(pki.clients)
        status, _ = await fresh(served.port, good, "/after-failures")
        assert status == 200

        # Over the cap, a connection is closed before any handshake work; once a place
        # is free again, clients are served.
        held = [Client(served.port, good), Client(served.port, good)]
        try:
            for client in held:
                assert (await client.get("/held"))[0] == 200
            await refused(served.port, good)
            # The line reaches the test through the process's stderr: wait for it.
            await wait_for(lambda: "refused a connection, 2 are open" in served.log())
            # No answer can be given before a handshake, but the refusal is counted.
            m = await scrape(served.admin_port or 0)
            assert value(m, "sigproxy_proxy_errors_total", reason="too_many_connections") == 1
            held[0].close()
            await served_again(served.port, good, "/freed")
        finally:
            for client in held:
                client.close()
        assert await served.stop() == 0


async def test_a_silent_connection_is_closed_after_client_timeouts_header(
    upstream: FakeFunctionUrl, pki: Pki
) -> None:
    """A connection that never sends its ClientHello holds its place only as long as a
    request head may take."""
    extra = "client_timeouts: {header: 1}\nlimits: {max_client_connections: 1}\n"
    path = write(pki.folder, tls_config(upstream.port, extra=extra))
    async with serve_tls(path) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as silent:
            await asyncio.sleep(0.2)
            await refused(served.port, pki.client())  # the one place is taken
            started = time.monotonic()
            assert await asyncio.to_thread(silent.recv, 100) == b""
            assert 0.5 < time.monotonic() - started < 5
        await wait_for(
            lambda: "failed: no handshake within 1s (client_timeouts.header)" in served.log()
        )
        await served_again(served.port, pki.client())
        assert await served.stop() == 0


# --- workers --------------------------------------------------------------------------


async def test_workers_serve_tls_and_reload_it(upstream: FakeFunctionUrl, pki: Pki) -> None:
    """The supervisor binds plain sockets; each worker serves TLS with its own context
    from the files, and reads them again on SIGHUP."""
    first = serial_of_file(pki.folder / "cert.pem")
    path = write(pki.folder, tls_config(upstream.port))
    async with serve_tls(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        for i in range(6):
            assert await fresh(served.port, pki.client(), f"/w/{i}") == (200, first)
            verify_sigv4(upstream.last, region="us-east-1")
        second = pki.renew()
        served.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: served.log().count("config reloaded") == 2)
        for i in range(6):
            assert await fresh(served.port, pki.client(), f"/r/{i}") == (200, second)
        assert await served.stop() == 0
    assert "Traceback" not in served.log()


async def test_on_the_tls_listener_an_upstream_protocol_error_is_named(pki: Pki) -> None:
    """The TLS listener runs on asyncio's loop, as every install without uvloop does. An
    upstream answer in gzip transfer coding is a 502 naming it there too. (Found: the
    loop ran inside the except block that caught uvloop's ImportError, so llhttp's
    callback errors carried that ImportError as their context, and the 502's detail said
    'User callback error'.)"""

    async def gzipped(
        rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n"
        )
        await writer.drain()
        return False

    async with raw_upstream(gzipped) as up:
        path = write(pki.folder, tls_config(up.port))
        async with serve_tls(path) as served:
            client = Client(served.port, pki.client())
            try:
                status, body = await client.get("/coded")
            finally:
                client.close()
            assert await served.stop() == 0
    assert status == 502
    error = json.loads(body)
    assert error["kind"] == "protocol", error
    assert "transfer coding gzip, which sigproxy does not decode" in error["detail"], error
