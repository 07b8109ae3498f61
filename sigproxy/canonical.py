"""The one outgoing request target: path and query normalised so that what is sent is
exactly what is signed.

AWS recomputes the canonical request from the bytes that arrive: it removes dot and
empty path segments, URI-encodes each path segment again (all services but S3), and
decodes then re-encodes every query key and value with only the RFC 3986 unreserved
characters left bare (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html).
botocore, on the other hand, signs the query as it is given. So sigproxy sends a target
that is already in canonical form; then botocore's canonicalisation, AWS's and any
independent signer's all agree.

Rules:

* Path: percent-escapes of unreserved characters are decoded (``%7E`` -> ``~``), every
  other escape is kept with upper-case hex (``%2f`` -> ``%2F``, so an encoded slash stays
  part of its segment), characters that may not appear bare in a path (space, ``"``,
  non-ASCII, ...) are percent-encoded as UTF-8, reserved characters sent bare stay bare,
  and ``.``, ``..`` and empty segments are removed the way AWS removes them.
* Query: ``+`` means a space (the ``application/x-www-form-urlencoded`` rule browsers and
  Lambda itself apply), so ``a+b`` is sent as ``a%20b``; a literal plus must arrive as
  ``%2B``. Every key and value is decoded and re-encoded with unreserved characters bare
  and everything else as upper-case ``%XX``; a key without ``=`` is sent as ``key=``
  (AWS canonicalises it that way); empty ``&&`` pieces are dropped; order and repeated
  keys are kept.
* Control characters and malformed escapes (``%zz``, a lone ``%``) cannot be represented
  faithfully and raise :class:`InvalidTarget`.
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote_to_bytes

_UNRESERVED_BYTES = frozenset((string.ascii_letters + string.digits + "-._~").encode())
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# An escape, or a run of characters that may not stand bare in a path segment (RFC 3986
# pchar is unreserved, sub-delims, ":" and "@").
_SEGMENT_FIX = re.compile(r"%([0-9A-Fa-f]{2})|([^A-Za-z0-9\-._~!$&'()*+,;=:@%]+)")
_ESCAPE_TABLE = [chr(b) if b in _UNRESERVED_BYTES else f"%{b:02X}" for b in range(256)]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidTarget(ValueError):
    """A request target that cannot be sent faithfully (the message says why)."""


def split_target(raw_target: str) -> tuple[str, str]:
    """Split an origin-form request target into its raw path and raw query.

    A fragment (which clients should never send) is dropped.
    """
    target, _, _ = raw_target.partition("#")
    path, _, query = target.partition("?")
    return path, query


def quote(data: bytes) -> str:
    """Percent-encode ``data`` leaving only RFC 3986 unreserved characters bare."""
    return "".join([_ESCAPE_TABLE[b] for b in data])


def _percent_decode(text: str, *, plus_is_space: bool) -> bytes:
    """Decode %XX escapes (and optionally ``+``) into bytes; bare characters as UTF-8."""
    if _BAD_ESCAPE.search(text):
        raise InvalidTarget("malformed percent-encoding in the query string")
    if plus_is_space:
        text = text.replace("+", " ")
    # The HTTP parser hands undecodable bytes over as surrogate escapes; they stand for
    # exactly one original byte each.
    return unquote_to_bytes(text.encode("utf-8", "surrogateescape"))


def normalize_path(raw_path: str) -> str:
    """Return the canonical form of an origin-form path (see the module docstring)."""
    if not raw_path.startswith("/"):
        raise InvalidTarget("the request target must be a path starting with '/'")
    if _CONTROL.search(raw_path):
        raise InvalidTarget("control characters in the request path")
    segments: list[str] = []
    for raw_segment in raw_path.split("/"):
        if not raw_segment:
            continue
        segment = _normalize_segment(raw_segment)
        if segment == ".":
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    if not segments:
        return "/"
    trailing = "/" if raw_path.endswith("/") else ""
    # "/a/.." and "/a/." name a directory, as RFC 3986 section 5.2.4 has it.
    last = raw_path.rsplit("/", 1)[-1]
    if last and _normalize_segment(last) in (".", ".."):
        trailing = "/"
    return "/" + "/".join(segments) + trailing


def _normalize_segment(segment: str) -> str:
    if _BAD_ESCAPE.search(segment):
        raise InvalidTarget("malformed percent-encoding in the request path")
    return _SEGMENT_FIX.sub(_fix_segment_part, segment)


def _fix_segment_part(m: re.Match[str]) -> str:
    escaped = m.group(1)
    if escaped is not None:
        value = int(escaped, 16)
        return chr(value) if value in _UNRESERVED_BYTES else f"%{value:02X}"
    return quote(m.group(2).encode("utf-8", "surrogateescape"))


def normalize_query(raw_query: str) -> str:
    """Return the canonical form of a raw query string (see the module docstring)."""
    if not raw_query:
        return ""
    if _CONTROL.search(raw_query):
        raise InvalidTarget("control characters in the query string")
    pairs: list[str] = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        pairs.append(
            quote(_percent_decode(key, plus_is_space=True))
            + "="
            + quote(_percent_decode(value, plus_is_space=True))
        )
    return "&".join(pairs)
