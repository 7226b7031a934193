"""Delta bundles: a signed change from one version of a list to the next.

A node that holds version N of a list can install version M from a delta of a few
hundred kilobytes instead of the full bundle (for a 1% change of a 1M-entry list, see
benchmarks/README.md); a node that holds anything else fetches the full bundle.

The delta is a bundle of the same family as the full one (listfile.py): an
uncompressed tar whose first member is a YAML manifest signed by the authority with a
detached Ed25519 signature line per key, the manifest carrying size and SHA-256 of
every other member. Members, in this order:

    manifest.yaml       format `netfilter-list-delta/1`, list id, result version,
                        `base` (version, checksum, manifest_sha256), `result`
                        (checksum, manifest_sha256, entries, hosts), counts, files
    signature           `ed25519 <key id> <base64>` over
                        b"netfilter-list-delta v1\\n" + manifest.yaml (another prefix
                        than a full bundle's, so neither signature passes for the other)
    result.yaml         the full manifest of the result, verbatim, as the authority
    result.sig          signed it for the full bundle of version M (its signature lines)
    removed.bin         digests leaving the list, 32 bytes each, sorted, unique
    added.bin           digests entering it, sorted, unique
    added_entries.bin   their records (listfile.ENTRY_DTYPE): reference offsets into
                        added_refs.txt, category indexes into the result's categories
    added_refs.txt      the references of the added entries, UTF-8, each once
    hosts_removed.bin   host index changes, sorted, unique; both absent when the
    hosts_added.bin     result has no host index

An entry whose reference, category or kind changes is removed and added again.

Checksums (hex SHA-256):
- `checksum` of a digest set = SHA-256 of the concatenation of its 32-byte digests in
  ascending bytewise order, each once, nothing between them: Safe Browsing v5's
  `sha256Checksum`, and also the SHA-256 of that version's `digests.bin`, so the
  signed full manifest already states it (`files.digests.bin.sha256`).
- `manifest_sha256` = SHA-256 of a manifest.yaml's bytes. The base's pins the exact
  bundle the delta was made from (through it, every member); the result's pins
  result.yaml.

Applying (`apply_delta`): verify the delta (signature by a trusted key, every member's
size and SHA-256, order, counts, ranges) and the authority's signature over
result.yaml; check that the base is the named one (list id, version, digest-set
checksum, manifest SHA-256; a mismatch raises `DeltaBaseMismatch`: fetch the full
bundle); derive the result (`derive_result`, one rule shared with the builder); check
the result's digest-set checksum, then every member's SHA-256 against result.yaml;
write the full bundle atomically.

The result layout is one deterministic rule, so that both sides produce the same
bytes: digests and host index sorted; each kept entry keeps its record with its
category renumbered by name into the result's categories; refs.txt is every distinct
(offset, length) reference span of the kept entries, in the base's order, followed by
added_refs.txt verbatim. The authority builds the full bundle of version M with this
same rule from version N (`build_delta`, `build_delta_from_bundles`, and
`netfilter list build --diff-from`, which writes both the full bundle and the delta).

What the authority signs, and why the result needs no new trust rule: the delta ships
the authority's own signed full manifest of version M. The node re-creates the data
members byte for byte and writes them with that manifest and signature, so the
result is the very file the authority published as the full bundle of version M,
checked by the unchanged loader (`open_bundle`) against the operator's trusted keys
like any download. A node cannot produce a result that no authority signed: any other
outcome of applying fails the checksum or a member hash of the signed result manifest
and is refused before anything is written. We chose this over the two alternatives:
keeping the delta's signature on the result would make the loader accept bundles on
the strength of another document (a second trust path to get right), and a locally
re-written bundle "trusted because its checksum matched" would need a node key or an
unsigned bundle the loader must accept. The price: the authority publishes version
M's full bundle in this layout (its references compacted as above), which the
builders here do.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from netfilter.digest import HashName, hmac_key_id, make_hasher
from netfilter.errors import BundleError, SourceError
from netfilter.keys import PrivateKey, PublicKey
from netfilter.listfile import (
    ENTRY_DTYPE,
    MAX_MANIFEST,
    MAX_SIGNATURE,
    Bundle,
    FileDigest,
    Manifest,
    Transparency,
    _check_signature,
    _first_error,
    _parse_manifest,
    _parse_model,
    pack_entries,
    write_bundle,
    write_signed_bundle,
)
from netfilter.listsource import read_source

__all__ = [
    "DELTA_FORMAT",
    "Delta",
    "DeltaBaseMismatch",
    "DeltaManifest",
    "ListContent",
    "apply_delta",
    "build_delta",
    "build_delta_from_bundles",
    "check_base",
    "default_delta_path",
    "derive_result",
    "digest_set_checksum",
    "make_delta",
    "open_delta",
]

DELTA_FORMAT: Literal["netfilter-list-delta/1"] = "netfilter-list-delta/1"
DELTA_SIGNED_PREFIX = b"netfilter-list-delta v1\n"
_HEX64 = r"^[0-9a-f]{64}$"
_DIGEST_MEMBERS = ("removed.bin", "added.bin", "hosts_removed.bin", "hosts_added.bin")
_REQUIRED = ("manifest.yaml", "signature", "result.yaml", "result.sig", "removed.bin",
             "added.bin", "added_entries.bin", "added_refs.txt")
_ALLOWED = {*_REQUIRED, "hosts_removed.bin", "hosts_added.bin"}
_GATHER_CHUNK = 1 << 16  # entries per step when copying reference bytes

Digests = npt.NDArray[np.uint8]


class DeltaBaseMismatch(BundleError):
    """The delta was made for another base than the one held: fetch the full bundle."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeltaBase(_Strict):
    """The version a delta applies to: exactly one bundle."""

    version: int = Field(ge=1)
    checksum: str = Field(pattern=_HEX64)  # of the base's digest set
    manifest_sha256: str = Field(pattern=_HEX64)  # of the base's manifest.yaml


