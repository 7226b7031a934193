"""The operator dashboard under /admin/: routes beside the transparency page's.

Why each guard is there:
- Sessions are server-side (an id in a cookie signed with a key kept in the state
  directory, 0600): logout ends one at once, and a restart ends them all. The cookie is
  HttpOnly, SameSite=Strict, Path=/admin, and Secure when the request came over TLS.
- Every POST carries the session's form token (checked in constant time; a new one after
  each accepted form, so a replayed form is refused) and an Origin (or Referer) naming
  the host and port the Host field names. The login form has its own token, bound to a
  short-lived signed cookie.
- Failed logins are counted per client address (5) and per account name (25, so one
  client cannot lock an account for everyone) over 5 minutes; past a limit every
  attempt is refused (429), the right password too, until the window has passed. At
  most MAX_HASHING password checks run at once, MAX_HASH_WAITING wait (then 503).
- Only loopback clients (the connection's peer; no forwarded-for header is read) are
  served unless `web.admin_remote` says otherwise. Every method on every path under
  /admin/ meets these checks before anything else.
- Nothing here shows a client or a blocked name: the audit log is read only as counts
  (list, category, front-end, day), and the error ring strips addresses from messages.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, TimestampSigner
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from netfilter.audit.store import AuditStore
from netfilter.config import Settings
from netfilter.engine import Engine
from netfilter.errors import NetfilterError
from netfilter.web.accounts import Accounts, session_secret
from netfilter.web.blockstats import DAYS, BlockStats
from netfilter.web.head import Request as HeadRequest

__all__ = ["PREFIX", "AdminSite", "ErrorRing", "LoginLimiter", "admin_body"]

log = logging.getLogger(__name__)

PREFIX = "/admin/"
COOKIE_PATH = "/admin"
COOKIE = "netfilter_admin"
LOGIN_COOKIE = "netfilter_admin_login"
SESSION_LIFETIME = 8 * 3600.0  # seconds a session lasts, used or not
LOGIN_FORM_LIFETIME = 900  # seconds a login form may wait to be sent
MAX_SESSIONS = 256  # the oldest goes first
MAX_FORM = 4096  # bytes of a form body read
MAX_HASHING = 2  # password checks at once (argon2id: 64 MiB each) ...
MAX_HASH_WAITING = 16  # ... and waiting for their turn; past it a login gets 503
CSP = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store", "Content-Security-Policy": CSP,
           "X-Frame-Options": "DENY"}
TEMPLATES = Path(__file__).parent / "templates" / "admin"
PAGES = (("", "Status"), ("lists", "Lists"), ("held", "Held updates"),
         ("blocks", "Blocks"), ("audit", "Audit log"), ("errors", "Recent errors"))
# What may be an IPv4 or IPv6 address (a candidate is replaced when it parses as one)
_ADDRESS = re.compile(r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}"
                      r"(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?)(?![\w.:])")


def _strip_addresses(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        try:
            ipaddress.ip_address(match.group(0).split("%")[0])
        except ValueError:
            return match.group(0)
        return "[address]"

    return _ADDRESS.sub(one, text)


def admin_body(request: HeadRequest) -> bool:
    """The guard's `keeps_body`: forms under /admin/ get their bodies, nothing else."""
    return request.method == "POST" and request.target.startswith(PREFIX)


# ------------------------------------------------------------ recent errors


@dataclass(frozen=True)
class LogEntry:
    time: str
    level: str
    logger: str
    message: str


class ErrorRing(logging.Handler):
    """The last `size` WARNING+ records, addresses replaced by "[address]"."""

    def __init__(self, size: int = 100) -> None:
        super().__init__(logging.WARNING)
        self.entries: deque[LogEntry] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _strip_addresses(record.getMessage())[:500]
        except Exception:  # a bad format string: the template instead
            text = str(record.msg)[:500]
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        self.entries.append(LogEntry(stamp, record.levelname, record.name, text))


# ------------------------------------------------------------ login attempts


