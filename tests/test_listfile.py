"""Bundles: build, verify, and refuse every kind of damage with a clear reason."""

from __future__ import annotations

import base64
import io
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from netfilter.errors import BundleError, BundleExpired, SourceError
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key
from netfilter.listfile import (
    SIGNED_PREFIX,
    build_bundle,
    open_bundle,
    read_manifest_unverified,
    sort_unique,
)
from tests.conftest import SOURCE, BuildBundle


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


def _resign(members: dict[str, bytes], key: PrivateKey) -> dict[str, bytes]:
    signature = key.sign(SIGNED_PREFIX + members["manifest.yaml"])
    line = f"ed25519 {key.public.id} {base64.b64encode(signature).decode()}\n"
    return {**members, "signature": line.encode()}


def test_build_and_verify(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    path = build()
    bundle = open_bundle(path, [load_public_key(authority[1])])
    m = bundle.manifest
    assert (m.list_id, m.version, m.entries) == ("test", 1, 8)
    assert (m.domain_entries, m.url_entries) == (4, 4)  # whole.example/ counts as domain
    assert m.hosts == 3  # partly.example, www.mixed.example, 198.51.100.7
    assert m.transparency.issuer == "Test Authority"
    assert m.transparency.for_language("de").issuer == "Testbehörde"
    assert m.transparency.for_language("de").legal_basis == "Test Act s. 1"
    assert sorted(m.categories) == ["csam", "other"]
    assert bundle.signer.id == load_public_key(authority[1]).id
    assert "list=test version=1 entries=8" in bundle.summary()


def test_bundle_holds_no_plaintext_targets(build: BuildBundle) -> None:
    raw = build().read_bytes()
    for needle in (b"blocked.example", b"partly", b"mixed", b"198.51.100.7", b"/dir/"):
        assert needle not in raw
    assert b"T-1" in raw  # references are meant to be there


def test_csv_source(tmp_path: Path, authority_key: PrivateKey,
                    authority: tuple[Path, Path]) -> None:
    source = tmp_path / "list.csv"
    source.write_text("target,ref,category\nblocked.example,C-1,csam\n"
                      "http://partly.example/x/,C-2,csam\n", encoding="utf-8")
    out = tmp_path / "csv.nfl"
    manifest, dups = build_bundle(source, out, key=authority_key, list_id="csv", version=2)
    assert (manifest.entries, manifest.url_entries, dups) == (2, 1, 0)
    open_bundle(out, [load_public_key(authority[1])])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("entries: [{domain: a.example}]", "entry 1: ref must be a non-empty string"),
        ("entries: [{domain: a.example, ref: R, category: c, extra: 1}]", "unknown key"),
        ("entries: [{url: '/nohost', ref: R, category: c}]", "entry 1"),
        ("entries: [{url: a.example, domain: b.example, ref: R, category: c}]", "exactly one"),
        ("entries: [{domain: a.example, ref: R, category: 'Bad Cat'}]", "category"),
        ("entries: [{domain: a.example, ref: \"x\\ny\", category: c}]", "control"),
        ("issuer: X\nbogus: 1\nentries: []", "bogus"),
        ("entries: nope", "entries"),
        ("entries: [a.example]", "needs `ref`"),
        ("{{{", "not valid YAML"),
    ],
)
def test_bad_sources_fail_with_one_clear_line(build: BuildBundle, text: str,
                                              reason: str) -> None:
    with pytest.raises(SourceError, match=reason) as info:
        build(text)
    assert "\n" not in str(info.value)


def test_duplicates_are_dropped_and_counted(tmp_path: Path, authority_key: PrivateKey) -> None:
    source = tmp_path / "d.yaml"
    source.write_text("entries:\n"
                      "  - {domain: a.example, ref: R1, category: c}\n"
                      "  - {domain: A.EXAMPLE., ref: R2, category: c}\n"
                      "  - {url: 'http://a.example/', ref: R3, category: c}\n", encoding="utf-8")
    manifest, dups = build_bundle(source, tmp_path / "d.nfl", key=authority_key,
                                  list_id="d", version=1)
    assert (manifest.entries, dups) == (1, 2)


def test_sort_unique_matches_python_bytes_order() -> None:
    rng = np.random.default_rng(7)
    digests = rng.integers(0, 4, size=(3000, 32), dtype=np.uint8)  # many zero bytes, dups
    digests[:, :30] = 0
    order, dups = sort_unique(digests)
    got = [bytes(row) for row in digests[order]]
    assert got == sorted({bytes(row) for row in digests})
    assert dups == 3000 - len(got)


# ------------------------------------------------------------------ refusals


