"""TLS on the proxy listener: the server context made from ``listen.tls``'s PEM files.

:func:`server_context` is called when the config is loaded (so ``sigproxy check`` and a
SIGHUP reload refuse files that would not serve, each problem one line naming its key),
when the listener starts, and again on SIGHUP to pick up renewed files: a new context
for new handshakes, while connections already open keep the one they were made with.
Pure: the ``ssl`` module and the files, nothing else (the listener itself is in
:mod:`sigproxy.listener`).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ListenTls

ALPN = ("http/1.1",)
"""The only protocol the listener speaks (:mod:`sigproxy.http1` is HTTP/1.1 only)."""


class _Encrypted(Exception):
    """Raised by the password callback: the key needs a passphrase sigproxy never has."""


def _no_password() -> str:
    raise _Encrypted


def server_context(tls: ListenTls, path: str = "listen.tls") -> ssl.SSLContext:
    """A server context serving ``tls.cert`` with ``tls.key`` (TLS 1.2 or later,
    OpenSSL's default secure ciphers, ALPN ``http/1.1``), requiring a client certificate
    issued by ``tls.client_ca`` when it is set. Raises :class:`ConfigError` naming the
    key whose file is missing, unreadable or wrong (``listen.tls.key: ...``)."""
    cert_path, key_path = f"{path}.cert", f"{path}.key"
    cert_pem = _read(tls.cert, cert_path)
    _certificates(cert_pem, tls.cert, cert_path)
    _read(tls.key, key_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation (TLS 1.2) only costs the server CPU.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN))
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except _Encrypted:
        raise ConfigError(
            key_path,
            f"{tls.key} is encrypted; give sigproxy an unencrypted key (readable only by "
            "the user it runs as)",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{tls.key} does not match the certificate in {cert_path} ({tls.cert})"
        else:
            message = f"{tls.key} holds no PEM private key ({_reason(exc)})"
        raise ConfigError(key_path, message) from None
    except OSError as exc:  # replaced or removed since it was read just now
        raise ConfigError(key_path, f"cannot read {tls.key}: {exc.strerror or exc}") from None
    if tls.client_ca is not None:
        ca_path = f"{path}.client_ca"
        ca_pem = _read(tls.client_ca, ca_path)
        _certificates(ca_pem, tls.client_ca, ca_path, context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read(file: str, path: str) -> str:
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror or exc}") from None
    # PEM is ASCII; anything else around the blocks (comments, stray bytes) is not needed.
    return data.decode("ascii", "ignore")


def _certificates(pem: str, file: str, path: str, context: ssl.SSLContext | None = None) -> None:
    """Load the PEM certificates in ``pem`` as ``context``'s trusted CAs (a throwaway
    context's when None: just to check there is one), or say there is none."""
    target = context or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        target.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise ConfigError(path, f"{file} holds no readable PEM certificate") from None


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")
