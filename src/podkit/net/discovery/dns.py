"""A minimal DNS client for SRV, A and AAAA lookups (RFC 1035, RFC 2782), standard library only.

The codec is sans-IO: `encode_query` builds a query, `decode_response` parses an answer
(with name compression). `query` sends one over UDP to a name server and waits for the
matching reply; a truncated reply (TC bit) is asked again over TCP (RFC 7766), so large
SRV sets arrive whole.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from podkit.aio import wait_for

__all__ = [
    "AAAA",
    "CLASS_IN",
    "RCODES",
    "SRV",
    "A",
    "DNSError",
    "Record",
    "Response",
    "SRVData",
    "decode_response",
    "encode_name",
    "encode_query",
    "query",
    "system_nameservers",
]

A, AAAA, SRV = 1, 28, 33
CLASS_IN = 1
RCODES = {1: "format error", 2: "server failure", 3: "no such name", 4: "not implemented",
          5: "refused"}  # fmt: skip


class DNSError(Exception):
    """A lookup failed: the message names the query and the reason."""


@dataclass(frozen=True, slots=True)
class SRVData:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record: `data` is an address string (A, AAAA), `SRVData`, or raw bytes."""

    name: str
    type: int
    ttl: int
    data: str | SRVData | bytes


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    rcode: int
    truncated: bool
    answers: list[Record]
    additional: list[Record]


def encode_name(name: str) -> bytes:
    """`a.b.` -> length-prefixed labels ending in a zero byte."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            continue
        raw = label.encode("idna")
        if len(raw) > 63:
            raise DNSError(f"{name!r}: label {label!r} is longer than 63 bytes")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\0")


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for `name` of type `qtype`."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD set, one question
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    for _ in range(128):  # bounds pointer loops
        if offset >= len(data):
            raise DNSError("truncated name in reply")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DNSError("truncated pointer in reply")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length == 0:
            return ".".join(labels), (end if end is not None else offset + 1)
        labels.append(data[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise DNSError("name compression loop in reply")


def _read_record(data: bytes, offset: int) -> tuple[Record, int]:
    name, offset = _read_name(data, offset)
    if offset + 10 > len(data):
        raise DNSError("truncated record in reply")
    rtype, _cls, ttl, length = struct.unpack_from("!HHIH", data, offset)
    offset += 10
    rdata = data[offset : offset + length]
    if len(rdata) != length:
        raise DNSError("truncated record data in reply")
    value: str | SRVData | bytes = rdata
    if rtype == A and length == 4:
        value = socket.inet_ntop(socket.AF_INET, rdata)
    elif rtype == AAAA and length == 16:
        value = socket.inet_ntop(socket.AF_INET6, rdata)
    elif rtype == SRV and length >= 7:
        priority, weight, port = struct.unpack_from("!HHH", data, offset)
        target, _ = _read_name(data, offset + 6)
        value = SRVData(priority, weight, port, target)
    return Record(name, rtype, ttl, value), offset + length


def decode_response(data: bytes) -> Response:
    """Parse a reply; raises `DNSError` on a malformed one."""
    if len(data) < 12:
        raise DNSError(f"reply of {len(data)} bytes is shorter than a DNS header")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    offset = 12
    for _ in range(qd):
        _, offset = _read_name(data, offset)
        offset += 4
    records: list[Record] = []
    for _ in range(an + ns + ar):
        record, offset = _read_record(data, offset)
        records.append(record)
    return Response(qid, flags & 0xF, bool(flags & 0x0200), records[:an], records[an + ns :])


def system_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf (127.0.0.1 when there are none)."""
    servers: list[tuple[str, int]] = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append((parts[1], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class _Client(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        mine = len(data) >= 2 and struct.unpack_from("!H", data)[0] == self.qid
        if mine and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def query(server: tuple[str, int], name: str, qtype: int, timeout: float = 2.0) -> Response:
    """Ask `server` over UDP; raises `DNSError` on no answer or an error rcode
    (`no such name` included)."""
    qid = random.randrange(1 << 16)
    loop = asyncio.get_running_loop()
    kind = {A: "A", AAAA: "AAAA", SRV: "SRV"}.get(qtype, str(qtype))
    what = f"DNS {kind} {name} at {server[0]}:{server[1]}"
    try:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Client(qid), remote_addr=server
        )
    except OSError as exc:
        raise DNSError(f"{what}: {exc.strerror or exc}") from None
    try:
        transport.sendto(encode_query(qid, name, qtype))
        data = await wait_for(proto.reply, timeout)
    except TimeoutError:
        raise DNSError(f"{what}: no answer within {timeout}s") from None
    except OSError as exc:
        raise DNSError(f"{what}: {exc.strerror or exc}") from None
    finally:
        transport.close()
    response = decode_response(data)
    if response.truncated and not response.rcode:
        response = await _query_tcp(server, name, qtype, timeout, what)
    if response.rcode:
        raise DNSError(f"{what}: {RCODES.get(response.rcode, f'rcode {response.rcode}')}")
    return response


async def _query_tcp(
    server: tuple[str, int], name: str, qtype: int, timeout: float, what: str
) -> Response:
    """The same question over TCP: each message after its two-byte length."""
    qid = random.randrange(1 << 16)
    message = encode_query(qid, name, qtype)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server[0], server[1])
            writer.write(struct.pack("!H", len(message)) + message)
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(size)
                if len(data) >= 2 and struct.unpack_from("!H", data)[0] == qid:
                    return decode_response(data)
    except TimeoutError:
        raise DNSError(
            f"{what}: the reply was truncated and TCP gave none within {timeout}s"
        ) from None
    except asyncio.IncompleteReadError:
        raise DNSError(f"{what}: the reply was truncated and the TCP connection closed") from None
    except OSError as exc:
        raise DNSError(
            f"{what}: the reply was truncated and TCP failed: {exc.strerror or exc}"
        ) from None
    finally:
        if writer is not None:
            writer.close()
