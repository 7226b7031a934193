"""Delta bundles: build, apply, the result is the full bundle; every wrong delta refused."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import netfilter
from netfilter.errors import BundleError
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key
from netfilter.listdelta import (
    DELTA_SIGNED_PREFIX,
    DeltaBaseMismatch,
    ListContent,
    apply_delta,
    build_delta,
    build_delta_from_bundles,
    derive_result,
    digest_set_checksum,
    open_delta,
)
from netfilter.listfile import Bundle, build_bundle, open_bundle
from tests.conftest import BuildBundle

ROOT = Path(__file__).resolve().parent.parent

HEADER = """\
issuer: Test Authority
legal_basis: Test Act s. 1
contact: mailto:appeals@authority.test
"""
V1 = HEADER + """\
entries:
  - {domain: blocked.example, ref: T-1, category: csam}
  - {url: "http://partly.example/dir/", ref: T-2, category: csam}
  - {url: "http://partly.example/one/page.html?id=7", ref: T-3, category: csam}
  - {url: "http://www.mixed.example/a/b/c.html", ref: T-4, category: other}
  - {domain: gone.test, ref: T-5, category: other}
  - {url: "http://onlyurl.invalid/x/y.html", ref: T-6, category: csam}
  - {domain: shared.example, ref: T-SHARED, category: csam}
  - {domain: shared2.example, ref: T-SHARED, category: csam}
"""
# removed: gone.test, partly.example/one/..., onlyurl.invalid/x/y.html (its host leaves
# the host index); changed: partly.example/dir/ (new ref), www.mixed.example (category);
# added: new.invalid (a new category), fresh.test/x.html (a new indexed host), and an
# entry sharing T-1's reference.
V2 = HEADER + """\
entries:
  - {domain: blocked.example, ref: T-1, category: csam}
  - {url: "http://partly.example/dir/", ref: T-2b, category: csam}
  - {url: "http://www.mixed.example/a/b/c.html", ref: T-4, category: csam}
  - {domain: shared.example, ref: T-SHARED, category: csam}
  - {domain: shared2.example, ref: T-SHARED, category: csam}
  - {domain: new.invalid, ref: T-9, category: fraud}
  - {url: "http://fresh.test/x.html", ref: T-10, category: csam}
  - {domain: also.blocked.example.test, ref: T-1, category: csam}
"""
OTHER_V1 = V1.replace("gone.test", "elsewhere.test")

URLS = [
    "http://blocked.example/", "http://www.blocked.example/any/page",
    "http://partly.example/dir/file.html", "http://partly.example/one/page.html?id=7",
    "http://partly.example/other/", "http://www.mixed.example/a/b/c.html",
    "http://gone.test/", "http://sub.gone.test/x", "http://onlyurl.invalid/x/y.html",
    "http://shared.example/", "http://shared2.example/q?x=1", "http://new.invalid/",
    "http://a.new.invalid/b", "http://fresh.test/x.html", "http://fresh.test/y.html",
    "http://also.blocked.example.test/", "http://clean.example/", "https://clean.test/a",
]


def _verdicts(path: Path, pub: Path) -> list[tuple[str, str | None, str | None, str | None]]:
    lists = netfilter.load_lists([netfilter.ListSource(path, [pub])])
    out = []
    for url in URLS:
        match = lists.check_url(url)
        out.append((url, match and match.ref, match and match.category, match and match.kind))
    return out


@pytest.fixture
def v1(build: BuildBundle) -> Path:
    return build(V1, version=1)


@pytest.fixture
def opened(authority: tuple[Path, Path]) -> Callable[[Path], Bundle]:
    """Open a bundle against the test authority's key; closed at teardown."""
    bundles: list[Bundle] = []

    def _open(path: Path) -> Bundle:
        bundles.append(open_bundle(path, [load_public_key(authority[1])]))
        return bundles[-1]

    yield _open  # type: ignore[misc]
    for bundle in bundles:
        bundle.close()


