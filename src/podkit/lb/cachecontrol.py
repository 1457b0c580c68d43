"""Cache-Control and HTTP dates for the response cache (RFC 9111), sans-IO: the
directives a shared cache acts on, read from request and response headers.

- `parse_cache_control(value) -> CacheControl` and `parse_http_date(value) -> float | None`
  never raise: junk directives are skipped, an invalid delta-seconds counts as 0.
- `request_directives(headers)`: a request's Cache-Control, whether it carries
  Authorization, whether it asks to reload (no-cache, or `Pragma: no-cache`).
- `joined(headers, name)`: every value of one header, joined as one field.
- `secondary_key(names, headers)`: the request's values of the headers a response
  varies on (its Vary), the key of one variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from functools import lru_cache

Headers = Sequence[tuple[bytes, bytes]]
Secondary = tuple[bytes | None, ...]

MAX_DELTA = 2**31  # RFC 9111 1.2.2: larger delta-seconds are taken as this


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The Cache-Control directives this cache acts on (None: absent)."""

    max_age: int | None = None
    s_maxage: int | None = None
    min_fresh: int | None = None
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False


NO_DIRECTIVES = CacheControl()


def _directives(text: str) -> list[tuple[str, str | None]]:
    """`name[=token|"quoted"]` pairs separated by commas; junk is skipped, never raised."""
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] != "," and text[j] != "=":
            j += 1
        name = text[i:j].strip().lower()
        value: str | None = None
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':
                j += 1
                buf: list[str] = []
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    buf.append(text[j])
                    j += 1
                value = "".join(buf)
                while j < n and text[j] != ",":
                    j += 1
            else:
                k = j
                while j < n and text[j] != ",":
                    j += 1
                value = text[k:j].strip()
        if name:
            out.append((name, value))
        i = j + 1
    return out


def delta_seconds(value: str | None) -> int:
    """delta-seconds; an invalid value counts as 0 (stale), a huge one as MAX_DELTA."""
    if value is None or not value.isascii() or not value.isdigit():
        return 0
    return min(int(value), MAX_DELTA)


@lru_cache(maxsize=512)
def parse_cache_control(value: bytes | str) -> CacheControl:
    """The directives of a Cache-Control value; the first of repeated directives wins."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    seen: dict[str, str | None] = {}
    for name, arg in _directives(text):
        seen.setdefault(name, arg)
    if not seen:
        return NO_DIRECTIVES
    return CacheControl(
        max_age=delta_seconds(seen["max-age"]) if "max-age" in seen else None,
        s_maxage=delta_seconds(seen["s-maxage"]) if "s-maxage" in seen else None,
        min_fresh=delta_seconds(seen["min-fresh"]) if "min-fresh" in seen else None,
        no_store="no-store" in seen,
        no_cache="no-cache" in seen,
        private="private" in seen,
        public="public" in seen,
        must_revalidate="must-revalidate" in seen,
        proxy_revalidate="proxy-revalidate" in seen,
    )


def parse_http_date(value: bytes | str) -> float | None:
    """Seconds since the epoch of an HTTP date (IMF-fixdate, RFC 850, asctime), or None."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def joined(headers: Headers, name: bytes) -> bytes | None:
    """Every value of header `name` (lowercase) joined by ", ", or None when absent."""
    found: bytes | None = None
    size = len(name)
    for k, v in headers:
        if len(k) == size and k.lower() == name:
            found = v.strip() if found is None else found + b", " + v.strip()
    return found


def request_directives(headers: Headers) -> tuple[CacheControl, bool, bool]:
    """A request's Cache-Control, whether it has Authorization, whether it asks to reload."""
    cc_value = pragma = None
    auth = False
    for k, v in headers:
        size = len(k)
        if size == 13:
            lk = k.lower()
            if lk == b"cache-control":
                cc_value = v if cc_value is None else cc_value + b", " + v
            elif lk == b"authorization":
                auth = True
        elif size == 6 and k.lower() == b"pragma":
            pragma = v
    if cc_value is None:
        reload = pragma is not None and b"no-cache" in pragma.lower()
        return NO_DIRECTIVES, auth, reload
    cc = parse_cache_control(cc_value)
    return cc, auth, cc.no_cache


def secondary_key(names: tuple[bytes, ...], headers: Headers) -> Secondary:
    return tuple(joined(headers, name) for name in names)
