"""Opening backends by URL: clear errors for bad URLs and servers that do not answer."""

from __future__ import annotations

import time

import pytest

from podkit.backends import (
    BackendUnavailable,
    UnsupportedURL,
    mask,
    open_kv,
    open_queue,
    open_topic,
)
from servers import find_free_port


def test_mask_hides_passwords() -> None:
    assert mask("redis://user:s3cret@db:6379/0") == "redis://user:***@db:6379/0"
    assert mask("redis://:s3cret@db/0") == "redis://:***@db/0"
    assert mask("nats://db:4222") == "nats://db:4222"


async def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(UnsupportedURL) as info:
        await open_kv("mongodb://u:pw@db:27017")
    msg = str(info.value)
    assert "mongodb://u:***@db:27017: unknown scheme 'mongodb'" in msg
    assert "redis://" in msg and "pw" not in msg


async def test_not_a_url_and_bad_port() -> None:
    with pytest.raises(UnsupportedURL, match="not a backend URL"):
        await open_kv("localhost:6379")
    with pytest.raises(UnsupportedURL, match=r"redis://127.0.0.1:99999/0.*[Pp]ort"):
        await open_kv("redis://127.0.0.1:99999/0")


async def test_etcd_offers_no_queue() -> None:
    with pytest.raises(UnsupportedURL, match=r"etcd:// offers no queue \(use one of: memory://"):
        await open_queue("etcd://127.0.0.1:2379")
    with pytest.raises(UnsupportedURL, match="offers no topic"):
        await open_topic("etcd://127.0.0.1:2379")


@pytest.mark.parametrize("scheme", ["redis", "nats", "etcd"])
async def test_a_server_that_does_not_answer(scheme: str) -> None:
    port = find_free_port()  # nothing listens there
    creds = "" if scheme == "etcd" else "admin:hunter2@"
    url = f"{scheme}://{creds}127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await open_kv(url)
    assert time.monotonic() - start < 15
    msg = str(info.value)
    assert f"{scheme}://{creds.replace('hunter2', '***')}127.0.0.1:{port}" in msg
    assert f"127.0.0.1:{port}" in msg and "within" in msg and "s (" in msg
    assert "hunter2" not in msg