class LoginLimiter:
    """Failed logins per key (a client address, an account) within `window` seconds;
    at `limit` the key is refused until its oldest failure leaves the window."""

    def __init__(self, limit: int, window: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        horizon = self.clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures

    def blocked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.limit

    def forgive(self, key: str) -> None:
        """Take back the latest failure of `key` (the attempt it stood for succeeded)."""
        failures = self._failures.get(key)
        if failures:
            failures.pop()

    def failed(self, key: str) -> None:
        failures = self._recent(key)
        self._failures[key] = failures
        self._failures.move_to_end(key)
        failures.append(self.clock())
        while len(failures) > self.limit:
            failures.popleft()
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)


# ------------------------------------------------------------ sessions


@dataclass
class Session:
    user: str
    token: str
    expires: float
    credential: str = ""  # the account's hash at login: a new password or removal ends it


@dataclass
class Sessions:
    """Live sessions by id; bounded (the oldest goes first)."""

    clock: Callable[[], float] = time.monotonic
    live: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def new(self, user: str, credential: str = "") -> tuple[str, Session]:
        sid = secrets.token_urlsafe(24)
        session = Session(user, secrets.token_urlsafe(24), self.clock() + SESSION_LIFETIME,
                          credential)
        self.live[sid] = session
        while len(self.live) > MAX_SESSIONS:
            self.live.popitem(last=False)
        return sid, session

    def get(self, sid: str) -> Session | None:
        session = self.live.get(sid)
        if session is not None and session.expires <= self.clock():
            del self.live[sid]
            return None
        return session

    def end(self, sid: str) -> None:
        self.live.pop(sid, None)


def _loopback(host: str | None) -> bool:
    """Whether the connection's peer (never a forwarded-for header) is on loopback;
    an IPv4 loopback client of a dual-stack listener (::ffff:127.0.0.1) is too."""
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# ------------------------------------------------------------ charts


def bar_chart(title: str, days: list[str], values: dict[str, int]) -> dict[str, Any]:
    """One series as SVG geometry (a bar per day, oldest left); the template draws it."""
    width, height, top = 600, 120, max([*values.values(), 1])
    step = width / max(len(days), 1)
    bars = []
    for i, day in enumerate(days):
        h = round(values.get(day, 0) / top * (height - 20), 1)
        bars.append({"day": day, "count": values.get(day, 0), "x": round(i * step + 1, 1),
                     "w": round(max(step - 2, 1), 1), "h": h, "y": round(height - h, 1)})
    return {"title": title, "width": width, "height": height, "top": top, "bars": bars,
            "total": sum(values.values()), "first": days[0] if days else "",
            "last": days[-1] if days else ""}


def charts(per_day: Iterable[tuple[str, str, int]], days: list[str],
           limit: int = 8) -> list[dict[str, Any]]:
    """A chart per name (list, category, front-end) from (day, name, count) rows: the
    `limit` busiest names, the others summed as "other"."""
    by_name: dict[str, Counter[str]] = {}
    for day, name, count in per_day:
        by_name.setdefault(name or "(none)", Counter())[day] += count
    ranked = sorted(by_name, key=lambda n: (-sum(by_name[n].values()), n))
    out = [bar_chart(name, days, dict(by_name[name])) for name in ranked[:limit]]
    rest: Counter[str] = Counter()
    for name in ranked[limit:]:
        rest.update(by_name[name])
    if rest:
        out.append(bar_chart("other", days, dict(rest)))
    return out


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return ""
    days = (now - then).days
    return "today" if days < 1 else "1 day" if days == 1 else f"{days} days"


# ------------------------------------------------------------ the site

Handler = Callable[[Request, "Session", str], Awaitable[Response]]


