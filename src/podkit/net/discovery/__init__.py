"""Service discovery: where a service's instances are, followed as they come and go.

The service broker (`podkit.ambassador.broker`) and the balancer's membership
(`podkit.lb.members`) are both built on it. A `Resolver` answers `resolve()` with the
endpoints it finds, and `watch(changed)` calls `changed()` when they may have changed
(returning at once when its source is polled instead):

- `StaticResolver`: a fixed list (flags or the spec);
- `EnvResolver`: `<NAME>_SERVICE_HOST` and `<NAME>_SERVICE_PORT`, as `podkit up` and
  Kubernetes set them;
- `DNSResolver`: SRV records (`_service._proto.name`), or every A/AAAA address of a
  name with a port, over podkit's own DNS client (`dns`) or the system resolver;
- `FileResolver`: a members file, one entry a line, read again when it changes; a file
  with a bad line is refused whole (`write_members` replaces one atomically);
- `KVRegistry`: one key per instance under a KV prefix, watched; a value that does not
  parse is skipped and logged. `Registration` keeps an instance's key under a lease.

File and registry entries are `host:port` unless a `parse` reads them otherwise (the
balancer's read `http://host:port,weight=N`). A `Follower` resolves its resolvers now,
every `interval`, on `poke()` and when a watch says so; it hands on their merged list,
and a resolver that fails keeps its last list.
"""

from podkit.net.discovery.follow import Follower
from podkit.net.discovery.resolvers import (
    DNSResolver,
    EnvResolver,
    FileResolver,
    KVRegistry,
    MembersError,
    Registration,
    ResolveError,
    Resolver,
    StaticResolver,
    env_name,
    format_endpoint,
    parse_endpoint,
    parse_members,
    write_members,
)

__all__ = [
    "DNSResolver",
    "EnvResolver",
    "FileResolver",
    "Follower",
    "KVRegistry",
    "MembersError",
    "Registration",
    "ResolveError",
    "Resolver",
    "StaticResolver",
    "env_name",
    "format_endpoint",
    "parse_endpoint",
    "parse_members",
    "write_members",
]
