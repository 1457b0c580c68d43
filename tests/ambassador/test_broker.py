"""`podkit ambassador broker`: resolvers, round-robin, failover and the KV registry, on
real loopback sockets.

DNS is tested against `TinyDNSServer`, a small UDP DNS server in this file that answers
SRV and A queries from a dict (no dnspython, no system resolver involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aredis

from podkit.ambassador import dns
from podkit.ambassador.broker import (
    Broker,
    DNSResolver,
    EndpointSet,
    EnvResolver,
    KVRegistry,
    Registration,
    ResolveError,
    Resolver,
    StaticResolver,
    parse_endpoint,
)
from podkit.backends import open_kv
from servers import EtcdServer, RedisServer
from support import free_port, http_get, podkit_error, port_in_use


def quiet(_: str) -> None:
    return None


class Backend:
    """A TCP server that answers each line with its name; `kill()` stops it the way a
    crash does (listening socket gone, open connections reset)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.hits = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                self.hits += 1
                writer.write(f"{self.name} {line.decode().strip()}\n".encode())
                await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def kill(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()


async def ask(port: int, text: str = "hi", timeout: float = 2.0) -> str:
    """One connection, one line, one answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(text.encode() + b"\n")
        answer = await asyncio.wait_for(reader.readline(), timeout)
        if not answer:
            raise ConnectionError("closed without an answer")
        return answer.decode().split()[0]
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def backends(n: int) -> AsyncIterator[list[Backend]]:
    started = [await Backend(f"b{i}").start() for i in range(n)]
    try:
        yield started
    finally:
        for b in started:
            with contextlib.suppress(Exception):
                b.kill()


@contextlib.asynccontextmanager
async def broker_for(resolvers: list[Resolver], **options: float) -> AsyncIterator[Broker]:
    broker = Broker(resolvers, log=quiet, **options)  # type: ignore[arg-type]
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


# ---------------------------------------------------------------------------- choosing


def test_endpoint_set_round_robin_down_marking_and_backoff() -> None:
    a, b, c = ("h", 1), ("h", 2), ("h", 3)
    s = EndpointSet(down_for=1.0, max_down_for=4.0)
    s.update([a, b, c])
    assert [s.candidates(0)[0] for _ in range(6)] == [a, b, c, a, b, c]
    assert s.failed(b, now=10) == 1.0
    firsts = [s.candidates(10.5)[0] for _ in range(4)]
    assert b not in firsts and Counter(firsts) == {a: 2, c: 2}  # fair among the healthy
    assert s.candidates(10.5)[-1] == b  # a down endpoint is still tried, last
    assert s.failed(b, now=11) == 2.0 and s.failed(b, now=13) == 4.0
    assert s.failed(b, now=17) == 4.0  # capped
    assert s.healthy(20.9) == [a, c] and s.healthy(21) == [a, b, c]
    s.succeeded(b)
    assert s.states[b].failures == 0
    s.failed(a, now=30)
    assert not s.update([a, b, c])  # same set: no change
    assert s.update([c, a])  # the state of endpoints that stay is kept
    assert s.states[a].down_until == 31 and b not in s.states
    assert EndpointSet().candidates(0) == []


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    for bad in ("host", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_endpoint(bad)


async def test_env_resolver() -> None:
    env = {"MY_CACHE_SERVICE_HOST": "10.1.2.3", "MY_CACHE_SERVICE_PORT": "6379",
           "MY_CACHE_SERVICE_PORT_ADMIN": "9000"}  # fmt: skip
    assert await EnvResolver("my-cache", environ=env).resolve() == [("10.1.2.3", 6379)]
    assert await EnvResolver("my-cache", "admin", environ=env).resolve() == [("10.1.2.3", 9000)]
    with pytest.raises(ResolveError, match="OTHER_SERVICE_HOST"):
        await EnvResolver("other", environ=env).resolve()


# ---------------------------------------------------------------------------- forwarding


async def test_connections_spread_round_robin() -> None:
    async with backends(3) as bs, broker_for([StaticResolver(b.endpoint for b in bs)]) as broker:
        answers = Counter([await ask(broker.port) for _ in range(30)])
    assert answers == {"b0": 10, "b1": 10, "b2": 10}


async def test_killing_an_endpoint_mid_run_fails_no_connection_after_it() -> None:
    async with backends(3) as bs, broker_for([StaticResolver(b.endpoint for b in bs)]) as broker:
        answers: Counter[str] = Counter()
        for i in range(30):
            answers[await ask(broker.port, f"before {i}")] += 1
        bs[1].kill()
        after: Counter[str] = Counter()
        failures = 0
        for i in range(60):
            try:
                after[await ask(broker.port, f"after {i}")] += 1
            except (OSError, ConnectionError) as exc:
                failures += 1
                print("failed:", exc)
        status = broker.status()
    assert failures == 0
    assert after["b1"] == 0 and after["b0"] + after["b2"] == 60
    assert abs(after["b0"] - after["b2"]) <= 2  # the survivors share the load
    b1 = next(e for e in status["endpoints"] if e["endpoint"].endswith(f":{bs[1].port}"))
    assert not b1["healthy"] and b1["errors"] >= 1


async def test_concurrent_clients_while_an_endpoint_dies() -> None:
    async with backends(3) as bs, broker_for([StaticResolver(b.endpoint for b in bs)]) as broker:
        killed = asyncio.Event()
        failures_after_kill = 0
        total = 0

        async def client(n: int) -> None:
            nonlocal failures_after_kill, total
            for i in range(25):
                was_killed = killed.is_set()
                try:
                    await ask(broker.port, f"{n}-{i}")
                    total += 1
                except (OSError, ConnectionError):
                    if was_killed:
                        failures_after_kill += 1

        async def killer() -> None:
            await asyncio.sleep(0.05)
            bs[0].kill()
            killed.set()

        await asyncio.gather(killer(), *(client(n) for n in range(8)))
    assert killed.is_set()
    assert failures_after_kill == 0
    assert total >= 8 * 25 - 8  # at most the connections in flight at the kill


async def test_upstream_that_closes_before_answering_is_replayed_elsewhere() -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.transport.abort()  # took the request, died before answering

    bad = await asyncio.start_server(slam, "127.0.0.1", 0)
    bad_ep = ("127.0.0.1", bad.sockets[0].getsockname()[1])
    try:
        async with backends(1) as bs, broker_for([StaticResolver([bad_ep, bs[0].endpoint])]) as br:
            answers = [await ask(br.port, f"q{i}") for i in range(6)]
            assert answers == ["b0"] * 6
            assert bs[0].hits == 6
    finally:
        bad.close()


async def test_all_endpoints_down_closes_the_client_and_recovers() -> None:
    async with backends(1) as bs:
        port = bs[0].port
        bs[0].kill()
        async with broker_for([StaticResolver([("127.0.0.1", port)])], down_for=0.05) as broker:
            with pytest.raises((ConnectionError, OSError)):
                await ask(broker.port)
            assert broker.failed_connections == 1
            again = Backend("again")
            again.port = port
            await again.start()
            try:
                assert await ask(broker.port) == "again"  # tried even while marked down
            finally:
                again.kill()


async def test_redis_protocol_through_the_broker(redis_server: RedisServer) -> None:
    async with broker_for([StaticResolver([("127.0.0.1", redis_server.port)])]) as broker:
        client = aredis.Redis(port=broker.port)
        try:
            await client.set("ambassador", "works")
            assert await client.get("ambassador") == b"works"
            big = b"x" * 300_000  # larger than the replay buffer, both ways
            await client.set("big", big)
            assert await client.get("big") == big
        finally:
            await client.aclose()


# ---------------------------------------------------------------------------- KV registry


@pytest.fixture(params=["memory", "redis", "etcd"])
def registry_url(request: pytest.FixtureRequest) -> str:
    if request.param == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        return etcd.url
    if request.param == "memory":
        return f"memory://ambassador-{id(request)}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_registry_registration_gets_traffic_within_1s_and_revoke_removes_it(
    registry_url: str,
) -> None:
    kv = await open_kv(registry_url)
    prefix = f"services/web-{id(kv)}/"
    async with backends(3) as bs:
        try:
            first = await Registration(kv, prefix, bs[0].endpoint, ttl=5).start()
            registry = KVRegistry(registry_url, prefix, log=quiet)
            async with broker_for([registry], refresh=30) as broker:
                assert {await ask(broker.port) for _ in range(4)} == {"b0"}
                latencies = []
                for b in bs[1:]:
                    start = time.monotonic()
                    reg = await Registration(kv, prefix, b.endpoint, ttl=5).start()
                    while await ask(broker.port) != b.name:
                        assert time.monotonic() - start < 1.0, f"{b.name} got no traffic in 1 s"
                    latencies.append(time.monotonic() - start)
                # deregistration (lease revoked) takes it out at once
                await reg.close()
                await asyncio.sleep(0.2)
                answers = Counter([await ask(broker.port) for _ in range(12)])
                assert answers["b2"] == 0 and answers["b0"] == 6 and answers["b1"] == 6
                await first.close()
        finally:
            await kv.close()
    kind = registry_url.split(":")[0]
    print(f"registry {kind}: registration -> traffic in "
          + ", ".join(f"{x * 1000:.0f}" for x in latencies) + " ms")  # fmt: skip
    assert max(latencies) < 1.0


class SlowToWatch(KVRegistry):
    """A registry whose watch comes up 0.3 s after the first resolve, as on a busy host."""

    async def watch(self, changed: Callable[[], None]) -> None:
        await asyncio.sleep(0.3)
        await super().watch(changed)


async def test_a_registration_made_before_the_watch_is_up_is_not_missed(
    registry_url: str,
) -> None:
    kv = await open_kv(registry_url)
    prefix = f"services/early-{time.monotonic_ns()}/"
    async with backends(2) as bs:
        try:
            first = await Registration(kv, prefix, bs[0].endpoint, ttl=5).start()
            registry = SlowToWatch(registry_url, prefix, log=quiet)
            async with broker_for([registry], refresh=30) as broker:
                assert broker.endpoints.endpoints == [bs[0].endpoint]
                start = time.monotonic()
                second = await Registration(kv, prefix, bs[1].endpoint, ttl=5).start()
                while len(broker.endpoints.endpoints) != 2:
                    assert time.monotonic() - start < 1.0, "the registration was missed"
                    await asyncio.sleep(0.01)
                assert {await ask(broker.port) for _ in range(4)} == {"b0", "b1"}
                await second.close()
                await first.close()
        finally:
            await kv.close()


async def test_registry_lease_expiry_removes_an_instance_that_died() -> None:
    url = f"memory://ambassador-expiry-{time.monotonic_ns()}"
    kv = await open_kv(url)
    async with backends(2) as bs:
        await Registration(kv, "svc/", bs[0].endpoint, ttl=5).start()
        dead = await kv.grant(0.3)  # an instance that stops renewing
        await kv.put("svc/dead", f"127.0.0.1:{bs[1].port}".encode(), lease=dead)
        async with broker_for([KVRegistry(kv, "svc/", log=quiet)], refresh=30) as broker:
            assert len(broker.endpoints.endpoints) == 2
            start = time.monotonic()
            while len(broker.endpoints.endpoints) != 1:
                assert time.monotonic() - start < 2.0
                await asyncio.sleep(0.02)
            assert broker.endpoints.endpoints == [bs[0].endpoint]


async def test_registry_ignores_malformed_values() -> None:
    kv = await open_kv(f"memory://ambassador-bad-{time.monotonic_ns()}")
    await kv.put("svc/a", b"127.0.0.1:8080")
    await kv.put("svc/b", b"not an endpoint")
    logged: list[str] = []
    assert await KVRegistry(kv, "svc/", log=logged.append).resolve() == [("127.0.0.1", 8080)]
    assert "svc/b" in logged[0]


# ---------------------------------------------------------------------------- DNS


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"


class TinyDNSServer(asyncio.DatagramProtocol):
    """A tiny in-test DNS server on UDP and TCP (one port): answers SRV and A queries from
    `srv` and `a` (SRV answers carry A records of their targets as additional records
    when `glue` is true); unknown names get NXDOMAIN. Over UDP it sends at most
    `udp_answers` answers, with the TC bit set when it cut some. Built with struct,
    independent of podkit's codec."""

    def __init__(self) -> None:
        self.srv: dict[str, list[tuple[int, int, int, str]]] = {}
        self.a: dict[str, list[str]] = {}
        self.glue = True
        self.udp_answers = 1000
        self.queries: list[tuple[str, int, str]] = []  # (name, type, "udp" | "tcp")
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.answer(data, "udp"), addr)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(size), "tcp")
                writer.write(struct.pack("!H", len(reply)) + reply)
        writer.close()

    def answer(self, data: bytes, via: str) -> bytes:
        qid = struct.unpack_from("!H", data)[0]
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        qname = ".".join(labels).lower()
        qtype = struct.unpack_from("!H", data, i + 1)[0]
        question = data[12 : i + 5]
        self.queries.append((qname, qtype, via))
        answers, additional = [], []
        if qtype == 33 and qname in self.srv:
            for prio, weight, port, target in self.srv[qname]:
                rdata = struct.pack("!HHH", prio, weight, port) + _name(target)
                answers.append(b"\xc0\x0c" + struct.pack("!HHIH", 33, 1, 30, len(rdata)) + rdata)
                for ip in self.a.get(target, []) if self.glue else []:
                    additional.append(
                        _name(target) + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
                    )
        elif qtype == 1 and qname in self.a:
            for ip in self.a[qname]:
                answers.append(
                    b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
                )
        known = qname in self.srv or qname in self.a
        flags = 0x8180 if known else 0x8183
        if via == "udp" and len(answers) > self.udp_answers:
            answers, additional, flags = answers[: self.udp_answers], [], flags | 0x0200
        header = struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, len(additional))
        return header + question + b"".join(answers + additional)