class AdminSite:
    """The dashboard's routes and state; `attach` hands it the running parts (for the
    status page: the same sources /metrics and /readyz read)."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 accounts: Accounts | None = None, ring: ErrorRing | None = None,
                 per_client: int = 5, per_account: int = 25, window: float = 300.0) -> None:
        self.settings = settings
        self.engine = engine
        self.accounts = accounts or Accounts.for_settings(settings)
        try:
            secret = session_secret(settings)
        except OSError as e:  # a read-only state directory: a key of this process only
            log.warning("admin: no session key kept in the state directory (%s); "
                        "this process signs with a key of its own", e.strerror or e)
            secret = secrets.token_bytes(32)
        self.signer = TimestampSigner(secret, salt="netfilter-admin")
        self.sessions = Sessions()
        self.by_client = LoginLimiter(per_client, window)
        self.by_account = LoginLimiter(per_account, window)
        self.ring = ring or ErrorRing()
        web = settings.web
        self.remote = bool(web is not None and web.admin_remote)
        self.parts: list[object] = []
        self.tiles: Any = None
        self.updater: Any = None
        self._metrics: Any = None
        # The audit log is read by one thread of its own (its store, its counts).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin")
        self._store: AuditStore | None = None
        self._aggregates: BlockStats | None = None
        self._hashing = asyncio.Semaphore(MAX_HASHING)
        self._waiting = 0
        self._closed = False
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)), auto_reload=False,
                               autoescape=select_autoescape(default=True,
                                                            default_for_string=True),
                               trim_blocks=True, lstrip_blocks=True)

    def attach(self, parts: list[object], tiles: Any = None, updater: Any = None) -> None:
        self.parts, self.tiles, self.updater, self._metrics = parts, tiles, updater, None

    def install(self) -> None:
        """Collect WARNING+ records for the errors page (until `close`)."""
        logging.getLogger().addHandler(self.ring)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.ring)
        if self._closed:
            return
        self._closed = True
        self._worker.submit(self._close_store)  # after the reads in flight
        self._worker.shutdown(wait=True)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -------------------------------------------------------- plumbing

    def _page(self, name: str, status: int = 200, **context: Any) -> Response:
        body = self.env.get_template(name).render(pages=PAGES, **context)
        return Response(body, status_code=status, media_type="text/html; charset=utf-8",
                        headers=HEADERS)

    def _session(self, request: Request) -> tuple[str, Session] | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            sid = self.signer.unsign(raw, max_age=int(SESSION_LIFETIME)).decode()
        except (BadSignature, UnicodeDecodeError):
            return None
        session = self.sessions.get(sid)
        if session is None:
            return None
        if self.accounts.credential(session.user) != session.credential:
            self.sessions.end(sid)  # the account was removed or given a new password
            return None
        return sid, session

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """Origin (else Referer) names this very host and port, as the Host field does.
        The scheme is not compared: behind a TLS front the browser's is https and
        ours is http."""
        host = request.headers.get("host", "").lower()
        origin = request.headers.get("origin") or request.headers.get("referer")
        if not host or origin is None:
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return {}
        from urllib.parse import parse_qsl

        try:
            return dict(parse_qsl(body.decode("utf-8"), max_num_fields=16))
        except (UnicodeDecodeError, ValueError):
            return {}

    def _cookie(self, response: Response, request: Request, name: str, value: str,
                max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    @staticmethod
    def _refused(status: int, text: str) -> Response:
        return Response(f"{status} {text}\n", status_code=status,
                        media_type="text/plain; charset=utf-8", headers=HEADERS)

    async def _login_dispatch(self, request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            return await self.login_page(request)
        if request.method == "POST":
            return await self.login(request)
        return self._refused(405, "Method Not Allowed")

    def _guarded(self, get: Handler | None,
                 post: Handler | None) -> Callable[[Request], Awaitable[Response]]:
        """A path behind a session (else 303 to the login), loopback unless allowed;
        then `get` for GET and HEAD, `post` for POST after the form token and the
        origin are checked; 404 without either, 405 for another method."""
        async def endpoint(request: Request) -> Response:
            if not self.remote and not _loopback(request.client.host if request.client
                                                 else None):
                return self._refused(403, "Forbidden: the dashboard serves loopback only")
            found = self._session(request)
            if found is None:
                return RedirectResponse(PREFIX + "login", status_code=303, headers=HEADERS)
            sid, session = found
            if get is None and post is None:
                return self._refused(404, "Not Found")
            handler = get if request.method in ("GET", "HEAD") else \
                post if request.method == "POST" else None
            if handler is None:
                return self._refused(405, "Method Not Allowed")
            if handler is post:
                form = await self._form(request)
                token = form.get("token", "")
                if not self._same_origin(request) or not hmac.compare_digest(
                        token.encode(), session.token.encode()):
                    log.warning("admin: a form for account %s was refused (token or origin)",
                                session.user)
                    return self._refused(403, "Forbidden: stale or forged form")
                session.token = secrets.token_urlsafe(24)  # a form is good once
                request.state.form = form
            result: Response = await handler(request, session, sid)
            return result
        return endpoint

    # -------------------------------------------------------- login and logout

    async def login_page(self, request: Request) -> Response:
        if not self.remote and not _loopback(request.client.host if request.client else None):
            return self._refused(403, "Forbidden: the dashboard serves loopback only")
        return self._login_form(request)

    def _login_form(self, request: Request, error: str | None = None,
                    status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self._page("login.html", status, title="Log in", error=error, token=nonce)
        self._cookie(response, request, LOGIN_COOKIE, self.signer.sign(nonce).decode(),
                     LOGIN_FORM_LIFETIME)
        return response

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client else ""
        if not self.remote and not _loopback(client):
            return self._refused(403, "Forbidden: the dashboard serves loopback only")
        form = await self._form(request)
        try:
            nonce = self.signer.unsign(request.cookies.get(LOGIN_COOKIE, ""),
                                       max_age=LOGIN_FORM_LIFETIME).decode()
        except (BadSignature, UnicodeDecodeError):
            nonce = ""
        if not nonce or not self._same_origin(request) or not hmac.compare_digest(
                form.get("token", "").encode(), nonce.encode()):
            return self._login_form(request, "The form had expired. Please try again.", 403)
        name, password = form.get("username", "")[:64], form.get("password", "")
        if self.by_client.blocked(client) or self.by_account.blocked(name):
            log.warning("admin: login refused, too many failed attempts (account %r)", name)
            return self._login_form(request, "Too many failed attempts. Wait a few minutes, "
                                             "then try again.", 429)
        if self._waiting >= MAX_HASH_WAITING:
            return self._login_form(request, "Busy: too many logins at once. Please try "
                                             "again.", 503)
        # Counted as failed before the hash, taken back after a success: attempts sent
        # at once are refused as soon as the count is reached, not after every hash.
        self.by_client.failed(client)
        self.by_account.failed(name)
        self._waiting += 1
        try:
            async with self._hashing:
                ok = await asyncio.get_running_loop().run_in_executor(
                    None, self.accounts.verify, name, password)
        finally:
            self._waiting -= 1
        if not ok:
            log.warning("admin: failed login (account %r)", name)
            return self._login_form(request, "Wrong account name or password.", 401)
        self.by_client.forgive(client)
        self.by_account.forgive(name)
        sid, _session = self.sessions.new(name, self.accounts.credential(name) or "")
        log.info("admin: %s logged in", name)
        response = RedirectResponse(PREFIX, status_code=303, headers=HEADERS)
        self._cookie(response, request, COOKIE, self.signer.sign(sid).decode(),
                     int(SESSION_LIFETIME))
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True,
                               samesite="strict")
        return response

    async def logout(self, request: Request, session: Session, sid: str) -> Response:
        self.sessions.end(sid)
        log.info("admin: %s logged out", session.user)
        response = RedirectResponse(PREFIX + "login", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return response

    # -------------------------------------------------------- pages

    def _common(self, session: Session, page: str) -> dict[str, Any]:
        return {"user": session.user, "token": session.token, "page": page,
                "title": dict(PAGES)[page], "node": self.settings.node.id}

    def status(self) -> list[dict[str, Any]]:
        """Each part: running here or not, ready or not (the /readyz checks), a few of
        its /metrics counters."""
        from netfilter.audit.log import AuditLog
        from netfilter.dns.server import DnsServer
        from netfilter.metrics import for_node
        from netfilter.proxy.process import ProxyProcess
        from netfilter.stoppage.server import StopPageServer

        if self._metrics is None:
            self._metrics = for_node(self.engine, self.parts, self.tiles)
        failing = set(self._metrics.not_ready())
        dns = next((p for p in self.parts if isinstance(p, DnsServer)), None)
        proxy = next((p for p in self.parts if isinstance(p, ProxyProcess)), None)
        stop = next((p for p in self.parts if isinstance(p, StopPageServer)), None)
        audit = self.engine.sink if isinstance(self.engine.sink, AuditLog) else None
        rows: list[dict[str, Any]] = []

        def row(name: str, running: bool, check: str | None, detail: str) -> None:
            state = ("not running" if not running else
                     "not ready" if check is not None and check in failing else "ready")
            rows.append({"name": name, "state": state, "detail": detail})

        row("Lists", True, "lists", f"{len(self.engine.lists.bundles)} in force")
        queries = 0 if dns is None else sum(
            v for k, v in dns.stats.items() if k.startswith("queries"))
        row("DNS", dns is not None, "upstream", "" if dns is None else f"{queries} queries")
        row("Proxy", proxy is not None, "proxy", "")
        row("Stop page", stop is not None, None, "" if stop is None else
            f"{stop.stats.get('blocked', 0)} blocked, {stop.stats.get('generic', 0)} generic")
        if audit is not None:
            age = (f"last checkpoint {int(time.time() - audit.last_checkpoint_time)} s ago"
                   if audit.last_checkpoint_time else "no checkpoint yet in this process")
            row("Audit log", True, "audit", f"{audit.appended} events appended, "
                f"{audit.append_failures} failures; {age}")
        else:
            row("Audit log", False, None, "no audit section")
        updater = self.updater
        if updater is not None:
            stats = updater.stats()
            last = stats.get("last_check_timestamp_seconds") or 0
            when = (datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
                    if last else "never")
            state = "ready" if not stats.get("consecutive_failures") else "failing"
            rows.append({"name": "Updater", "state": state,
                         "detail": f"last check {when}, "
                                   f"{int(stats.get('consecutive_failures', 0))} consecutive "
                                   f"failures, {int(stats.get('held_versions', 0))} held"})
        else:
            rows.append({"name": "Updater", "state": "not running",
                         "detail": "no updates section or no list with a source"})
        return rows

    async def overview(self, request: Request, session: Session, _sid: str) -> Response:
        rows = await asyncio.get_running_loop().run_in_executor(None, self.status)
        return self._page("dashboard.html", **self._common(session, ""), status_rows=rows)

    def _lists(self) -> list[dict[str, Any]]:
        """The lists in force now, from their manifests (not the public page's cached
        snapshot: a version confirmed here shows at once)."""
        now = datetime.now(UTC)
        rows = []
        for bundle in self.engine.lists.bundles:
            m = bundle.manifest
            rows.append({"id": m.list_id, "version": m.version,
                         "issuer": m.transparency.issuer, "entries": m.entries,
                         "published": _stamp(m.issued), "age": _age(now, m.issued),
                         "expires": _stamp(m.expires), "expired": bundle.expired,
                         "signing_key_id": bundle.signer.id})
        return rows

    async def lists(self, request: Request, session: Session, _sid: str) -> Response:
        return self._page("dashboard.html", **self._common(session, "lists"),
                          lists=self._lists())

    def _held_now(self) -> list[dict[str, Any]]:
        from netfilter.updates.state import VersionState, state_path

        path = state_path(self.settings)
        if not path.exists():
            return []
        state = VersionState(path)
        try:
            return [{"list": h.list_id, "version": h.version, "trigger": h.trigger,
                     "reason": h.reason[:300],
                     "since": h.held_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")}
                    for h in state.all_held()]
        finally:
            state.close()

    async def held(self, request: Request, session: Session, _sid: str,
                   message: str | None = None, status: int = 200) -> Response:
        rows = await asyncio.get_running_loop().run_in_executor(None, self._held_now)
        return self._page("dashboard.html", status, **self._common(session, "held"),
                          held=rows, message=message, can_decide=self.updater is not None)

    async def decide(self, request: Request, session: Session, sid: str) -> Response:
        from netfilter.updates import held as held_ops

        form: dict[str, str] = request.state.form
        action, list_id = form.get("action"), form.get("list", "")[:64]
        try:
            version = int(form.get("version", ""))
        except ValueError:
            version = -1
        if action not in ("confirm", "reject") or version < 0 or self.updater is None:
            return await self.held(request, session, sid, "Nothing was done: that is not "
                                   "a decision this node can take.", 400)
        do = held_ops.confirm if action == "confirm" else held_ops.reject
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                None, lambda: do(self.updater, list_id, version, session.user,
                                 frontend="dashboard"))
        except NetfilterError as e:
            return await self.held(request, session, sid, f"Nothing was done: {e}", 409)
        return await self.held(request, session, sid, done)

    def _audit_store(self) -> AuditStore | None:
        """The audit log, read-only (in the worker); None without one."""
        audit = self.settings.audit
        if audit is None:
            return None
        if self._store is None:
            path = self.settings.resolve(audit.path)
            if not path.exists():
                return None
            self._store = AuditStore(path, create=False)
        return self._store

    def _block_counts(self, now: datetime) -> tuple[dict[tuple[str, ...], int], bool]:
        store = self._audit_store()
        if store is None:
            return {}, True
        if self._aggregates is None:
            self._aggregates = BlockStats(store, DAYS, fields=("list", "category", "frontend"))
        counts = self._aggregates.refresh(now)
        return counts.counts, counts.complete

    async def blocks(self, request: Request, session: Session, _sid: str) -> Response:
        now = datetime.now(UTC)
        days = [(now.date() - timedelta(days=i)).isoformat() for i in range(DAYS - 1, -1, -1)]
        try:
            counts, complete = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._block_counts, now)
        except Exception as e:  # the page says so; the node goes on
            log.warning("admin: the audit log could not be read: %s", e)
            counts, complete = {}, False
        rows = [(key, n) for key, n in counts.items()]
        groups = [(heading, charts(((k[0], k[i], n) for k, n in rows), days))
                  for heading, i in (("By list", 1), ("By category", 2), ("By front-end", 3))]
        return self._page("dashboard.html", **self._common(session, "blocks"), groups=groups,
                          complete=complete, days=days)

    def _checkpoint(self) -> dict[str, Any] | None:
        store = self._audit_store()
        latest = store.latest_checkpoint() if store is not None else None
        if store is None or latest is None:
            return None
        return {"size": latest.size, "created": latest.created,
                "note": latest.note.decode("utf-8", "replace"),
                "cosignatures": [{"witness": w, "line": line}
                                 for w, line in store.cosignatures(latest.size)]}

    async def audit(self, request: Request, session: Session, _sid: str) -> Response:
        try:
            checkpoint = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._checkpoint)
        except Exception as e:
            log.warning("admin: the audit log could not be read: %s", e)
            checkpoint = None
        age = None
        if checkpoint:
            try:
                made = datetime.fromisoformat(str(checkpoint["created"]).replace("Z", "+00:00"))
                age = int((datetime.now(UTC) - made).total_seconds())
            except ValueError:
                age = None
        return self._page("dashboard.html", **self._common(session, "audit"),
                          checkpoint=checkpoint, age=age)

    async def errors(self, request: Request, session: Session, _sid: str) -> Response:
        return self._page("dashboard.html", **self._common(session, "errors"),
                          entries=list(reversed(self.ring.entries)))

    def routes(self) -> list[Route]:
        """Every method on every path under /admin/ meets the loopback and session
        checks first (no 405 or 404 without a session: a 303 to the login)."""
        g = self._guarded
        pages = {"": self.overview, "lists": self.lists, "held": self.held,
                 "blocks": self.blocks, "audit": self.audit, "errors": self.errors}
        posts = {"logout": self.logout, "held": self.decide}
        routes = [Route(PREFIX + "login", _AnyMethod(self._login_dispatch))]
        for path in sorted(set(pages) | set(posts)):
            routes.append(Route(PREFIX + path, _AnyMethod(g(pages.get(path), posts.get(path)))))
        routes += [Route("/admin", _AnyMethod(g(None, None))),
                   Route(PREFIX + "{rest:path}", _AnyMethod(g(None, None)))]
        return routes


class _AnyMethod:
    """An endpoint as an ASGI app: Starlette routes a function for GET and HEAD only
    (another method would fall through to the stop page); an app, for every method."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive))
        await response(scope, receive, send)
