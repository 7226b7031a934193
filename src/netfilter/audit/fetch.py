"""Bounded HTTP reads of a node's tlog-tiles, for `audit follow`.

TLS is verified; http:// is refused unless the host is a loopback address (or the
caller allows it); redirects are not followed (a moved log is for the auditor to
notice); every response is read up to a limit, and a whole response must arrive
within the time-out, so a node can neither exhaust the auditor's memory nor hold it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from urllib.parse import urlsplit

import httpx

from netfilter.errors import NetfilterError

__all__ = ["TIMEOUT", "FetchError", "Fetcher", "base_url"]

TIMEOUT = 10.0
"""Seconds for a whole response (connect, headers and body)."""


class FetchError(NetfilterError):
    """The node could not be read, or answered what a tlog-tiles server never does."""


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    """An IP address, or a DNS name whose labels (after IDNA) are 1-63 letters, digits
    and inner hyphens."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
        _ = httpx.URL(f"https://{ascii_host}/").host  # decodes xn-- labels: strict IDNA
    except (UnicodeError, httpx.InvalidURL):
        return False
    labels = ascii_host.removesuffix(".").split(".")
    return len(ascii_host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def base_url(url: str, *, allow_http: bool = False) -> str:
    """The log's base URL, ending in "/"; NetfilterError (a user mistake) names why not."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a bad port raises here
    except ValueError as e:
        raise NetfilterError(url, f"not a URL ({e})") from None
    if parts.scheme not in ("https", "http") or not host:
        raise NetfilterError(url, "want an https:// URL of the log (the directory that "
                                  "holds checkpoint and tile/)")
    if not _valid_host(host):
        raise NetfilterError(url, f"{host!r} is not a host name or IP address")
    if parts.scheme == "http" and not allow_http and not _loopback(host):
        raise NetfilterError(url, "http:// only for a loopback address; use https:// "
                                  "or --allow-http")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise NetfilterError(url, "no query, fragment or user name in the log's URL")
    return url if url.endswith("/") else url + "/"


class Fetcher:
    """GETs below one base URL; counts its requests (the tests check how few)."""

    def __init__(self, base: str, *, timeout: float = TIMEOUT) -> None:
        self.base = base
        self.timeout = timeout
        self.requests = 0
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), verify=True, follow_redirects=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "netfilter-audit-follow"})

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, limit: int) -> bytes | None:
        """The body of base/path (None for 404), at most `limit` bytes."""
        url = self.base + path
        self.requests += 1
        deadline = time.monotonic() + self.timeout
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code == 404:
                    return None
                if response.is_redirect:
                    raise FetchError(url, f"HTTP {response.status_code} to "
                                          f"{response.headers.get('location', '?')[:200]!r}: "
                                          "redirects are not followed (give the log's URL)")
                if response.status_code != 200:
                    raise FetchError(url, f"HTTP {response.status_code} "
                                          f"{response.reason_phrase}".rstrip())
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise FetchError(url, f"a response of {length} bytes, more than the "
                                          f"{limit} it may have")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise FetchError(url, f"a response longer than the {limit} bytes "
                                              "it may have")
                    if time.monotonic() > deadline:
                        raise FetchError(url, f"the response took more than {self.timeout:g}s")
                return bytes(body)
        except httpx.TimeoutException:
            raise FetchError(url, f"no answer within {self.timeout:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
            raise FetchError(url, f"cannot fetch ({e or type(e).__name__})") from None
