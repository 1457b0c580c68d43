"""What goes over the wire, without IO: names, headers, error codes, stored messages,
ack subjects and receipts, stream configurations and NAK bodies."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from podkit.backends.base import BackendError

DEDUPE = 120.0  # duplicate window of streams whose writes carry a random Nats-Msg-Id
NS = 1_000_000_000

EXPECT = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
OP, CREATED, LEASE = "Podkit-Op", "Podkit-Created", "Podkit-Lease"
NOT_BEFORE = "Podkit-Not-Before"
ID, ATTEMPTS, ERROR, ENQUEUED = "Podkit-Id", "Podkit-Attempts", "Podkit-Error", "Podkit-Enqueued"

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code: expected last subject sequence differs
CONSUMER_NOT_FOUND = 10014
STREAM_NAME_IN_USE = 10058  # exists with another configuration

# ---------------------------------------------------------------------------- names

_ALNUM = frozenset(string.ascii_letters + string.digits)
_TOKEN = _ALNUM | {"_"}


def _escape(text: str, keep: frozenset[str]) -> str:
    """`text` with every character outside `keep` as `-XX` per UTF-8 byte; "" is `-`."""
    if not text:
        return "-"
    return "".join(
        c if c in keep else "".join(f"-{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )


def _unescape(token: str) -> str:
    if token == "-":
        return ""
    if "-" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "-":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode("utf-8", "surrogatepass")


def _name(text: str) -> str:
    """A stream or consumer name part: [A-Za-z0-9] and `-XX` escapes."""
    return _escape(text, _ALNUM)


def _key_tokens(key: str) -> str:
    """The subject tokens of a KV key: one per `/`-separated segment."""
    return ".".join(_escape(s, _TOKEN) for s in key.split("/"))


def _key_of(tokens: str) -> str:
    return "/".join(_unescape(t) for t in tokens.split("."))


# ---------------------------------------------------------------------------- messages


@dataclass(slots=True)
class _Raw:
    """A stored message: its stream sequence, subject, headers and data."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


def _status(msg: Any) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers else None


def _ack_meta(reply: str) -> tuple[int, int, int, int, int]:
    """(stream seq, delivery count, consumer seq, timestamp ns, pending) of a `$JS.ACK`
    subject (the 9-token form, or the 12-token form with domain and account hash)."""
    t = reply.split(".")
    i = 4 if len(t) == 9 else 6
    return int(t[i + 1]), int(t[i]), int(t[i + 2]), int(t[i + 3]), int(t[i + 4])


@dataclass(frozen=True, slots=True)
class _Receipt:
    """A queue receipt `<$JS.ACK subject> <deadline>`: the delivery's ack subject and a
    time (queue clock) before which it cannot have been delivered again."""

    reply: str
    seq: int
    dc: int
    deadline: float

    @classmethod
    def parse(cls, receipt: str) -> _Receipt | None:
        reply, _, deadline = receipt.partition(" ")
        if not reply.startswith("$JS.ACK."):
            return None
        try:
            seq, dc, *_ = _ack_meta(reply)
            return cls(reply, seq, dc, float(deadline or 0))
        except (IndexError, ValueError):
            return None


class _APIError(BackendError):
    """A JetStream API or publish error, with its `code` and `err_code`."""

    def __init__(self, url: str, what: str, error: dict[str, Any]) -> None:
        self.code = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))
        desc = error.get("description", error)
        super().__init__(f"{url}: JetStream {what}: {desc} (err_code {self.err_code})")


def _stream_config(
    name: str,
    subject: str,
    *,
    retention: str = "limits",
    per_subject: int = -1,
    dedupe: float = DEDUPE,
    max_age: float = 0.0,
) -> dict[str, Any]:
    return {
        "name": name,
        "subjects": [subject],
        "retention": retention,
        "storage": "file",
        "num_replicas": 1,
        "discard": "old",
        "max_msgs": -1,
        "max_bytes": -1,
        "max_msg_size": -1,
        "max_consumers": -1,
        "max_msgs_per_subject": per_subject,
        "max_age": int(max_age * NS),
        "duplicate_window": int((min(dedupe, max_age) if max_age > 0 else dedupe) * NS),
        "allow_direct": True,
    }


def _nak(delay: float) -> bytes:
    return b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % max(1, int(delay * NS))
