"""Fetching a list's newest bundle from its source, only when it changed.

A source is an https:// URL or a local path. A directory, or a URL ending in `/`,
holds the bundle under the configured list's file name; any other source names the
bundle itself. HTTPS requests are conditional (If-None-Match with the last ETag,
If-Modified-Since with the last Last-Modified): a 304 costs no body and nothing is
written. TLS is always verified, against the system's CAs or, with `updates.ca`,
only against that pinned CA; a redirect to anything but https:// is refused. A local
file is "not modified" while its device, inode, size and modification time are.

`probe` asks the same conditional question without reading the body (HEAD; a GET
whose body is left unread where a server refuses HEAD; a stat for a local file): what
the updater asks before it tries a delta instead of the full bundle. A location with
nothing at it (HTTP 404 or 410, no such file) raises `SourceAbsent`, so that a
missing delta can be told from a failing source.

Nothing here verifies a bundle: the bytes go to a file the installer gave, and the
installer verifies them before they can replace anything.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import IO, TYPE_CHECKING

from netfilter import __version__
from netfilter.config import UpdateSettings
from netfilter.errors import NetfilterError
from netfilter.updates.state import Validators

if TYPE_CHECKING:
    import httpx

__all__ = ["FetchError", "Fetched", "SourceAbsent", "TooLarge", "bundle_location", "fetch",
           "is_url", "probe"]

CHUNK = 1 << 20


class FetchError(NetfilterError):
    """A source could not be read (unreachable, TLS, HTTP status, too large)."""


class SourceAbsent(FetchError):
    """Nothing at that location of the source (HTTP 404 or 410, or no such file)."""


class TooLarge(FetchError):
    """The body is (or says it is) larger than the limit; refused, not read further."""


@dataclass(frozen=True)
class Fetched:
    """What a fetch found: a new body (written) or "not modified" (nothing written).

    From `probe`, nothing is written either way and `size` is the size the source
    states (Content-Length, or the file's size; 0 when it states none)."""

    modified: bool
    validators: Validators
    size: int = 0


def is_url(source: str) -> bool:
    return source.lower().startswith("https://")


def bundle_location(source: str, list_path: Path, base: Path) -> str:
    """The URL or absolute path of a list's bundle at its source."""
    if is_url(source):
        return source + list_path.name if source.endswith("/") else source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    return str(path / list_path.name if path.is_dir() else path)


def fetch(location: str, out: IO[bytes], validators: Validators,
          settings: UpdateSettings, *, ca: Path | None = None, max_size: int | None = None,
          limit: str = "updates.max_size") -> Fetched:
    """Write the bundle at `location` to `out` unless it is unchanged since `validators`.

    `ca` is `updates.ca` resolved (a pinned CA file), or None for the system's CAs.
    `max_size` bounds this body tighter than `updates.max_size` (`limit` names it in
    the error)."""
    if max_size is None or max_size >= settings.max_size:
        max_size, limit = settings.max_size, "updates.max_size"
    if is_url(location):
        return _fetch_https(location, out, validators, settings, ca, max_size, limit)
    return _fetch_file(Path(location), out, validators, max_size, limit)


def probe(location: str, validators: Validators, settings: UpdateSettings, *,
          ca: Path | None = None) -> Fetched:
    """Has the bundle at `location` changed since `validators`? Reads no body.

    The same request rules as `fetch` (pinned CA, https only, conditional headers); a
    local file is stat'ed, not opened. Raises SourceAbsent and FetchError as `fetch`."""
    if is_url(location):
        return _probe_https(location, validators, settings, ca)
    return _probe_file(Path(location), validators)


def _file_tag(st: os.stat_result) -> str:
    return f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _fetch_file(path: Path, out: IO[bytes], validators: Validators,
                max_size: int, limit: str) -> Fetched:
    try:
        source = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError as e:
        raise SourceAbsent(path, "no bundle at the source") from e
    except OSError as e:
        raise FetchError(path, f"cannot read the source ({e.strerror})") from e
    with source:
        st = os.fstat(source.fileno())
        tag = _file_tag(st)
        now = Validators(etag=tag, last_modified=formatdate(st.st_mtime, usegmt=True))
        if validators.etag == tag:
            return Fetched(False, now)
        if st.st_size > max_size:
            raise TooLarge(path, f"bundle of {st.st_size} bytes exceeds {limit}")
        size = 0
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > max_size:
                raise TooLarge(path, f"bundle exceeds {limit}")
            out.write(chunk)
    return Fetched(True, now, size)


def _probe_file(path: Path, validators: Validators) -> Fetched:
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise SourceAbsent(path, "no bundle at the source") from e
    except OSError as e:
        raise FetchError(path, f"cannot read the source ({e.strerror})") from e
    tag = _file_tag(st)
    now = Validators(etag=tag, last_modified=formatdate(st.st_mtime, usegmt=True))
    return Fetched(validators.etag != tag, now, st.st_size)


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """Verifying TLS: the system's CAs, or only a pinned CA file."""
    try:
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise FetchError(ca or "system CAs", f"cannot load the CA certificates ({e})") from e


def _conditional(validators: Validators) -> dict[str, str]:
    headers = {"User-Agent": f"netfilter/{__version__} (list update)"}
    if validators.etag and not validators.etag.startswith("file:"):
        headers["If-None-Match"] = validators.etag
    if validators.last_modified:
        headers["If-Modified-Since"] = validators.last_modified
    return headers


def _client(url: str, settings: UpdateSettings, ca: Path | None) -> httpx.Client:
    """Verifying TLS (system CAs or the pinned CA), redirects to https:// only."""
    import httpx

    def https_only(request: httpx.Request) -> None:
        if request.url.scheme != "https":
            raise FetchError(url, f"redirected to {request.url.scheme}://, refused "
                                  "(https only)")

    return httpx.Client(verify=tls_context(ca), timeout=settings.timeout,
                        follow_redirects=True, max_redirects=5,
                        event_hooks={"request": [https_only]})


def _answer(url: str, response: httpx.Response, headers: dict[str, str],
            validators: Validators, max_size: int,
            limit: str = "updates.max_size") -> Fetched:
    """What a response's status and headers say, before any body is read: not
    modified (raises on a 304 to an unconditional request), or modified (the stated
    size checked against max_size); any other status raises."""
    now = Validators(response.headers.get("ETag"), response.headers.get("Last-Modified"))
    if response.status_code == 304:
        if "If-None-Match" not in headers and "If-Modified-Since" not in headers:
            raise FetchError(url, "304 Not Modified to an unconditional request")
        return Fetched(False, Validators(now.etag or validators.etag,
                                         now.last_modified or validators.last_modified))
    if response.status_code in (404, 410):
        raise SourceAbsent(url, f"HTTP {response.status_code} {response.reason_phrase}")
    if response.status_code != 200:
        raise FetchError(url, f"HTTP {response.status_code} {response.reason_phrase}")
    length = response.headers.get("Content-Length")
    size = int(length) if length is not None and length.isdigit() else 0
    if size > max_size:
        raise TooLarge(url, f"bundle of {length} bytes exceeds {limit}")
    return Fetched(True, now, size)


def _fetch_https(url: str, out: IO[bytes], validators: Validators,
                 settings: UpdateSettings, ca: Path | None, max_size: int,
                 limit: str) -> Fetched:
    import httpx

    headers = _conditional(validators)
    try:
        with _client(url, settings, ca) as client, \
                client.stream("GET", url, headers=headers) as response:
            answer = _answer(url, response, headers, validators, max_size, limit)
            if not answer.modified:
                return answer
            size = 0
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > max_size:
                    raise TooLarge(url, f"bundle exceeds {limit}")
                out.write(chunk)
            return Fetched(True, answer.validators, size)
    except httpx.HTTPError as e:
        reason = str(e) or type(e).__name__
        raise FetchError(url, f"cannot fetch ({reason[:300]})") from e


def _probe_https(url: str, validators: Validators, settings: UpdateSettings,
                 ca: Path | None) -> Fetched:
    """A conditional HEAD: no body travels at all. A server that refuses HEAD (405,
    501) is asked with a GET whose body is left unread (the connection is closed after
    the headers: what travels is at most what was in flight)."""
    import httpx

    headers = _conditional(validators)
    try:
        with _client(url, settings, ca) as client:
            response = client.head(url, headers=headers)
            if response.status_code not in (405, 501):
                return _answer(url, response, headers, validators, settings.max_size)
            with client.stream("GET", url, headers=headers) as streamed:
                return _answer(url, streamed, headers, validators, settings.max_size)
    except httpx.HTTPError as e:
        reason = str(e) or type(e).__name__
        raise FetchError(url, f"cannot ask ({reason[:300]})") from e
