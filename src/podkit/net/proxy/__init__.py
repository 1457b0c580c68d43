"""The proxy engine every HTTP pattern stands on.

- `engine`: `Proxy` (one worker: client and upstream connections, the exchange, retries,
  timeouts, the fast path), `ProxyConfig`;
- `hooks`: the per-request pipeline (`Filter`, `BaseFilter`) where features plug in;
- `upstream`: `Upstream`, `parse_upstream`, the `Policy` protocol and `RoundRobin`;
- `retry`: which tries may be sent again, and the retry budget;
- `workers`: N worker processes on one port (`serve`), TLS termination for each;
- `config`: a `ProxyConfig` from a component's flags (`proxy_config`);
- `flags`: the engine's command-line options, declared once for the components built on it.
"""
