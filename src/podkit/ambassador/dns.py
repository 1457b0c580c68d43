"""The DNS client under its first name: it lives in `podkit.net.discovery.dns`."""

from podkit.net.discovery.dns import *  # noqa: F403
