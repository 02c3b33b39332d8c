"""Fixtures: the local multi-host site and a throw-away Redis, one per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer
from tests.site import HOSTS, Site


@pytest.fixture(scope="session")
def _site_session() -> Iterator[Site]:
    with Site(HOSTS) as site:
        yield site


@pytest.fixture
def site(_site_session: Site) -> Iterator[Site]:
    """The site, with no routes and no recorded hits."""
    _site_session.reset()
    yield _site_session
    _site_session.reset()


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> Iterator[RedisServer]:
    """A running, empty Redis on a free port (tests may stop and start it)."""
    _redis_session.start()
    _redis_session.client().flushall()
    yield _redis_session
    _redis_session.start()
