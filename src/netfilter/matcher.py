"""One list in memory: a Bloom filter in front of exact look-ups in sorted digest arrays.

The filter holds every entry digest and every host-index digest, so a clean URL costs
one probe per host suffix. A "maybe" is confirmed by binary search in the sorted
array (memory-mapped from the bundle), so a false positive never blocks.

Matching follows the design's two stages: the digest of `host/` for each host suffix
is looked up once; it is either a domain-level entry (block), or in the host index
(this host carries URL-level entries: expand its paths), or neither (done). A list
without a host index expands every host.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from netfilter.bloom import BlockedBloom
from netfilter.canonical import host_suffixes, path_prefixes
from netfilter.digest import HashName, hmac_key_id, make_hasher
from netfilter.errors import BundleError
from netfilter.listfile import Bundle, Transparency, pack_entries
from netfilter.listsource import Kind, SourceEntry

__all__ = ["DigestTable", "ListMatcher", "Match", "Source"]

Source = Literal["authority", "local", "exception"]


@dataclass(frozen=True, slots=True)
class Match:
    """An entry that matched: which list, which entry, and through which expression.

    `allowed_by` is set when a local exception lifts this block: the reference of the
    exception entry. Such a Match does not block; it is reported so it can be logged.
    """

    list_id: str
    list_version: int
    ref: str
    category: str
    kind: Kind
    source: Source
    expression: str
    allowed_by: str | None = None

    @property
    def blocks(self) -> bool:
        return self.allowed_by is None


class DigestTable:
    """Exact membership in a sorted array of 32-byte digests, without copying it."""

    __slots__ = ("_buffer", "_count", "_index", "_offset", "_shift")

    def __init__(self, buffer: bytes | mmap.mmap, offset: int, count: int) -> None:
        self._buffer = buffer
        self._offset = offset
        self._count = count
        bits = min(16, max(0, count.bit_length() - 3))
        self._shift = 16 - bits
        view = np.frombuffer(buffer, dtype=np.uint8, count=count * 32, offset=offset)
        prefixes = view.reshape(-1, 32)[:, :2].astype(np.uint32)
        keys = (prefixes[:, 0] << 8 | prefixes[:, 1]) >> self._shift
        bounds = np.searchsorted(keys, np.arange((1 << bits) + 1, dtype=np.uint32))
        self._index = array("I", bounds.astype(np.uint32).tobytes())

    def __len__(self) -> int:
        return self._count

    def find(self, digest: bytes) -> int:
        """Position of `digest`, or -1."""
        bucket = (digest[0] << 8 | digest[1]) >> self._shift
        lo, hi = self._index[bucket], self._index[bucket + 1]
        buffer, offset = self._buffer, self._offset
        while lo < hi:
            mid = (lo + hi) >> 1
            start = offset + mid * 32
            value = buffer[start : start + 32]
            if value < digest:
                lo = mid + 1
            elif value > digest:
                hi = mid
            else:
                return mid
        return -1


class ListMatcher:
    """Checks URLs and host names against one list."""

    def __init__(
        self,
        *,
        list_id: str,
        version: int,
        hash_name: HashName,
        hasher: Callable[[str], bytes],
        entries: DigestTable,
        meta: npt.NDArray[Any],
        refs: bytes | memoryview,
        categories: Sequence[str],
        hosts: DigestTable | None,
        all_digests: Sequence[npt.NDArray[np.uint8]],
        transparency: Transparency,
        source: Source,
    ) -> None:
        self.list_id = list_id
        self.version = version
        self.hash_name = hash_name
        self.hash = hasher
        self.transparency = transparency
        self.source: Source = source
        self._entries = entries
        self._meta = meta
        self._refs = refs
        self._categories = list(categories)
        self._hosts = hosts
        union = np.concatenate(all_digests) if len(all_digests) > 1 else all_digests[0]
        self.bloom = BlockedBloom(union)
        self._has_url_entries = bool(len(meta)) and bool(np.any(meta["kind"]))

    def __repr__(self) -> str:
        return (f"ListMatcher({self.list_id!r}, version={self.version}, "
                f"entries={len(self._entries)}, source={self.source!r})")

    @property
    def entry_count(self) -> int:
        return len(self._entries)

    @property
    def has_host_index(self) -> bool:
        return self._hosts is not None

    # ------------------------------------------------------------ construction

    @classmethod
    def from_bundle(cls, bundle: Bundle, hmac_key: bytes | None = None) -> ListMatcher:
        m = bundle.manifest
        if m.hash == "hmac-sha256":
            if hmac_key is None:
                raise BundleError(bundle.path, "list is hmac-sha256 keyed: configure hmac_key")
            if hmac_key_id(hmac_key) != m.hmac_key_id:
                raise BundleError(bundle.path,
                                  f"list key id {hmac_key_id(hmac_key)} is not the list's "
                                  f"{m.hmac_key_id}: wrong hmac_key file")
        offset, _ = bundle.spans["digests.bin"]
        hosts = None
        if bundle.hosts is not None:
            hosts = DigestTable(bundle.buffer, bundle.spans["hosts.bin"][0], len(bundle.hosts))
        digests = [bundle.digests] + ([bundle.hosts] if bundle.hosts is not None else [])
        return cls(
            list_id=m.list_id, version=m.version, hash_name=m.hash,
            hasher=make_hasher(m.hash, hmac_key),
            entries=DigestTable(bundle.buffer, offset, m.entries),
            meta=bundle.entries, refs=bundle.refs, categories=m.categories, hosts=hosts,
            all_digests=digests, transparency=m.transparency, source="authority",
        )

    @classmethod
    def from_entries(cls, list_id: str, entries: Iterable[SourceEntry], *,
                     source: Source = "local", version: int = 1) -> ListMatcher:
        """A list hashed at load from plaintext entries (operators' local lists)."""
        hasher = make_hasher("sha256")
        digests, meta, refs, categories, hosts, _ = pack_entries(entries, hasher)
        flat = digests.tobytes()
        host_bytes = hosts.tobytes()
        return cls(
            list_id=list_id, version=version, hash_name="sha256", hasher=hasher,
            entries=DigestTable(flat, 0, len(digests)), meta=meta, refs=refs,
            categories=categories, hosts=DigestTable(host_bytes, 0, len(hosts)),
            all_digests=[digests, hosts], transparency=Transparency(), source=source,
        )

    # ------------------------------------------------------------ matching

    def _match(self, position: int, expression: str) -> Match:
        record = self._meta[position]
        start = int(record["ref_offset"])
        ref = bytes(self._refs[start : start + int(record["ref_length"])]).decode()
        kind: Kind = "url" if int(record["kind"]) else "domain"
        return Match(self.list_id, self.version, ref, self._categories[int(record["category"])],
                     kind, self.source, expression)

    def check_parts(self, host: str, path: str,
                    tried: list[str] | None = None) -> Match | None:
        """Match a canonical host and path (with query); `tried` collects expressions."""
        hasher, contains, entries = self.hash, self.bloom.contains, self._entries
        suffixes = host_suffixes(host)
        expand: list[str] = []
        index = self._hosts
        for suffix in suffixes:
            expression = suffix + "/"
            if tried is not None:
                tried.append(expression)
            digest = hasher(expression)
            if contains(digest):
                position = entries.find(digest)
                if position >= 0:
                    return self._match(position, expression)
                if index is not None and index.find(digest) >= 0:
                    expand.append(suffix)
        if index is None and self._has_url_entries:
            expand = suffixes
        if not expand:
            return None
        paths = [p for p in path_prefixes(path) if p != "/"]
        for suffix in expand:
            for prefix in paths:
                expression = suffix + prefix
                if tried is not None:
                    tried.append(expression)
                digest = hasher(expression)
                if contains(digest):
                    position = entries.find(digest)
                    if position >= 0:
                        return self._match(position, expression)
        return None

    def check_host_suffixes(self, suffixes: Sequence[str],
                            tried: list[str] | None = None) -> Match | None:
        """Domain-level entries only: what a resolver can enforce."""
        hasher, contains, entries = self.hash, self.bloom.contains, self._entries
        for suffix in suffixes:
            expression = suffix + "/"
            if tried is not None:
                tried.append(expression)
            digest = hasher(expression)
            if contains(digest):
                position = entries.find(digest)
                if position >= 0:
                    return self._match(position, expression)
        return None

    def has_url_entries_on(self, suffixes: Sequence[str]) -> bool:
        """First stage: may a URL on this host match a URL-level entry of this list?"""
        if self._hosts is None:
            return self._has_url_entries
        hasher, contains, index = self.hash, self.bloom.contains, self._hosts
        for suffix in suffixes:
            digest = hasher(suffix + "/")
            if contains(digest) and index.find(digest) >= 0:
                return True
        return False
