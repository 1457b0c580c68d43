"""podkit's build hook: `PODKIT_COMPILE=1` compiles the proxy's hot path with mypyc.

Without it (the default, and what an editable install gets) podkit is pure Python. With it,
the modules below become C extensions: the same code and behaviour, about 2.7 times fewer
instructions per proxied request in the proxy's own code (`docs/lb.md`). A compiled build
needs a C compiler, Python's headers, mypy, and podkit's dependencies importable (mypyc
type-checks the modules first), so build it with `--no-build-isolation` in an environment
that has them, e.g.:

    PODKIT_COMPILE=1 pip install --no-build-isolation .
"""

import os

from setuptools import setup

# the proxy engine's request path (under `podkit lb`, the TLS sidecar and the split
# ambassador), and the policies and filters `podkit lb` runs per request
# (podkit.net.proxy.hooks stays Python: users subclass it)
COMPILED = [
    "src/podkit/net/http.py",
    "src/podkit/net/httpwrite.py",
    "src/podkit/net/pool.py",
    "src/podkit/net/tlsconn.py",
    "src/podkit/net/proxy/config.py",
    "src/podkit/net/proxy/exchange.py",
    "src/podkit/net/proxy/clientconn.py",
    "src/podkit/net/proxy/upstreamconn.py",
    "src/podkit/net/proxy/engine.py",
    "src/podkit/net/proxy/retry.py",
    "src/podkit/net/proxy/states.py",
    "src/podkit/net/proxy/timeouts.py",
    "src/podkit/net/proxy/upstream.py",
    "src/podkit/ring.py",
    "src/podkit/lb/balancer.py",
    "src/podkit/lb/policy.py",
    "src/podkit/lb/breaker.py",
    "src/podkit/lb/cache.py",
    "src/podkit/lb/cachecontrol.py",
    "src/podkit/lb/filters.py",
    "src/podkit/lb/health.py",
    "src/podkit/lb/ratelimit.py",
]

ext_modules = []
if os.environ.get("PODKIT_COMPILE", "0") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
