"""Where a webhook may point: SSRF guards (reference/peer-failures.md, "SSRF / provider-key exfiltration").

A webhook URL is chosen by whoever holds the admin token, and Rungate then POSTs to it from inside the
network it runs in. So only `http`/`https` URLs with a host and no credentials are accepted, and every
address the host resolves to must be public: not loopback, private, link-local, multicast, reserved,
unspecified or otherwise not globally routable — IPv4 and IPv6, with IPv4 addresses embedded in IPv6
ones (IPv4-mapped, 6to4, Teredo, NAT64) judged as the IPv4 address they carry — unless
`RUNGATE_WEBHOOK_ALLOW_PRIVATE=true`.

The check runs when a webhook is created or changed, again before every delivery attempt (DNS may have
changed), and a third time inside the HTTP client's resolver (`GuardedResolver`), on the very addresses
it is about to connect to, so a name that resolves to a public address for the check and to a private
one for the connection (DNS rebinding) is refused too. Redirects are never followed.

URLs are parsed with yarl, the parser aiohttp itself connects with, so the check and the connection cannot
read one URL two ways.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from rungate.errors import BadRequest

MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 5.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CHECKS = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_reserved", "a reserved address"),
    ("is_private", "a private address"),
)


class BlockedAddress(OSError):
    """Raised by `GuardedResolver` for a host that resolves to an address webhooks may not reach."""


def blocked_reason(address: IPAddress) -> str | None:
    """Why webhooks may not reach `address` (`"a loopback address"`, …), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # `::ffff:a.b.c.d` is that IPv4 address, nothing else
            return blocked_reason(address.ipv4_mapped)
        embedded: ipaddress.IPv4Address | None = address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]  # the client's address, as Teredo carries it
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (reason := blocked_reason(embedded)) is not None:
            return reason
    for attribute, label in _CHECKS:
        if getattr(address, attribute):
            return label
    if not address.is_global:
        return "an address that is not globally routable"
    return None


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # a scoped IPv6 address (`fe80::1%eth0`)
    except ValueError:
        return None


def parse_webhook_url(raw: Any) -> URL:
    """The URL, or 400 `invalid_webhook_url` naming what is wrong with it (no resolution here)."""
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("`url` must be a non-empty string.")
    text = raw.strip()
    if len(text) > MAX_URL_CHARS:
        raise _invalid(f"`url` must be at most {MAX_URL_CHARS} characters.")
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in text):
        raise _invalid("`url` must not contain whitespace, control characters or backslashes.")
    try:
        url = URL(text)
        port = url.port
    except (ValueError, TypeError):
        raise _invalid("`url` is not a valid URL.") from None
    if url.scheme not in ("http", "https"):
        raise _invalid("`url` must be an http or https URL.")
    if not url.raw_host:
        raise _invalid("`url` must name a host.")
    if url.raw_user is not None or url.raw_password is not None:
        raise _invalid("`url` must not carry credentials (user:password@); authenticate with the signature.")
    if port is None or not 0 < port < 65536:
        raise _invalid("`url` has an invalid port.")
    return url


async def check_webhook_url(raw: Any, *, allow_private: bool) -> str:
    """`raw` as a webhook URL Rungate may send to, or 400 `invalid_webhook_url` saying why not.

    The host is resolved with the event loop's `getaddrinfo`; every address must be public unless
    `allow_private`.
    """
    url = parse_webhook_url(raw)
    if allow_private:
        return str(url)
    host = url.raw_host or ""
    literal = _address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(_getaddrinfo(host, url.port or 0), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError, UnicodeError):
            raise _invalid(f"`url`: the host {host} does not resolve.") from None
        addresses = [a for a in (_address(str(info[4][0])) for info in infos) if a is not None]
        if not addresses:
            raise _invalid(f"`url`: the host {host} does not resolve.")
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None:
            where = f"{address} is" if literal is not None else f"{host} resolves to {address},"
            raise _invalid(f"`url`: {where} {reason}; webhooks only reach public addresses"
                           " (RUNGATE_WEBHOOK_ALLOW_PRIVATE=true lifts this).")
    return str(url)


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_webhook_url")


# Webhook hosts are resolved on threads of their own: a receiver's slow DNS must not take the threads the
# proxy's own upstream look-ups run on (the loop's default executor).
_DNS_THREADS = 4
_dns_pool: ThreadPoolExecutor | None = None


async def _getaddrinfo(host: str, port: int, family: int = socket.AF_UNSPEC,
                       flags: int = 0) -> list[tuple[Any, ...]]:
    global _dns_pool
    if _dns_pool is None:
        _dns_pool = ThreadPoolExecutor(max_workers=_DNS_THREADS, thread_name_prefix="rungate-webhook-dns")
    lookup = functools.partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, flags)
    return await asyncio.get_running_loop().run_in_executor(_dns_pool, lookup)


class GuardedResolver(ThreadedResolver):
    """The deliverer's resolver: its own threads' `getaddrinfo`, refusing a host with any non-public address."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await _getaddrinfo(host, port, family, socket.AI_ADDRCONFIG)
        results: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            results.append(ResolveResult(hostname=host, host=str(address[0]), port=int(address[1]), family=fam,
                                         proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not results:
            raise OSError(f"{host} does not resolve")
        for result in results:
            address = _address(result["host"])
            reason = "an address that cannot be read" if address is None else blocked_reason(address)
            if reason is not None:
                raise BlockedAddress(f"{host} resolves to {result['host']}, {reason}")
        return results
