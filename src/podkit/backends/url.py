"""Backend URLs: parsing, masking passwords, and the errors that name them."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from podkit.backends.base import BackendUnavailable, UnsupportedURL


def mask(url: str) -> str:
    """The URL with any password replaced by `***`."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class BackendURL:
    """A parsed backend URL: `scheme://[user:pass@]host[:port]/path?query`."""

    raw: str
    scheme: str
    host: str
    port: int | None
    path: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    query: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> BackendURL:
        if "://" not in url:
            raise UnsupportedURL(f"{mask(url)!r} is not a backend URL (expected scheme://...)")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UnsupportedURL(f"{mask(url)!r}: {exc}") from None
        return cls(
            raw=url,
            scheme=parts.scheme.lower(),
            host=parts.hostname or "",
            port=port,
            path=parts.path,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            query={k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()},
        )

    @property
    def masked(self) -> str:
        return mask(self.raw)

    def address(self, default_port: int) -> str:
        return f"{self.host or '127.0.0.1'}:{self.port or default_port}"

    def unavailable(self, default_port: int, timeout: float, why: object) -> BackendUnavailable:
        """The error for a server that did not answer."""
        return BackendUnavailable(
            f"{self.masked}: no answer from {self.address(default_port)} "
            f"within {timeout:g}s ({why})"
        )