@pytest.fixture
def made(tmp_path: Path, v1: Path, authority_key: PrivateKey,
         opened: Callable[[Path], Bundle]) -> tuple[Path, Path]:
    """(full v2, delta v1 -> v2), built from the V2 source against v1."""
    source = tmp_path / "v2.yaml"
    source.write_text(V2, encoding="utf-8")
    full, delta = tmp_path / "v2.nfl", tmp_path / "v2.delta.nfl"
    build_delta(source, opened(v1), full, delta, key=authority_key, list_id="test", version=2)
    return full, delta


def _trusted(authority: tuple[Path, Path]) -> list[netfilter.keys.PublicKey]:
    return [load_public_key(authority[1])]


# ---------------------------------------------------------------- the good path


def test_apply_gives_the_authoritys_full_bundle(
        tmp_path: Path, build: BuildBundle, v1: Path, made: tuple[Path, Path],
        authority: tuple[Path, Path], opened: Callable[[Path], Bundle]) -> None:
    full, delta = made
    out = apply_delta(opened(v1), delta, _trusted(authority), tmp_path / "applied.nfl")
    assert out.read_bytes() == full.read_bytes()  # the authority's file, signature and all
    result = opened(out)
    assert (result.manifest.version, result.manifest.entries) == (2, 8)
    plain_v2 = build(V2, version=2)  # the full v2 built the ordinary way
    expected = _verdicts(plain_v2, authority[1])
    assert _verdicts(out, authority[1]) == expected
    assert _verdicts(v1, authority[1]) != expected  # the delta changed what is blocked
    by_url = {url: ref for url, ref, _, _ in expected}
    assert by_url["http://gone.test/"] is None and by_url["http://a.new.invalid/b"] == "T-9"
    assert by_url["http://partly.example/dir/file.html"] == "T-2b"
    assert by_url["http://also.blocked.example.test/"] == "T-1"
    assert not result.manifest.transparency.issuer or result.manifest.transparency.issuer == (
        "Test Authority")
    assert result.manifest.files["digests.bin"].sha256 == digest_set_checksum(
        result.array("digests.bin"))


def test_delta_is_small_and_says_what_changed(made: tuple[Path, Path],
                                              authority: tuple[Path, Path]) -> None:
    _, delta_path = made
    delta = open_delta(delta_path, _trusted(authority))
    m = delta.manifest
    assert (m.list_id, m.base.version, m.version) == ("test", 1, 2)
    assert (m.removed, m.added) == (5, 5)  # 3 removed + 2 changed; 3 added + 2 changed
    assert (m.hosts_removed, m.hosts_added) == (1, 1)  # onlyurl.invalid out, fresh.test in
    assert sorted(delta.added_refs.decode().replace("T-", " T-").split()) == [
        "T-1", "T-10", "T-2b", "T-4", "T-9"]  # the added entries' references, each once
    assert b"gone.test" not in delta_path.read_bytes()  # no plaintext target in a delta
    assert "+5 -5 entries" in delta.summary()


def test_delta_from_two_bundles(tmp_path: Path, build: BuildBundle, v1: Path,
                                authority_key: PrivateKey, authority: tuple[Path, Path],
                                opened: Callable[[Path], Bundle]) -> None:
    v2 = build(V2, version=2)
    full, delta = tmp_path / "v2-relaid.nfl", tmp_path / "d.nfl"
    manifest, _ = build_delta_from_bundles(opened(v1), opened(v2), full, delta,
                                           key=authority_key)
    assert manifest.issued == opened(v2).manifest.issued
    out = apply_delta(opened(v1), delta, _trusted(authority), tmp_path / "applied.nfl")
    assert out.read_bytes() == full.read_bytes()
    assert _verdicts(out, authority[1]) == _verdicts(v2, authority[1])