class DeltaResult(_Strict):
    """What applying must give: the digest-set checksum and the signed full manifest."""

    checksum: str = Field(pattern=_HEX64)
    manifest_sha256: str = Field(pattern=_HEX64)
    entries: int = Field(ge=0)
    hosts: int | None = Field(None, ge=0)


class DeltaManifest(_Strict):
    """The signed statement of a delta bundle; parsed strictly."""

    format: Literal["netfilter-list-delta/1"]
    list_id: str
    version: int = Field(ge=2)  # the result's version
    issued: datetime
    hash: Literal["sha256", "hmac-sha256"]
    hmac_key_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    base: DeltaBase
    result: DeltaResult
    added: int = Field(ge=0)
    removed: int = Field(ge=0)
    hosts_added: int | None = Field(None, ge=0)
    hosts_removed: int | None = Field(None, ge=0)
    files: dict[str, FileDigest]

    @field_validator("issued")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a zone (use Z for UTC)")
        return value

    def to_yaml(self) -> bytes:
        import yaml

        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def digest_set_checksum(digests: Digests) -> str:
    """SHA-256 over the sorted, unique 32-byte digests, concatenated (hex)."""
    return hashlib.sha256(np.ascontiguousarray(digests, dtype=np.uint8).data).hexdigest()


# ---------------------------------------------------------------- content


def _empty_digests() -> Digests:
    return np.zeros((0, 32), dtype=np.uint8)


@dataclass(eq=False)
class ListContent:
    """A list's entries in the bundle's own form: the data members as arrays."""

    digests: Digests  # (n, 32), sorted, unique
    entries: npt.NDArray[Any]  # ENTRY_DTYPE, same order
    refs: bytes
    categories: list[str]
    hosts: Digests | None  # (h, 32) sorted, unique; None: no host index

    @classmethod
    def of(cls, bundle: Bundle) -> ListContent:
        """Read a verified bundle's members into memory."""
        return cls(bundle.array("digests.bin"), bundle.array("entries.bin"),
                   bundle.array("refs.txt").tobytes(), list(bundle.manifest.categories),
                   bundle.array("hosts.bin") if bundle.has_host_index else None)

    def members(self) -> dict[str, bytes]:
        """The data members, named and ordered as write_bundle writes them."""
        members = {
            "digests.bin": np.ascontiguousarray(self.digests, dtype=np.uint8).tobytes(),
            "entries.bin": np.ascontiguousarray(self.entries, dtype=ENTRY_DTYPE).tobytes(),
            "refs.txt": self.refs,
        }
        if self.hosts is not None:
            members["hosts.bin"] = np.ascontiguousarray(self.hosts, dtype=np.uint8).tobytes()
        return members