@pytest.fixture
async def dns_server() -> AsyncIterator[tuple[TinyDNSServer, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    proto = TinyDNSServer()
    for _ in range(50):  # a port free for both TCP and UDP
        tcp = await asyncio.start_server(proto.serve_tcp, "127.0.0.1", 0)
        addr = tcp.sockets[0].getsockname()[:2]
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=addr)
            break
        except OSError:
            tcp.close()
    else:
        raise RuntimeError("no port free for both TCP and UDP")
    yield proto, addr
    tcp.close()
    transport.close()


async def test_dns_srv_with_and_without_additional_records(
    dns_server: tuple[TinyDNSServer, tuple[str, int]],
) -> None:
    server, addr = dns_server
    server.srv["_redis._tcp.cache.test"] = [(20, 1, 7002, "c.cache.test"),
                                            (10, 5, 7000, "a.cache.test"),
                                            (10, 1, 7001, "b.cache.test")]  # fmt: skip
    server.a.update({"a.cache.test": ["127.0.0.2"], "b.cache.test": ["127.0.0.3"],
                     "c.cache.test": ["127.0.0.4", "127.0.0.5"]})  # fmt: skip
    resolver = DNSResolver("_redis._tcp.cache.test", server=addr)
    expected = [("127.0.0.2", 7000), ("127.0.0.3", 7001), ("127.0.0.4", 7002), ("127.0.0.5", 7002)]
    assert await resolver.resolve() == expected
    server.glue = False  # targets then need their own A queries
    server.queries.clear()
    assert await resolver.resolve() == expected
    assert ("a.cache.test", 1, "udp") in server.queries
    with pytest.raises(ResolveError, match="no such name"):
        await DNSResolver("_x._tcp.missing.test", server=addr).resolve()


async def test_dns_truncated_reply_is_asked_again_over_tcp(
    dns_server: tuple[TinyDNSServer, tuple[str, int]],
) -> None:
    """60 SRV records do not fit the UDP reply: the TC bit sends the client to TCP."""
    server, addr = dns_server
    server.srv["_big._tcp.svc.test"] = [(10, 1, 7000 + i, f"h{i}.svc.test") for i in range(60)]
    server.a.update({f"h{i}.svc.test": [f"127.0.1.{i + 1}"] for i in range(60)})
    server.udp_answers = 5
    got = await DNSResolver("_big._tcp.svc.test", server=addr).resolve()
    assert sorted(got) == sorted((f"127.0.1.{i + 1}", 7000 + i) for i in range(60))
    assert [q for q in server.queries if q[0] == "_big._tcp.svc.test"] == [
        ("_big._tcp.svc.test", 33, "udp"),
        ("_big._tcp.svc.test", 33, "tcp"),
    ]
    reply = await dns.query(addr, "_big._tcp.svc.test", dns.SRV)
    assert len(reply.answers) == 60 and not reply.truncated


async def test_dns_truncated_reply_without_tcp_is_a_clear_error() -> None:
    class Truncating(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            header = struct.pack("!HHHHHH", struct.unpack_from("!H", data)[0], 0x8380, 0, 0, 0, 0)
            self.transport.sendto(header, addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Truncating, local_addr=("127.0.0.1", 0))
    try:  # nothing listens on the TCP side of the port
        addr = transport.get_extra_info("sockname")[:2]
        with pytest.raises(dns.DNSError, match=r"truncated and TCP failed"):
            await dns.query(addr, "_a._tcp.x", dns.SRV, timeout=1)
    finally:
        transport.close()


async def test_dns_a_records_with_a_port(dns_server: tuple[TinyDNSServer, tuple[str, int]]) -> None:
    server, addr = dns_server
    server.a["web.test"] = ["127.0.0.7", "127.0.0.8"]
    assert await DNSResolver("web.test", 80, server=addr).resolve() == [
        ("127.0.0.7", 80),
        ("127.0.0.8", 80),
    ]
    server.a["web.test"] = ["127.0.0.8", "127.0.0.7"]  # rotated answers are not a change
    assert await DNSResolver("web.test", 80, server=addr).resolve() == [
        ("127.0.0.7", 80),
        ("127.0.0.8", 80),
    ]
    # without a server, address lookups go through the system resolver
    assert await DNSResolver("localhost", 81).resolve() in (
        [("127.0.0.1", 81)], [("::1", 81), ("127.0.0.1", 81)], [("127.0.0.1", 81), ("::1", 81)]
    )  # fmt: skip


async def test_dns_no_answer_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        addr = silent.getsockname()
        with pytest.raises(ResolveError, match=r"no answer within 0\.2s"):
            await DNSResolver("_a._tcp.x", server=addr, timeout=0.2).resolve()


async def test_broker_over_dns_srv(dns_server: tuple[TinyDNSServer, tuple[str, int]]) -> None:
    server, addr = dns_server
    async with backends(2) as bs:
        server.srv["_echo._tcp.svc.test"] = [(10, 1, b.port, f"{b.name}.svc.test") for b in bs]
        server.a.update({f"{b.name}.svc.test": ["127.0.0.1"] for b in bs})
        async with broker_for([DNSResolver("_echo._tcp.svc.test", server=addr)]) as broker:
            assert Counter([await ask(broker.port) for _ in range(10)]) == {"b0": 5, "b1": 5}


def test_dns_codec_rejects_malformed_replies() -> None:
    with pytest.raises(dns.DNSError, match="shorter than a DNS header"):
        dns.decode_response(b"\x00\x01")
    header = struct.pack("!HHHHHH", 1, 0x8180, 0, 1, 0, 0)
    with pytest.raises(dns.DNSError, match="loop"):
        dns.decode_response(header + b"\xc0\x0c")  # a pointer to itself
    with pytest.raises(dns.DNSError, match="truncated"):
        dns.decode_response(header + b"\x03abc")
    assert dns.encode_query(7, "a.b.", dns.SRV)[12:] == b"\x01a\x01b\x00\x00\x21\x00\x01"


async def test_failing_resolver_keeps_its_last_endpoints() -> None:
    class Flaky:
        description = "flaky"
        fail = False

        async def resolve(self) -> list[tuple[str, int]]:
            if self.fail:
                raise ResolveError("flaky: down")
            return [("127.0.0.1", 1)]

        async def watch(self, changed: object) -> None:
            return None

    flaky = Flaky()
    broker = Broker([flaky, StaticResolver([("127.0.0.1", 2)])], log=quiet)
    assert await broker.refresh() == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    flaky.fail = True
    assert await broker.refresh() == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    assert broker.status()["resolvers"]["flaky"] == "flaky: down"


# ---------------------------------------------------------------------------- the command


def test_command_line_broker_with_env_and_status(tmp_path: Path) -> None:

    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        backend.settimeout(5)
        port, admin = free_port(), free_port()
        env = {"PATH": "/usr/bin:/bin", "WEB_SERVICE_HOST": "127.0.0.1",
               "WEB_SERVICE_PORT": str(backend.getsockname()[1])}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "podkit", "ambassador", "broker", "--service", "web",
             "--listen", str(port), "--env", "--admin-port", str(admin)],
            env=env, stderr=(tmp_path / "broker.log").open("wb"),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if http_get(f"http://127.0.0.1:{admin}/healthz", timeout=1)[0] == 200:
                        break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "broker.log").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                upstream, _ = backend.accept()
                with upstream:
                    client.sendall(b"ping")
                    assert upstream.recv(4) == b"ping"
                    upstream.sendall(b"pong")
                    assert client.recv(4) == b"pong"
            data = json.loads(http_get(f"http://127.0.0.1:{admin}/status")[1])
            assert data["endpoints"][0]["connections"] == 1 and data["accepted"] == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "podkit", "ambassador", "broker", "--service", "x", "--listen", "1"],
        capture_output=True,
    )
    assert bad.returncode == 2 and b"no source of endpoints" in bad.stderr