def test_chained_deltas_and_no_host_index(tmp_path: Path, build: BuildBundle,
                                          authority_key: PrivateKey,
                                          authority: tuple[Path, Path],
                                          opened: Callable[[Path], Bundle]) -> None:
    v1 = build(V1, version=1, host_index=False)
    v2, v3 = build(V2, version=2), build(V1, version=3, host_index=False)
    f2, d12 = tmp_path / "f2.nfl", tmp_path / "d12.nfl"
    f3, d23 = tmp_path / "f3.nfl", tmp_path / "d23.nfl"
    build_delta_from_bundles(opened(v1), opened(v2), f2, d12, key=authority_key)
    build_delta_from_bundles(opened(f2), opened(v3), f3, d23, key=authority_key)
    a2 = apply_delta(opened(v1), d12, _trusted(authority), tmp_path / "a2.nfl")
    a3 = apply_delta(opened(a2), d23, _trusted(authority), tmp_path / "a3.nfl")
    assert a3.read_bytes() == f3.read_bytes()
    assert not opened(a3).has_host_index
    assert _verdicts(a3, authority[1]) == _verdicts(v3, authority[1])


# ---------------------------------------------------------------- refusals


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _resigned(members: dict[str, bytes], key: PrivateKey, **changes: bytes) -> dict[str, bytes]:
    """The members with `changes` applied, the manifest's file table updated to them and
    the delta signed again with `key`: a delta that authority really signed."""
    import hashlib

    members = {**members, **{name.replace("__", "."): data for name, data in changes.items()}}
    manifest = yaml.safe_load(members["manifest.yaml"])
    for name, data in members.items():
        if name in manifest["files"]:
            manifest["files"][name] = {"size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
    manifest["removed"] = len(members["removed.bin"]) // 32
    manifest["added"] = len(members["added.bin"]) // 32
    text = yaml.safe_dump(manifest, sort_keys=False).encode()
    signature = key.sign(DELTA_SIGNED_PREFIX + text)
    line = f"ed25519 {key.public.id} {base64.b64encode(signature).decode()}\n".encode()
    return {**members, "manifest.yaml": text, "signature": line}


def test_refuses_wrong_base_version(tmp_path: Path, made: tuple[Path, Path],
                                    authority: tuple[Path, Path],
                                    opened: Callable[[Path], Bundle]) -> None:
    full, delta = made
    out = tmp_path / "out.nfl"
    with pytest.raises(DeltaBaseMismatch, match="applies to version 1 of list test, the base "
                                                ".* is version 2; fetch the full bundle"):
        apply_delta(opened(full), delta, _trusted(authority), out)
    assert not out.exists()


def test_refuses_base_with_other_content(tmp_path: Path, build: BuildBundle,
                                         made: tuple[Path, Path], authority: tuple[Path, Path],
                                         opened: Callable[[Path], Bundle]) -> None:
    other = build(OTHER_V1, version=1)  # same list, same version, other entries
    with pytest.raises(DeltaBaseMismatch, match="holds other digests than the delta's base"):
        apply_delta(opened(other), made[1], _trusted(authority), tmp_path / "out.nfl")
    same_digests = build(V1.replace("ref: T-6", "ref: T-6x"), version=1)
    with pytest.raises(DeltaBaseMismatch, match="is not the bundle the delta was made from"):
        apply_delta(opened(same_digests), made[1], _trusted(authority), tmp_path / "out.nfl")
    assert not (tmp_path / "out.nfl").exists()


def test_refuses_tampered_delta(tmp_path: Path, v1: Path, made: tuple[Path, Path],
                                authority: tuple[Path, Path],
                                opened: Callable[[Path], Bundle]) -> None:
    members = _members(made[1])
    edited = members["manifest.yaml"].replace(b"added: 5", b"added: 4")
    assert edited != members["manifest.yaml"]
    bad = _write(tmp_path / "bad-sig.nfl", {**members, "manifest.yaml": edited})
    with pytest.raises(BundleError, match=r"bad-sig.nfl: signature by key \w+ does not verify"):
        apply_delta(opened(v1), bad, _trusted(authority), tmp_path / "out.nfl")
    refs = bytearray(members["added_refs.txt"])
    refs[0] ^= 1
    bad = _write(tmp_path / "bad-data.nfl", {**members, "added_refs.txt": bytes(refs)})
    with pytest.raises(BundleError, match="added_refs.txt: SHA-256 does not match the signed"):
        apply_delta(opened(v1), bad, _trusted(authority), tmp_path / "out.nfl")
    assert not (tmp_path / "out.nfl").exists()


def test_refuses_result_checksum_mismatch(tmp_path: Path, v1: Path, made: tuple[Path, Path],
                                          authority_key: PrivateKey,
                                          authority: tuple[Path, Path],
                                          opened: Callable[[Path], Bundle]) -> None:
    """A delta the authority did sign, whose changes do not lead to the signed result."""
    members = _members(made[1])
    # one entry that should come in is left out
    bad = _write(tmp_path / "bad.nfl", _resigned(
        members, authority_key, added__bin=members["added.bin"][32:],
        added_entries__bin=members["added_entries.bin"][8:]))
    open_delta(bad, _trusted(authority))  # verifies as a delta
    out = tmp_path / "out.nfl"
    with pytest.raises(BundleError, match="bad.nfl: result checksum does not match: applied "
                                          "to .* the signed delta says .*; nothing written"):
        apply_delta(opened(v1), bad, _trusted(authority), out)
    assert not out.exists()


def test_refuses_result_the_authority_did_not_sign(
        tmp_path: Path, v1: Path, made: tuple[Path, Path], authority_key: PrivateKey,
        authority: tuple[Path, Path], opened: Callable[[Path], Bundle]) -> None:
    """Same digests (checksum fine) but other references: the result's members are not
    the ones in the signed full manifest, so nothing is written."""
    members = _members(made[1])
    refs = members["added_refs.txt"].replace(b"T-9", b"X-9")
    bad = _write(tmp_path / "bad.nfl", _resigned(members, authority_key, added_refs__txt=refs))
    with pytest.raises(BundleError, match=r"result (entries.bin|refs.txt) does not match the "
                                          "signed result manifest"):
        apply_delta(opened(v1), bad, _trusted(authority), tmp_path / "out.nfl")
    promised = yaml.safe_load(members["manifest.yaml"])
    promised["result"]["checksum"] = "0" * 64
    text = yaml.safe_dump(promised, sort_keys=False).encode()
    forged = _resigned({**members, "manifest.yaml": text}, authority_key)
    bad = _write(tmp_path / "bad2.nfl", forged)
    with pytest.raises(BundleError, match="result checksum differs from the signed result"):
        apply_delta(opened(v1), bad, _trusted(authority), tmp_path / "out.nfl")
    assert not (tmp_path / "out.nfl").exists()


def test_refuses_untrusted_key(tmp_path: Path, v1: Path, authority_key: PrivateKey,
                               authority: tuple[Path, Path],
                               opened: Callable[[Path], Bundle]) -> None:
    other_key = load_private_key(generate_keypair(tmp_path / "other")[0])
    source = tmp_path / "v2.yaml"
    source.write_text(V2, encoding="utf-8")
    delta = tmp_path / "d.nfl"
    build_delta(source, opened(v1), tmp_path / "f.nfl", delta, key=other_key,
                list_id="test", version=2)
    trusted_ids = authority_key.public.id
    with pytest.raises(BundleError, match=f"d.nfl: signed by unknown key {other_key.public.id}"
                                          f" \\(trusted: {trusted_ids}\\)"):
        apply_delta(opened(v1), delta, _trusted(authority), tmp_path / "out.nfl")
    # The delta re-signed by the trusted authority still carries a result manifest that
    # only the other key signed: refused too.
    resigned = _write(tmp_path / "d2.nfl", _resigned(_members(delta), authority_key))
    with pytest.raises(BundleError, match="d2.nfl:result.yaml: signed by unknown key"):
        apply_delta(opened(v1), resigned, _trusted(authority), tmp_path / "out.nfl")
    assert not (tmp_path / "out.nfl").exists()


def test_full_bundle_and_delta_are_not_confused(v1: Path, made: tuple[Path, Path],
                                                authority: tuple[Path, Path],
                                                opened: Callable[[Path], Bundle]) -> None:
    with pytest.raises(BundleError, match="a delta bundle, not a full bundle"):
        open_bundle(made[1], _trusted(authority))
    with pytest.raises(BundleError, match="a full bundle, not a delta"):
        apply_delta(opened(v1), made[0], _trusted(authority))


def test_refuses_newer_base_when_building(tmp_path: Path, build: BuildBundle,
                                          authority_key: PrivateKey,
                                          opened: Callable[[Path], Bundle]) -> None:
    v3 = build(V1, version=3)
    source = tmp_path / "v2.yaml"
    source.write_text(V2, encoding="utf-8")
    with pytest.raises(BundleError, match="version 2 must be newer than the base's version 3"):
        build_delta(source, opened(v3), tmp_path / "f.nfl", tmp_path / "d.nfl",
                    key=authority_key, list_id="test", version=2)
    with pytest.raises(BundleError, match="holds list test, not other"):
        build_delta(source, opened(v3), tmp_path / "f.nfl", tmp_path / "d.nfl",
                    key=authority_key, list_id="other", version=4)


@pytest.mark.parametrize("shared_offsets", [False, True], ids=["one-pass", "sorted"])
def test_derive_keeps_every_reference(shared_offsets: bool) -> None:
    """The reference compaction keeps each kept entry's reference text, whether every
    offset has one length (one pass) or not (the sorted fallback)."""
    import numpy as np

    from netfilter.listfile import ENTRY_DTYPE

    rng = np.random.default_rng(7)
    n = 400
    digests = np.unique(rng.integers(0, 256, (n, 32), dtype=np.uint8), axis=0)
    refs = b"".join(b"R-%04d" % i for i in range(n))  # 6 bytes each
    entries = np.zeros(len(digests), dtype=ENTRY_DTYPE)
    picks = rng.integers(0, n, len(digests))
    entries["ref_offset"], entries["ref_length"] = picks * 6, 6
    if shared_offsets:
        entries["ref_length"][::7] = 3  # same offsets, other lengths: "R-0"
    entries["category"] = picks % 2
    base = ListContent(digests, entries, refs, ["a", "b"], None)
    removed = digests[::5]
    result = derive_result(base, removed=removed, added=np.zeros((0, 32), np.uint8),
                           added_entries=np.zeros(0, ENTRY_DTYPE), added_refs=b"",
                           categories=["b", "a"], hosts_removed=None, hosts_added=None,
                           where="test")

    def texts(content: ListContent) -> dict[bytes, tuple[bytes, str]]:
        return {bytes(d): (content.refs[e["ref_offset"]:e["ref_offset"] + e["ref_length"]],
                           content.categories[e["category"]])
                for d, e in zip(content.digests, content.entries, strict=True)}

    before = texts(base)
    for digest in removed:
        del before[bytes(digest)]
    assert texts(result) == before
    assert len(result.refs) < len(refs)  # the references of removed entries are gone


def test_exports() -> None:
    import netfilter.listdelta as module

    for name in module.__all__:
        assert hasattr(module, name), name


# ---------------------------------------------------------------- the command


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_build_diff_and_apply(tmp_path: Path, authority: tuple[Path, Path]) -> None:
    key, pub = authority
    for name, text in (("v1.yaml", V1), ("v2.yaml", V2), ("other.yaml", OTHER_V1)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    v1, other = tmp_path / "v1.nfl", tmp_path / "other.nfl"
    build_bundle(tmp_path / "v1.yaml", v1, key=load_private_key(key), list_id="test",
                 version=1)
    build_bundle(tmp_path / "other.yaml", other, key=load_private_key(key), list_id="test",
                 version=1)
    result = run("list", "build", tmp_path / "v2.yaml", "--key", key, "--list-id", "test",
                 "--version", "2", "--out", tmp_path / "v2.nfl", "--diff-from", v1)
    assert result.returncode == 0, result.stderr
    delta = tmp_path / "v2.from-v1.delta.nfl"
    assert f"wrote {delta}: delta from version 1: +5 -5 entries" in result.stdout
    assert (tmp_path / "v2.nfl").exists()

    applied = tmp_path / "applied.nfl"
    result = run("list", "apply", delta, "--base", v1, "--trust", pub, "--out", applied)
    assert result.returncode == 0, result.stderr
    assert "list=test version=2 entries=8" in result.stdout
    assert applied.read_bytes() == (tmp_path / "v2.nfl").read_bytes()
    result = run("check", "--list", applied, "--trust", pub, "http://new.invalid/",
                 "http://gone.test/")
    assert result.stdout.splitlines() == ["BLOCK http://new.invalid/ list=test ref=T-9",
                                          "ALLOW http://gone.test/"]

    # another base: exit 3, fetch the full bundle
    result = run("list", "apply", delta, "--base", other, "--trust", pub, "--out",
                 tmp_path / "x.nfl")
    _one_line(result, 3, str(delta), "other digests", "fetch the full bundle")
    result = run("list", "apply", delta, "--base", applied, "--trust", pub, "--out",
                 tmp_path / "x.nfl")
    _one_line(result, 3, "applies to version 1", "is version 2")
    # a tampered delta, a delta where a bundle is expected, an untrusted key: exit 1
    members = _members(delta)
    bad = _write(tmp_path / "bad.nfl", {**members, "manifest.yaml": members[
        "manifest.yaml"].replace(b"version: 2", b"version: 3")})
    result = run("list", "apply", bad, "--base", v1, "--trust", pub, "--out", tmp_path / "x.nfl")
    _one_line(result, 1, str(bad), "does not verify")
    result = run("list", "verify", delta, "--trust", pub)
    _one_line(result, 1, str(delta), "a delta bundle, not a full bundle")
    other_pub = generate_keypair(tmp_path / "other")[1]
    result = run("list", "apply", delta, "--base", v1, "--trust", pub, "--trust", other_pub,
                 "--out", tmp_path / "x.nfl")
    assert result.returncode == 0, result.stderr  # one trusted signer is enough
    (tmp_path / "x.nfl").unlink()
    result = run("list", "build", tmp_path / "v2.yaml", "--key", tmp_path / "other.key",
                 "--list-id", "test", "--version", "2", "--out", tmp_path / "o2.nfl",
                 "--diff-from", v1)
    _one_line(result, 1, str(v1), "signed by unknown key")
    result = run("list", "build", tmp_path / "v2.yaml", "--key", tmp_path / "other.key",
                 "--list-id", "test", "--version", "2", "--out", tmp_path / "o2.nfl",
                 "--diff-from", v1, "--trust", pub)
    assert result.returncode == 0, result.stderr
    result = run("list", "apply", tmp_path / "o2.from-v1.delta.nfl", "--base", v1, "--trust",
                 pub, "--out", tmp_path / "x.nfl")
    _one_line(result, 1, "signed by unknown key")
    result = run("list", "build", tmp_path / "v2.yaml", "--key", key, "--list-id", "test",
                 "--version", "2", "--out", tmp_path / "n.nfl", "--delta-out", tmp_path / "d")
    _one_line(result, 1, "--delta-out", "only with --diff-from")
    assert not (tmp_path / "x.nfl").exists()
