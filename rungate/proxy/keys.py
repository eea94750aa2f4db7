"""Typed application state (`web.AppKey`s); handlers import these, never strings."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from rungate.config import Settings
from rungate.crypto import Keyring
from rungate.prices import PriceTable
from rungate.proxy.breaker import Breakers
from rungate.proxy.inflight import Inflight
from rungate.proxy.upstream import TargetResolver
from rungate.readcache import ReadCache
from rungate.store import EventStore

SETTINGS = web.AppKey("SETTINGS", Settings)
STORE = web.AppKey("STORE", EventStore)
KEYRING = web.AppKey("KEYRING", Keyring)
PRICES = web.AppKey("PRICES", PriceTable)
HTTP = web.AppKey("HTTP", aiohttp.ClientSession)
TARGETS = web.AppKey("TARGETS", TargetResolver)
AGENTS = web.AppKey("AGENTS", ReadCache)  # token digest → agent row, for the proxy routes
INFLIGHT = web.AppKey("INFLIGHT", Inflight)  # calls between admission and settlement, by run (kill switch)
BREAKERS = web.AppKey("BREAKERS", Breakers)  # one circuit per route target, in this process

# Set on a request once its response headers went out: from then on errors end the stream, not a new response.
STREAM_STARTED = web.RequestKey("STREAM_STARTED", bool)
REQUEST_ID = web.RequestKey("REQUEST_ID", str)
