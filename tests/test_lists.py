"""The set of lists: precedence, local lists, exceptions, rollback and expiry policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import netfilter
from netfilter.errors import BundleError, SourceError
from netfilter.listsource import local_ref
from tests.conftest import BuildBundle

SECOND = """\
entries:
  - {domain: second.example, ref: S-1, category: other}
  - {domain: blocked.example, ref: S-2, category: other}
"""


def _source(path: Path, pub: Path, **kw: object) -> netfilter.ListSource:
    return netfilter.ListSource(path=path, trusted_keys=[pub], **kw)  # type: ignore[arg-type]


def test_public_api_example(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    lists = netfilter.load_lists([_source(build(), authority[1])])
    m = lists.check_url("http://sub.blocked.example/any/page")
    assert m is not None
    assert (m.list_id, m.ref, m.category, m.kind) == ("test", "T-1", "csam", "domain")
    assert lists.check_host("sub.blocked.example") is not None
    assert lists.check_host("partly.example") is None
    assert lists.host_has_url_entries("partly.example")
    assert not lists.host_has_url_entries("clean.example")
    assert lists.check_url("http://clean.example/") is None
    assert len(lists) == 8 and lists.versions() == {"test": 1}


def test_first_list_in_order_wins(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    first, second = build(), build(SECOND, list_id="second")
    lists = netfilter.load_lists([_source(first, authority[1]), _source(second, authority[1])])
    assert lists.check_url("http://blocked.example/").ref == "T-1"  # type: ignore[union-attr]
    assert lists.check_url("http://second.example/").ref == "S-1"  # type: ignore[union-attr]
    swapped = netfilter.load_lists([_source(second, authority[1]),
                                    _source(first, authority[1])])
    assert swapped.check_url("http://blocked.example/").ref == "S-2"  # type: ignore[union-attr]


def test_same_list_twice_is_refused(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    path = build()
    with pytest.raises(BundleError, match="loaded twice"):
        netfilter.load_lists([_source(path, authority[1]), _source(path, authority[1])])


def test_local_block_and_exceptions(build: BuildBundle, authority: tuple[Path, Path],
                                    tmp_path: Path) -> None:
    block = tmp_path / "block.yaml"
    block.write_text("- gambling.example\n- {url: 'http://school.example/no/', ref: P-1,"
                     " category: policy}\n", encoding="utf-8")
    allow = tmp_path / "allow.yaml"
    allow.write_text("entries:\n  - {domain: ok.blocked.example, ref: APPEAL-1,"
                     " category: appeal}\n  - gambling.example\n", encoding="utf-8")
    lists = netfilter.load_lists([_source(build(), authority[1])],
                                 local_block=block, local_allow=allow)
    local = lists.check_url("http://www.gambling.example/")
    gambling = local_ref("gambling.example/")
    assert local is not None and local.source == "local" and local.ref == gambling
    assert local.allowed_by == gambling and not local.blocks
    policy = lists.check_url("http://school.example/no/x")
    assert (policy.ref, policy.category, policy.kind, policy.blocks) == (  # type: ignore[union-attr]
        "P-1", "policy", "url", True)
    lifted = lists.check_url("http://ok.blocked.example/page")
    assert lifted is not None and lifted.ref == "T-1" and lifted.allowed_by == "APPEAL-1"
    assert not lifted.blocks
    host = lists.check_host("ok.blocked.example")
    assert host is not None and host.allowed_by == "APPEAL-1"
    still = lists.check_url("http://other.blocked.example/")
    assert still is not None and still.blocks


def test_bad_local_list(build: BuildBundle, authority: tuple[Path, Path],
                        tmp_path: Path) -> None:
    block = tmp_path / "block.yaml"
    block.write_text("- http:///nohost\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"block.yaml: entry 1"):
        netfilter.load_lists([_source(build(), authority[1])], local_block=block)


def test_rollback_is_refused(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    old = build(version=3)
    with pytest.raises(BundleError, match="older than the installed version 4"):
        netfilter.load_lists([_source(old, authority[1])], installed={"test": 4})
    same = netfilter.load_lists([_source(old, authority[1])], installed={"test": 3})
    assert same.versions() == {"test": 3}


def test_expiry_policy(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    path = build(expires=datetime.now(UTC) - timedelta(hours=1))
    enforced = netfilter.load_lists([_source(path, authority[1])])
    assert enforced.check_url("http://blocked.example/") is not None
    assert "still enforced" in enforced.warnings[0]
    stopped = netfilter.load_lists([_source(path, authority[1], on_expiry="stop")])
    assert stopped.check_url("http://blocked.example/") is None
    assert "NOT enforced" in stopped.warnings[0]


def test_invalid_url_raises_invalid_url(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    lists = netfilter.load_lists([_source(build(), authority[1])])
    for bad in ("/asdf", "mailto:x@y", ""):
        with pytest.raises(netfilter.InvalidURL):
            lists.check_url(bad)


def test_urls_free_only_where_no_url_can_match(build: BuildBundle, authority: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """urls_free(host) lets a proxy skip check_url: it must never be True for a host
    one of whose URLs matches (a block or a lifted block), local lists included."""
    block = tmp_path / "block.yaml"
    block.write_text("- {url: 'http://school.example/no/', ref: P-1, category: policy}\n",
                     encoding="utf-8")
    allow = tmp_path / "allow.yaml"
    allow.write_text("- ok.blocked.example\n", encoding="utf-8")
    lists = netfilter.load_lists([_source(build(), authority[1])], local_block=block,
                                 local_allow=allow)
    not_free = ["blocked.example", "sub.blocked.example", "ok.blocked.example",
                "partly.example", "www.mixed.example", "192.0.2.66", "198.51.100.7",
                "whole.example", "school.example", "a.b.c.deep.sub.blocked.invalid"]
    free = ["clean.example", "mixed.example", "other.example", "192.0.2.67",
            "sub.partly.example.test", "deep.sub.blocked.invalid.example"]
    for host in not_free:
        assert not lists.urls_free(host), host
    for host in free:
        assert lists.urls_free(host), host
    paths = ["/", "/dir/", "/dir/x", "/one/page.html?id=7", "/a/b/c.html", "/files/",
             "/no/", "/no/x", "/any"]
    for host in not_free + free:
        matched = [p for p in paths if lists.check_url(f"http://{host}{p}") is not None]
        assert lists.urls_free(host) <= (not matched), (host, matched)
        assert lists.urls_free(host) or matched or lists.host_has_url_entries(host), host