class Mutable:
    """A resolver a test changes; counts its calls."""

    description = "mutable"

    def __init__(self, endpoints: list[tuple[str, int]]) -> None:
        self.endpoints = endpoints
        self.calls = 0

    async def resolve(self) -> list[tuple[str, int]]:
        self.calls += 1
        return list(self.endpoints)

    async def watch(self, changed: object) -> None:
        return None


async def test_re_resolves_periodically_and_on_failure() -> None:
    async with backends(2) as bs:
        source = Mutable([bs[0].endpoint])
        async with broker_for([source], refresh=0.1) as broker:
            assert await ask(broker.port) == "b0"
            source.endpoints = [bs[1].endpoint]
            start = time.monotonic()
            while await ask(broker.port) != "b1":
                assert time.monotonic() - start < 1.0
        source = Mutable([bs[0].endpoint, ("127.0.0.1", free_port())])
        async with broker_for([source], refresh=30) as broker:
            calls = source.calls
            assert {await ask(broker.port) for _ in range(2)} == {"b0"}  # one hit the dead one
            await asyncio.sleep(0.1)
            assert source.calls > calls  # the failure started a re-resolve


def test_spec_component_runs_the_command() -> None:
    from podkit.system.components import component_argv, known_components

    assert "ambassador.broker" in known_components()
    argv = component_argv("ambassador.broker", {"service": "db", "listen": 5433, "env": True})
    assert argv[-7:] == ["ambassador", "broker", "--service", "db", "--listen", "5433", "--env"]


def test_a_port_in_use_is_a_one_line_error() -> None:
    broker = ["ambassador", "broker", "--service", "x", "--endpoint", "127.0.0.1:1"]
    with port_in_use() as port:
        error = f"ambassador: cannot listen on 127.0.0.1:{port}"
        assert podkit_error([*broker, "--listen", str(port)]) == (
            1, f"{error} (--listen): Address already in use")  # fmt: skip
        assert podkit_error([*broker, "--listen", "0", "--admin-port", str(port)]) == (
            1, f"{error} (--admin-port): Address already in use")  # fmt: skip
