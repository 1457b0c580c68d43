"""Host names and addresses as given in flags, files and specs."""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def is_host(text: str) -> bool:
    """Whether `text` is a DNS name (letters, digits, `-` and `_` in dot-separated labels)
    or an IPv4 or IPv6 address."""
    if ":" in text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return True
    return len(text) <= 253 and _NAME.fullmatch(text) is not None