def test_unknown_key(build: BuildBundle, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other")
    unknown = r"signed by unknown key [0-9a-f]{16} \(trusted: [0-9a-f]{16}\)"
    with pytest.raises(BundleError, match=unknown):
        open_bundle(build(), [load_public_key(other)])


def test_no_trusted_key(build: BuildBundle) -> None:
    with pytest.raises(BundleError, match="no trusted key"):
        open_bundle(build(), [])


def test_forged_signature(build: BuildBundle, authority: tuple[Path, Path],
                          tmp_path: Path) -> None:
    members = _members(build())
    forger = load_private_key(generate_keypair(tmp_path / "forger")[0])
    signature = forger.sign(SIGNED_PREFIX + members["manifest.yaml"])
    keyid = load_public_key(authority[1]).id  # claims the authority's key id
    members["signature"] = f"ed25519 {keyid} {base64.b64encode(signature).decode()}\n".encode()
    with pytest.raises(BundleError, match=f"signature by key {keyid} does not verify"):
        open_bundle(_write(tmp_path / "f.nfl", members), [load_public_key(authority[1])])


def test_edited_manifest_breaks_signature(build: BuildBundle, authority: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    members = _members(build())
    members["manifest.yaml"] = members["manifest.yaml"].replace(b"version: 1", b"version: 9")
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(_write(tmp_path / "e.nfl", members), [load_public_key(authority[1])])


@pytest.mark.parametrize("member", ["digests.bin", "entries.bin", "refs.txt", "hosts.bin"])
def test_altered_member_is_named(build: BuildBundle, authority: tuple[Path, Path],
                                 tmp_path: Path, member: str) -> None:
    members = _members(build())
    data = bytearray(members[member])
    data[len(data) // 2] ^= 0x01
    members[member] = bytes(data)
    with pytest.raises(BundleError, match=f"{member}: SHA-256 does not match"):
        open_bundle(_write(tmp_path / "a.nfl", members), [load_public_key(authority[1])])


@pytest.mark.parametrize("member", ["manifest.yaml", "signature", "digests.bin",
                                    "entries.bin", "refs.txt", "hosts.bin"])
def test_truncated_file(build: BuildBundle, authority: tuple[Path, Path], member: str) -> None:
    path = build()
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])
    with pytest.raises(BundleError, match="truncated|missing|not a readable bundle"):
        open_bundle(path, [load_public_key(authority[1])])


def test_extra_and_missing_members(build: BuildBundle, authority: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    members = _members(build())
    trusted = [load_public_key(authority[1])]
    with pytest.raises(BundleError, match="unexpected member evil.sh"):
        open_bundle(_write(tmp_path / "x.nfl", {**members, "evil.sh": b"#!"}), trusted)
    del members["entries.bin"]
    with pytest.raises(BundleError, match="member entries.bin missing"):
        open_bundle(_write(tmp_path / "y.nfl", members), trusted)


def test_not_a_bundle(tmp_path: Path, authority: tuple[Path, Path]) -> None:
    trusted = [load_public_key(authority[1])]
    junk = tmp_path / "junk.nfl"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(BundleError, match="not a readable bundle"):
        open_bundle(junk, trusted)
    with pytest.raises(BundleError, match="file not found"):
        open_bundle(tmp_path / "absent.nfl", trusted)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(version=0), "malformed manifest: version"),
        (lambda m: m.update(format="other/9"), "malformed manifest: format"),
        (lambda m: m.update(surprise=True), "malformed manifest: surprise"),
        (lambda m: m.update(issued="yesterday"), "malformed manifest: issued"),
        (lambda m: m.update(entries=9), "counts differ"),
        (lambda m: m.pop("list_id"), "malformed manifest: list_id"),
    ],
)
def test_malformed_manifest_signed_by_trusted_key(
    build: BuildBundle, authority: tuple[Path, Path], authority_key: PrivateKey,
    tmp_path: Path, edit: object, reason: str,
) -> None:
    members = _members(build())
    manifest = yaml.safe_load(members["manifest.yaml"])
    edit(manifest)  # type: ignore[operator]
    members["manifest.yaml"] = yaml.safe_dump(manifest).encode()
    with pytest.raises(BundleError, match=reason):
        open_bundle(_write(tmp_path / "m.nfl", _resign(members, authority_key)),
                    [load_public_key(authority[1])])


def test_unsorted_digests_refused(build: BuildBundle, authority: tuple[Path, Path],
                                  authority_key: PrivateKey, tmp_path: Path) -> None:
    import hashlib

    members = _members(build())
    digests = members["digests.bin"]
    swapped = digests[32:64] + digests[:32] + digests[64:]
    manifest = yaml.safe_load(members["manifest.yaml"])
    manifest["files"]["digests.bin"]["sha256"] = hashlib.sha256(swapped).hexdigest()
    members.update({"digests.bin": swapped, "manifest.yaml": yaml.safe_dump(manifest).encode()})
    with pytest.raises(BundleError, match="digests.bin: digests not sorted and unique"):
        open_bundle(_write(tmp_path / "u.nfl", _resign(members, authority_key)),
                    [load_public_key(authority[1])])


def test_expiry(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    trusted = [load_public_key(authority[1])]
    past = datetime.now(UTC) - timedelta(days=1)
    path = build(expires=past)
    with pytest.raises(BundleExpired, match="expired at"):
        open_bundle(path, trusted)
    assert open_bundle(path, trusted, allow_expired=True).expired
    future = build(expires=datetime.now(UTC) + timedelta(days=30))
    assert not open_bundle(future, trusted).expired


def test_hmac_bundle_records_key_id(build: BuildBundle, authority: tuple[Path, Path]) -> None:
    from netfilter.digest import hmac_key_id

    key = b"k" * 32
    path = build(hash_name="hmac-sha256", hmac_key=key)
    m = open_bundle(path, [load_public_key(authority[1])]).manifest
    assert (m.hash, m.hmac_key_id) == ("hmac-sha256", hmac_key_id(key))


def test_unverified_manifest_for_info(build: BuildBundle) -> None:
    assert read_manifest_unverified(build(version=5)).version == 5


def test_source_fixture_is_valid_yaml() -> None:
    assert len(yaml.safe_load(SOURCE)["entries"]) == 8