def _keys(digests: Digests) -> npt.NDArray[Any]:
    return np.ascontiguousarray(digests, dtype=np.uint8).view("S32").ravel()


def _lookup(sorted_keys: npt.NDArray[Any],
            keys: npt.NDArray[Any]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Insertion positions of `keys` in `sorted_keys`, and which of them are present."""
    pos = np.searchsorted(sorted_keys, keys)
    found = np.zeros(len(keys), dtype=bool)
    inside = pos < len(sorted_keys)
    found[inside] = sorted_keys[pos[inside]] == keys[inside]
    return pos, found


def _patch(base: Digests, removed: Digests, added: Digests, where: str | Path,
           what: str) -> tuple[Digests, npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
    """(base - removed) + added, sorted; also the kept mask and the insertion positions."""
    base_keys = _keys(base)
    pos, found = _lookup(base_keys, _keys(removed))
    if not found.all():
        raise BundleError(where, f"removes {int(np.count_nonzero(~found))} {what} the base "
                                 "does not hold")
    keep = np.ones(len(base), dtype=bool)
    keep[pos] = False
    kept = base[keep]
    at, present = _lookup(_keys(kept), _keys(added))
    if present.any():
        raise BundleError(where, f"adds {int(np.count_nonzero(present))} {what} the base "
                                 "already holds")
    return np.insert(kept, at, added, axis=0), keep, at


def _gather(blob: npt.NDArray[np.uint8], offsets: npt.NDArray[Any],
            lengths: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """The byte spans [offset, offset+length) of `blob`, concatenated."""
    parts = []
    for start in range(0, len(offsets), _GATHER_CHUNK):
        off = offsets[start:start + _GATHER_CHUNK].astype(np.int64)
        length = lengths[start:start + _GATHER_CHUNK].astype(np.int64)
        total = int(length.sum())
        if total == 0:
            continue
        begins = np.cumsum(length) - length
        parts.append(blob[np.arange(total, dtype=np.int64) - np.repeat(begins - off, length)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def _category_map(old: list[str], new: list[str]) -> npt.NDArray[np.int16]:
    """Index in `new` of each category of `old` by name, -1 where absent."""
    index = {name: i for i, name in enumerate(new)}
    return np.array([index.get(name, -1) for name in old] or [-1], dtype=np.int16)


def _compact_refs(refs: bytes, entries: npt.NDArray[Any]) -> bytes:
    """The distinct (offset, length) spans of `entries` in `refs`, ordered by offset then
    length, concatenated; the entries' offsets are rewritten to point into the result."""
    blob = np.frombuffer(refs, dtype=np.uint8)
    offsets, lengths = entries["ref_offset"], entries["ref_length"]
    spans = (offsets.astype(np.uint64) << np.uint64(16)) | lengths
    distinct, inverse = np.unique(spans, return_inverse=True)
    starts = distinct >> np.uint64(16)
    span_lengths = distinct & np.uint64(0xFFFF)
    entries["ref_offset"] = (np.cumsum(span_lengths) - span_lengths)[inverse.ravel()]
    return _gather(blob, starts, span_lengths).tobytes()


def derive_result(base: ListContent, *, removed: Digests, added: Digests,
                  added_entries: npt.NDArray[Any], added_refs: bytes, categories: list[str],
                  hosts_removed: Digests | None, hosts_added: Digests | None,
                  where: str | Path) -> ListContent:
    """The content after applying: the one layout rule the builder and the node share.

    Digests and hosts stay sorted; kept entries keep their records, categories
    renumbered by name into `categories`; refs.txt is the kept entries' distinct
    reference spans in the base's order, then `added_refs` verbatim.
    """
    digests, keep, at = _patch(base.digests, removed, added, where, "digest(s)")
    kept = base.entries[keep].copy()
    if len(kept):
        remap = _category_map(base.categories, categories)
        renumbered = remap[kept["category"]]
        if (renumbered < 0).any():
            missing = base.categories[int(kept["category"][np.argmin(renumbered)])]
            raise BundleError(where, f"kept entries have category {missing!r}, which the "
                                     "result's categories lack")
        kept["category"] = renumbered
    kept_refs = _compact_refs(base.refs, kept)
    if len(kept_refs) + len(added_refs) >= 1 << 32:
        raise BundleError(where, "references of the result exceed 4 GiB")
    new_entries = added_entries.astype(ENTRY_DTYPE, copy=True)
    new_entries["ref_offset"] += len(kept_refs)
    hosts = None
    if hosts_added is not None:
        assert hosts_removed is not None
        old_hosts = base.hosts if base.hosts is not None else _empty_digests()
        hosts = _patch(old_hosts, hosts_removed, hosts_added, where, "host digest(s)")[0]
    return ListContent(digests, np.insert(kept, at, new_entries), kept_refs + added_refs,
                       list(categories), hosts)


# ---------------------------------------------------------------- building


@dataclass(eq=False)
class _Change:
    removed: Digests
    added: Digests
    added_entries: npt.NDArray[Any]
    added_refs: bytes
    hosts_removed: Digests | None
    hosts_added: Digests | None


def _same_refs(a: ListContent, ai: npt.NDArray[np.intp], b: ListContent,
               bi: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Per pair (a[ai[k]], b[bi[k]]): are the reference bytes equal?"""
    la, lb = a.entries["ref_length"][ai], b.entries["ref_length"][bi]
    same = la == lb
    idx = np.flatnonzero(same)
    if len(idx):
        lengths = la[idx].astype(np.int64)
        bytes_a = _gather(np.frombuffer(a.refs, np.uint8), a.entries["ref_offset"][ai[idx]],
                          lengths)
        bytes_b = _gather(np.frombuffer(b.refs, np.uint8), b.entries["ref_offset"][bi[idx]],
                          lengths)
        wrong = np.concatenate([[0], np.cumsum(bytes_a != bytes_b)])
        ends = np.cumsum(lengths)
        same[idx] = wrong[ends] == wrong[ends - lengths]
    return np.asarray(same, dtype=bool)


def _diff(base: ListContent, new: ListContent) -> _Change:
    base_keys, new_keys = _keys(base.digests), _keys(new.digests)
    pos, in_new = _lookup(new_keys, base_keys)
    bi = np.flatnonzero(in_new)
    ni = pos[in_new]
    remap = _category_map(base.categories, new.categories)
    b_meta, n_meta = base.entries[bi], new.entries[ni]
    same = ((b_meta["kind"] == n_meta["kind"])
            & (remap[b_meta["category"]] == n_meta["category"].astype(np.int16))
            & _same_refs(base, bi, new, ni))
    removed_mask = ~in_new
    removed_mask[bi[~same]] = True
    added_mask = np.ones(len(new_keys), dtype=bool)
    added_mask[ni[same]] = False
    entries = new.entries[added_mask].copy()
    blob, offsets = bytearray(), []
    at: dict[bytes, int] = {}
    refs = new.refs
    for offset, length in zip(entries["ref_offset"].tolist(), entries["ref_length"].tolist(),
                              strict=True):
        ref = refs[offset:offset + length]
        where = at.get(ref)
        if where is None:
            where = at[ref] = len(blob)
            blob += ref
        offsets.append(where)
    entries["ref_offset"] = np.array(offsets, dtype=np.uint32)
    hosts_removed = hosts_added = None
    if new.hosts is not None:
        old = base.hosts if base.hosts is not None else _empty_digests()
        hosts_removed = old[~_lookup(_keys(new.hosts), _keys(old))[1]]
        hosts_added = new.hosts[~_lookup(_keys(old), _keys(new.hosts))[1]]
    return _Change(base.digests[removed_mask], new.digests[added_mask], entries, bytes(blob),
                   hosts_removed, hosts_added)


def _read_signed(path: Path) -> tuple[bytes, bytes]:
    """(manifest.yaml, signature) of a bundle just written."""
    with tarfile.open(path, mode="r:") as tar:
        parts = []
        for name in ("manifest.yaml", "signature"):
            member = tar.extractfile(name)
            assert member is not None
            parts.append(member.read())
    return parts[0], parts[1]


def default_delta_path(out: str | Path, base_version: int) -> Path:
    """Where `list build --diff-from` puts the delta: beside the full bundle."""
    out = Path(out)
    stem = out.name[:-4] if out.name.endswith(".nfl") else out.name
    return out.with_name(f"{stem}.from-v{base_version}.delta.nfl")


def make_delta(
    base: Bundle,
    new: ListContent,
    out: str | Path,
    delta_out: str | Path,
    *,
    key: PrivateKey,
    version: int,
    hash_name: HashName,
    hmac_id: str | None = None,
    transparency: Transparency | None = None,
    expires: datetime | None = None,
    issued: datetime | None = None,
) -> tuple[Manifest, DeltaManifest]:
    """Write the full bundle of `new` as version `version` (in the layout a node derives
    from `base`) and the delta from `base` to it; both signed with `key`."""
    bm = base.manifest
    if version <= bm.version:
        raise BundleError(out, f"version {version} must be newer than the base's "
                               f"version {bm.version}")
    if (hash_name, hmac_id) != (bm.hash, bm.hmac_key_id):
        raise BundleError(base.path, f"the base is hashed with {bm.hash} (list key "
                                     f"{bm.hmac_key_id or 'none'}), the new version with "
                                     f"{hash_name} (list key {hmac_id or 'none'}): every "
                                     "digest changes, publish the full bundle only")
    content = ListContent.of(base)
    change = _diff(content, new)
    result = derive_result(content, removed=change.removed, added=change.added,
                           added_entries=change.added_entries, added_refs=change.added_refs,
                           categories=new.categories, hosts_removed=change.hosts_removed,
                           hosts_added=change.hosts_added, where=base.path)
    assert np.array_equal(result.digests, new.digests), "bad math: delta digests"
    assert (result.hosts is None) == (new.hosts is None), "bad math: host index"
    assert new.hosts is None or np.array_equal(result.hosts, new.hosts), (  # type: ignore[arg-type]
        "bad math: hosts")
    manifest = write_bundle(
        out, key=key, list_id=bm.list_id, version=version, hash_name=hash_name,
        digests=result.digests, entries=result.entries, refs=result.refs,
        categories=result.categories, hosts=result.hosts, transparency=transparency,
        hmac_id=hmac_id, issued=issued, expires=expires)
    result_yaml, result_sig = _read_signed(Path(out))
    members: dict[str, bytes] = {
        "result.yaml": result_yaml,
        "result.sig": result_sig,
        "removed.bin": change.removed.tobytes(),
        "added.bin": np.ascontiguousarray(change.added).tobytes(),
        "added_entries.bin": change.added_entries.tobytes(),
        "added_refs.txt": change.added_refs,
    }
    if change.hosts_added is not None and change.hosts_removed is not None:
        members["hosts_removed.bin"] = np.ascontiguousarray(change.hosts_removed).tobytes()
        members["hosts_added.bin"] = np.ascontiguousarray(change.hosts_added).tobytes()
    delta = DeltaManifest(
        format=DELTA_FORMAT,
        list_id=bm.list_id,
        version=version,
        issued=manifest.issued,
        hash=hash_name,
        hmac_key_id=hmac_id,
        base=DeltaBase(version=bm.version, checksum=digest_set_checksum(content.digests),
                       manifest_sha256=hashlib.sha256(base.manifest_bytes()).hexdigest()),
        result=DeltaResult(checksum=digest_set_checksum(result.digests),
                           manifest_sha256=hashlib.sha256(result_yaml).hexdigest(),
                           entries=manifest.entries, hosts=manifest.hosts),
        added=len(change.added),
        removed=len(change.removed),
        hosts_added=None if change.hosts_added is None else len(change.hosts_added),
        hosts_removed=None if change.hosts_removed is None else len(change.hosts_removed),
        files={name: FileDigest(size=len(data), sha256=hashlib.sha256(data).hexdigest())
               for name, data in members.items()},
    )
    delta_bytes = delta.to_yaml()
    signature = key.sign(DELTA_SIGNED_PREFIX + delta_bytes)
    sig_line = f"ed25519 {key.public.id} {base64.b64encode(signature).decode()}\n".encode()
    write_signed_bundle(delta_out, delta_bytes, sig_line, members,
                        int(manifest.issued.timestamp()))
    return manifest, delta


def build_delta(
    source: str | Path,
    base: Bundle,
    out: str | Path,
    delta_out: str | Path,
    *,
    key: PrivateKey,
    list_id: str,
    version: int,
    hash_name: HashName = "sha256",
    hmac_key: bytes | None = None,
    expires: datetime | None = None,
    host_index: bool = True,
    progress: bool = False,
) -> tuple[Manifest, DeltaManifest, int]:
    """From a YAML/CSV source and the previous bundle: the full bundle at `out` and the
    delta at `delta_out`; returns (full manifest, delta manifest, duplicates dropped)."""
    if list_id != base.manifest.list_id:
        raise BundleError(base.path, f"holds list {base.manifest.list_id}, not {list_id}")
    header, entries = read_source(source)
    try:
        transparency = Transparency(**header)
    except (ValidationError, TypeError) as e:
        raise SourceError(source, _first_error(e)) from e
    hasher = make_hasher(hash_name, hmac_key)
    digests, meta, refs, categories, hosts, dups = pack_entries(entries, hasher, progress)
    new = ListContent(digests, meta, refs, categories, hosts if host_index else None)
    manifest, delta = make_delta(
        base, new, out, delta_out, key=key, version=version, hash_name=hash_name,
        hmac_id=hmac_key_id(hmac_key) if hmac_key is not None else None,
        transparency=transparency, expires=expires)
    return manifest, delta, dups


def build_delta_from_bundles(base: Bundle, new: Bundle, out: str | Path,
                             delta_out: str | Path, *,
                             key: PrivateKey) -> tuple[Manifest, DeltaManifest]:
    """From two verified bundles of one list: the delta, and `new` re-written at `out`
    in the layout a node derives (same content, version, times and texts; signed with
    `key`). Publish that full bundle, not `new`, beside the delta."""
    m = new.manifest
    if m.list_id != base.manifest.list_id:
        raise BundleError(new.path, f"holds list {m.list_id}, the base list "
                                    f"{base.manifest.list_id}")
    return make_delta(base, ListContent.of(new), out, delta_out, key=key, version=m.version,
                      hash_name=m.hash, hmac_id=m.hmac_key_id, transparency=m.transparency,
                      expires=m.expires, issued=m.issued)


# ---------------------------------------------------------------- reading and applying


@dataclass(eq=False)
class Delta:
    """A verified delta bundle, in memory."""

    path: Path
    manifest: DeltaManifest
    signer: PublicKey
    result_manifest: Manifest
    result_yaml: bytes
    result_sig: bytes
    removed: Digests
    added: Digests
    added_entries: npt.NDArray[Any]
    added_refs: bytes
    hosts_removed: Digests | None
    hosts_added: Digests | None

    def summary(self) -> str:
        m = self.manifest
        return (f"list={m.list_id} version {m.base.version} -> {m.version}: "
                f"+{m.added} -{m.removed} entries, result {m.result.entries} entries, "
                f"key={self.signer.id}")


def _read_members(path: Path) -> dict[str, bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise BundleError(path, "file not found") from e
    except IsADirectoryError as e:
        raise BundleError(path, "is a directory, not a delta bundle") from e
    except OSError as e:
        raise BundleError(path, f"cannot read ({e.strerror})") from e
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar.getmembers():
                if info.name in members:
                    raise BundleError(path, f"member {info.name} appears twice")
                file = tar.extractfile(info) if info.isfile() else None
                if file is None:
                    raise BundleError(path, f"member {info.name} is not a regular file")
                members[info.name] = file.read()
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(path, f"not a readable delta bundle (truncated or not a tar: "
                                f"{e})") from e
    if "digests.bin" in members and "result.yaml" not in members:
        raise BundleError(path, "a full bundle, not a delta: install it as it is")
    for required in _REQUIRED:
        if required not in members:
            raise BundleError(path, f"member {required} missing")
    unknown = set(members) - _ALLOWED
    if unknown:
        raise BundleError(path, f"unexpected member {sorted(unknown)[0]}")
    return members


def _parse_delta_manifest(path: Path, data: bytes) -> DeltaManifest:
    return _parse_model(path, data, DeltaManifest, "delta manifest")


def _digest_member(path: Path, name: str, data: bytes, count: int | None) -> Digests:
    if len(data) % 32:
        raise BundleError(path, f"{name}: size not a multiple of 32")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, 32)
    if count is not None and len(rows) != count:
        raise BundleError(path, f"{name}: {len(rows)} digests, the manifest says {count}")
    keys = _keys(rows)
    if not bool(np.all(keys[1:] > keys[:-1])):
        raise BundleError(path, f"{name}: digests not sorted and unique")
    return rows


def open_delta(path: str | Path, trusted: list[PublicKey] | tuple[PublicKey, ...]) -> Delta:
    """Verify a delta bundle completely (not yet against a base); raises BundleError."""
    path = Path(path)
    if not trusted:
        raise BundleError(path, "no trusted key configured")
    members = _read_members(path)
    if len(members["manifest.yaml"]) > MAX_MANIFEST:
        raise BundleError(path, "malformed delta manifest: larger than 1 MiB")
    if len(members["signature"]) > MAX_SIGNATURE or len(members["result.sig"]) > MAX_SIGNATURE:
        raise BundleError(path, "signature: larger than 4 KiB")
    signer = _check_signature(path, members["signature"], members["manifest.yaml"], trusted,
                              prefix=DELTA_SIGNED_PREFIX)
    m = _parse_delta_manifest(path, members["manifest.yaml"])
    data_names = set(members) - {"manifest.yaml", "signature"}
    if set(m.files) != data_names:
        raise BundleError(path, "delta manifest lists other files than the delta holds")
    for name in sorted(data_names):
        data, expected = members[name], m.files[name]
        if len(data) != expected.size:
            raise BundleError(path, f"{name}: size {len(data)} != signed size {expected.size}")
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise BundleError(path, f"{name}: SHA-256 does not match the signed manifest")
    result_where = Path(f"{path}:result.yaml")
    _check_signature(result_where, members["result.sig"], members["result.yaml"], trusted)
    result = _parse_manifest(result_where, members["result.yaml"])
    if m.version <= m.base.version:
        raise BundleError(path, f"version {m.version} is not newer than its base version "
                                f"{m.base.version}")
    if (result.list_id, result.version, result.hash, result.hmac_key_id, result.entries,
            result.hosts) != (m.list_id, m.version, m.hash, m.hmac_key_id, m.result.entries,
                              m.result.hosts):
        raise BundleError(path, "result.yaml does not describe the delta's result")
    if hashlib.sha256(members["result.yaml"]).hexdigest() != m.result.manifest_sha256:
        raise BundleError(path, "result.yaml: SHA-256 differs from result.manifest_sha256")
    if result.files["digests.bin"].sha256 != m.result.checksum:
        raise BundleError(path, "result checksum differs from the signed result manifest's "
                                "digests.bin")
    has_hosts = "hosts_added.bin" in members
    if has_hosts != ("hosts_removed.bin" in members) or has_hosts != (result.hosts is not None):
        raise BundleError(path, "host index changes do not match the result's host index")
    removed = _digest_member(path, "removed.bin", members["removed.bin"], m.removed)
    added = _digest_member(path, "added.bin", members["added.bin"], m.added)
    hosts_removed = hosts_added = None
    if has_hosts:
        hosts_removed = _digest_member(path, "hosts_removed.bin", members["hosts_removed.bin"],
                                       m.hosts_removed)
        hosts_added = _digest_member(path, "hosts_added.bin", members["hosts_added.bin"],
                                     m.hosts_added)
    raw = members["added_entries.bin"]
    if len(raw) != len(added) * ENTRY_DTYPE.itemsize:
        raise BundleError(path, "added_entries.bin: count differs from added.bin")
    entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
    refs = members["added_refs.txt"]
    if len(entries) and (
            int(entries["category"].max()) >= len(result.categories)
            or int(entries["kind"].max()) > 1
            or int((entries["ref_offset"].astype(np.uint64) + entries["ref_length"]).max())
            > len(refs)):
        raise BundleError(path, "added_entries.bin: category, kind or reference out of range")
    return Delta(path, m, signer, result, members["result.yaml"], members["result.sig"],
                 removed, added, entries, refs, hosts_removed, hosts_added)


def check_base(base: Bundle, delta: Delta) -> None:
    """Is `base` the bundle `delta` was made from? Raises DeltaBaseMismatch if not."""
    m, bm, where = delta.manifest, base.manifest, delta.path
    if bm.list_id != m.list_id:
        raise DeltaBaseMismatch(where, f"is a delta of list {m.list_id}, the base {base.path} "
                                       f"holds list {bm.list_id}; fetch the full bundle")
    if bm.version != m.base.version:
        raise DeltaBaseMismatch(where, f"applies to version {m.base.version} of list "
                                       f"{m.list_id}, the base {base.path} is version "
                                       f"{bm.version}; fetch the full bundle")
    if bm.files["digests.bin"].sha256 != m.base.checksum:
        raise DeltaBaseMismatch(where, f"the base {base.path} (version {bm.version}) holds "
                                       "other digests than the delta's base (digest-set "
                                       "checksum differs); fetch the full bundle")
    if hashlib.sha256(base.manifest_bytes()).hexdigest() != m.base.manifest_sha256:
        raise DeltaBaseMismatch(where, f"the base {base.path} (version {bm.version}) is not "
                                       "the bundle the delta was made from (its manifest "
                                       "differs: references, categories, host index, texts "
                                       "or times); fetch the full bundle")


def apply_delta(base: Bundle, delta_path: str | Path,
                trusted: list[PublicKey] | tuple[PublicKey, ...],
                out: str | Path | None = None, *, mode: int = 0o644,
                prefix: str = ".tmp-") -> Path:
    """Verify a delta, apply it to the verified `base`, check the result and write it
    as a full bundle (atomically; default: `<list id>-<version>.nfl` beside the delta;
    `mode` and `prefix` as `write_signed_bundle` takes them).

    The written bundle is the authority's full bundle of the new version, byte for
    byte: its manifest and signature come verbatim from the delta. Raises
    DeltaBaseMismatch when `base` is not the delta's base (fetch the full bundle), and
    BundleError for anything else; nothing is written then.
    """
    delta = open_delta(delta_path, trusted)
    check_base(base, delta)
    m, where = delta.manifest, delta.path
    result = derive_result(ListContent.of(base), removed=delta.removed, added=delta.added,
                           added_entries=delta.added_entries, added_refs=delta.added_refs,
                           categories=list(delta.result_manifest.categories),
                           hosts_removed=delta.hosts_removed, hosts_added=delta.hosts_added,
                           where=where)
    members = result.members()
    checksum = hashlib.sha256(members["digests.bin"]).hexdigest()  # = digest_set_checksum
    if checksum != m.result.checksum:
        raise BundleError(where, f"result checksum does not match: applied to {base.path} "
                                 f"it gives {checksum[:16]}..., the signed delta says "
                                 f"{m.result.checksum[:16]}...; nothing written")
    files = delta.result_manifest.files
    if set(members) != set(files):
        raise BundleError(where, "the result's members differ from the signed result manifest")
    for name, data in members.items():
        if len(data) != files[name].size or (name != "digests.bin" and (
                hashlib.sha256(data).hexdigest() != files[name].sha256)):
            raise BundleError(where, f"result {name} does not match the signed result "
                                     "manifest; nothing written")
    target = Path(out) if out is not None else where.with_name(f"{m.list_id}-{m.version}.nfl")
    issued = delta.result_manifest.issued
    write_signed_bundle(target, delta.result_yaml, delta.result_sig, members,
                        int(issued.astimezone(UTC).timestamp()), mode=mode, prefix=prefix)
    return target
