"""`netfilter config check`: what the settings model cannot see in the file alone.

The model checks keys and types; these checks look at what the keys point to: files
that must exist and be readable, a node key others can read, bundles that must verify
against their trust keys (and, under `on_expiry: stop`, be in force), optional
dependencies a part needs, and addresses that must be free. Each mistake is one
ConfigError naming the key, the file and the reason, raised before anything starts:
found later, it would surface half-way through a start, or not until the first block.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import socket
import ssl
import stat
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from netfilter.config import Settings, parse_hostport
from netfilter.digest import hmac_key_id, read_hmac_key
from netfilter.errors import BundleExpired, ConfigError, ListenError, NetfilterError
from netfilter.keys import load_private_key, load_public_key
from netfilter.listfile import open_bundle
from netfilter.listsource import read_source

__all__ = ["PROXY_EXTRA", "bind_probe", "check_config"]

PROXY_EXTRA = "pip install 'netfilter[proxy]'"
PARTS = ("dns", "proxy", "stoppage")  # as in serve.py, which this must not import


def check_config(settings: Settings, parts: Sequence[str] = (), *,
                 listen: bool = True) -> None:
    """Raise one ConfigError (or ListenError) for the first mistake found.

    `parts`: the parts that will run (default: every configured one); a part not
    configured is left to `serve`. `listen=False` leaves the addresses to `serve`,
    which opens each socket itself and stops what it started if one fails."""
    chosen = [p for p in (parts or PARTS) if p in PARTS and getattr(settings, p) is not None]
    _check_files(settings)
    _check_node_key(settings)
    _check_lists(settings)
    _check_audit(settings)
    _check_updates(settings)
    if "dns" in chosen:
        _check_tls(settings)
    if settings.stoppage is not None:
        from netfilter.stoppage import Renderer

        Renderer(settings.stoppage, base=settings.base)  # templates load and render
    if "proxy" in chosen and not _installed("mitmproxy"):
        raise ConfigError("proxy", f"needs mitmproxy, which is not installed: {PROXY_EXTRA}")
    if listen:
        _check_listen(settings, chosen)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it
        return False


def _referenced(settings: Settings) -> Iterator[tuple[str, Path, bool]]:
    """(key, resolved path, is a directory) for every file the config names that
    must already exist; the node key and the audit store are created at start."""
    for i, item in enumerate(settings.lists):
        yield f"lists[{i}].path", settings.resolve(item.path), False
        for j, trust in enumerate(item.trust):
            yield f"lists[{i}].trust[{j}]", settings.resolve(trust), False
        if item.hmac_key is not None:
            yield f"lists[{i}].hmac_key", settings.resolve(item.hmac_key), False
    for name in ("block", "allow"):
        local = getattr(settings.local, name)
        if local is not None:
            yield f"local.{name}", settings.resolve(local), False
    if settings.stoppage is not None and settings.stoppage.templates is not None:
        yield "stoppage.templates", settings.resolve(settings.stoppage.templates), True
    updates = settings.updates
    if updates is not None:
        if updates.protected_names is not None:
            yield "updates.protected_names", settings.resolve(updates.protected_names), False
        if updates.ca is not None:
            yield "updates.ca", settings.resolve(updates.ca), False


def _check_files(settings: Settings) -> None:
    for key, path, directory in _referenced(settings):
        kind = "directory" if directory else "file"
        if not path.exists():
            raise ConfigError(key, f"{path}: no such {kind}")
        if path.is_dir() != directory:
            raise ConfigError(key, f"{path}: not a {kind}")
        if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
            raise ConfigError(key, f"{path}: not readable (permission denied)")
    proxy = settings.proxy
    if proxy is not None and proxy.confdir is not None:
        # mitmproxy creates a missing confdir and its CA on first start; one that
        # exists must be a directory it can read.
        confdir = settings.resolve(proxy.confdir)
        if confdir.exists() and not (confdir.is_dir() and os.access(confdir, os.R_OK | os.X_OK)):
            raise ConfigError("proxy.confdir", f"{confdir}: not a readable directory")


def _check_updates(settings: Settings) -> None:
    """The protected names parse (a mistake would fail every update, found only at the
    first one) and the pinned CA loads as PEM certificates."""
    updates = settings.updates
    if updates is None:
        return
    if updates.protected_names is not None:
        from netfilter.updates.sanity import load_protected

        try:
            load_protected(settings.resolve(updates.protected_names))
        except NetfilterError as e:
            raise ConfigError("updates.protected_names", str(e)) from None
    if updates.ca is not None:
        ca = settings.resolve(updates.ca)
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError("updates.ca", f"{ca}: not a PEM certificate ({e})") from None


def _check_node_key(settings: Settings) -> None:
    """An existing node key must be ours alone: it signs every checkpoint."""
    path = settings.resolve(settings.node.key)
    if not path.exists():
        return  # created 0600 on first start
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError("node.key", f"{path}: readable by its group or others "
                                      f"(mode {mode:04o}); chmod 600 it")
    try:
        load_private_key(path)
    except NetfilterError as e:
        raise ConfigError("node.key", f"{e.where}: {e.reason}") from e


def _check_lists(settings: Settings) -> None:
    """Each bundle verifies against its trust keys, as at load; an expired one only
    where `on_expiry: enforce` keeps it in force."""
    for i, item in enumerate(settings.lists):
        try:
            keys = [load_public_key(settings.resolve(k)) for k in item.trust]
        except NetfilterError as e:
            raise ConfigError(f"lists[{i}].trust", f"{e.where}: {e.reason}") from e
        path = settings.resolve(item.path)
        try:
            bundle = open_bundle(path, keys, allow_expired=item.on_expiry == "enforce")
        except BundleExpired as e:
            raise ConfigError(f"lists[{i}]", f"{path}: {e.reason}, and on_expiry is stop "
                                             "(install a newer version)") from e
        except NetfilterError as e:
            raise ConfigError(f"lists[{i}].path", f"{e.where}: {e.reason}") from e
        keyed = bundle.manifest.hash == "hmac-sha256"
        if keyed != (item.hmac_key is not None):
            raise ConfigError(f"lists[{i}].hmac_key",
                              f"{path} is {bundle.manifest.hash}: hmac_key is "
                              + ("required" if keyed else "for hmac-sha256 lists only"))
        if item.hmac_key is not None:
            try:
                key = read_hmac_key(settings.resolve(item.hmac_key))
            except NetfilterError as e:
                raise ConfigError(f"lists[{i}].hmac_key", f"{e.where}: {e.reason}") from e
            if hmac_key_id(key) != bundle.manifest.hmac_key_id:
                raise ConfigError(f"lists[{i}].hmac_key",
                                  f"{settings.resolve(item.hmac_key)}: key id "
                                  f"{hmac_key_id(key)} is not the one {path} is keyed with "
                                  f"({bundle.manifest.hmac_key_id})")
    for name in ("block", "allow"):
        local = getattr(settings.local, name)
        if local is None:
            continue
        try:
            _, entries = read_source(settings.resolve(local), local=True,
                                     default_category="local")
            for _ in entries:
                pass
        except NetfilterError as e:
            raise ConfigError(f"local.{name}", f"{e.where}: {e.reason}") from e


def _check_audit(settings: Settings) -> None:
    audit = settings.audit
    if audit is None:
        return
    if audit.tiles_listen is not None and audit.tiles is None:
        raise ConfigError("audit.tiles_listen", "needs audit.tiles (the directory to serve)")
    if audit.group is not None:
        try:
            grp.getgrnam(audit.group)
        except KeyError:
            raise ConfigError("audit.group", f"{audit.group!r} is not a group here") from None


def _check_tls(settings: Settings) -> None:
    """DoT and DoH: the certificate and key load together, as at start; with canaries,
    the certificate names the resolver (the TargetName of resolver.arpa's SVCB)."""
    dns = settings.dns
    if dns is None or not (dns.dot_listen or dns.doh_listen):
        return
    from netfilter.dns.tlsconfig import ALPN_DOH, server_context

    assert dns.tls_certificate is not None and dns.tls_key is not None  # the model's check
    server_context(settings.resolve(dns.tls_certificate), settings.resolve(dns.tls_key),
                   ALPN_DOH)
    if dns.canaries:  # resolver.arpa designations need a name to designate
        from netfilter.dns.canaries import certificate_name

        if certificate_name(settings.resolve(dns.tls_certificate)) is None:
            raise ConfigError("dns.canaries", f"{dns.tls_certificate}: no DNS name in its "
                              "subjectAltName to designate in resolver.arpa (RFC 9462); "
                              "use a certificate that names the resolver, or canaries: false")


def _check_listen(settings: Settings, parts: Sequence[str]) -> None:
    """Every address the start would open can be bound now. The probes are held
    until all are bound, so two parts configured on one address are caught too."""
    wanted: list[tuple[str, str, tuple[int, ...]]] = []
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    if "dns" in parts and settings.dns is not None:
        wanted += [(f"dns.listen[{i}]", a, (udp, tcp)) for i, a in enumerate(settings.dns.listen)]
        wanted += [(f"dns.dot_listen[{i}]", a, (tcp,))
                   for i, a in enumerate(settings.dns.dot_listen)]
        wanted += [(f"dns.doh_listen[{i}]", a, (tcp,))
                   for i, a in enumerate(settings.dns.doh_listen)]
    if "proxy" in parts and settings.proxy is not None:
        wanted.append(("proxy.listen", settings.proxy.listen, (tcp,)))
    if "stoppage" in parts and settings.stoppage is not None:
        wanted.append(("stoppage.listen", settings.stoppage.listen, (tcp,)))
    if settings.web is not None and settings.web.listen is not None:
        wanted.append(("web.listen", settings.web.listen, (tcp,)))
    if "icap" in parts and settings.icap is not None:
        wanted.append(("icap.listen", settings.icap.listen, (tcp,)))
    if settings.audit is not None and settings.audit.tiles_listen is not None:
        wanted.append(("audit.tiles_listen", settings.audit.tiles_listen, (tcp,)))
    if settings.metrics is not None:
        wanted.append(("metrics.listen", settings.metrics.listen, (tcp,)))
    with ExitStack() as probes:
        for key, listen, kinds in wanted:
            host, port = parse_hostport(listen, any_port=True)
            for kind in kinds:
                try:
                    probes.enter_context(bind_probe(host, port, kind))
                except OSError as e:
                    raise ListenError.from_os_error(key, host, port, e) from None


def bind_probe(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound (and, for TCP, listening) where a part would listen: OSError if
    it cannot be now. The caller closes it. TCP takes SO_REUSEADDR as the servers do:
    a connection in TIME_WAIT is no conflict."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        if kind == socket.SOCK_STREAM:
            probe.listen(1)
    except BaseException:
        probe.close()
        raise
    return probe
