"""Backend URLs for the contract suite: one parameter per driver, each test namespaced."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

KV_DRIVERS = ["memory", "sqlite", "redis", "nats", "etcd"]
QUEUE_DRIVERS = ["memory", "sqlite", "redis", "nats"]
TOPIC_DRIVERS = ["memory", "sqlite", "redis", "nats"]


def make_url(driver: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    tag = "t" + uuid.uuid4().hex[:10]
    if driver == "memory":
        return f"memory://{tag}"
    if driver == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if driver == "redis":
        return f"{request.getfixturevalue('redis_server').url}?prefix={tag}:"
    if driver == "nats":
        return f"{request.getfixturevalue('nats_server').url}?prefix={tag}"
    if driver == "etcd":
        return f"{request.getfixturevalue('etcd_server').url}?prefix={tag}/"
    raise ValueError(driver)


@pytest.fixture(params=KV_DRIVERS)
def kv_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_url(request.param, request, tmp_path)


@pytest.fixture(params=QUEUE_DRIVERS)
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_url(request.param, request, tmp_path)


@pytest.fixture(params=TOPIC_DRIVERS)
def topic_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_url(request.param, request, tmp_path)
