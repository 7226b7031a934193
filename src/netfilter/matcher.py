"""One list in memory: a Bloom filter in front of exact look-ups in sorted digest arrays.

The filter holds every entry digest and every host-index digest, so a clean URL costs
one probe per host suffix. A "maybe" is confirmed by binary search in the sorted
array (read from the bundle on demand), so a false positive never blocks.

Matching follows the design's two stages: the digest of `host/` for each host suffix
is looked up once; it is either a domain-level entry (block), or in the host index
(this host carries URL-level entries: expand its paths), or neither (done). A list
without a host index expands every host.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import numpy.typing as npt

from netfilter.bloom import TABLE_MASK, BlockedBloom, pattern_arrays, pattern_masks
from netfilter.canonical import host_suffixes, path_prefixes
from netfilter.digest import HashName, hmac_key_id, make_hasher
from netfilter.errors import BundleError
from netfilter.listfile import Bundle, Transparency, pack_entries
from netfilter.listsource import Kind, SourceEntry
from netfilter.memo import remember

__all__ = ["DigestTable", "ListMatcher", "Match", "Source"]

_fastpath: ModuleType | None
try:  # the C hot loop, built at install where a compiler is available
    from netfilter import _fastpath
except ImportError:  # pragma: no cover - exercised where no compiler was present
    _fastpath = None

Source = Literal["authority", "local", "exception"]
_FIRST = struct.Struct(">IH")  # BlockedBloom's first word and pattern (bloom.PROBE_FIELDS)
_SECOND = struct.Struct(">IH")  # the second, at offset 6
_RECORD = struct.Struct("<IHBB")  # listfile.ENTRY_DTYPE: ref offset, ref length, category, kind


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


Reader = Callable[[int, int], bytes]  # (offset, size) -> bytes


class DigestTable:
    """Exact membership in a sorted array of 32-byte digests, read on demand.

    A prefix index (the first bits of each digest -> row range) narrows a look-up to
    one small bucket, read with one call to `read` and searched in memory.
    """

    __slots__ = ("_count", "_index", "_offset", "_read", "_shift")

    def __init__(self, read: Reader, offset: int, count: int,
                 chunks: Iterable[npt.NDArray[np.uint8]]) -> None:
        """`chunks` are the same digests as consecutive (k, 32) arrays, for the index."""
        self._read = read
        self._offset = offset
        self._count = count
        bits = min(16, max(0, count.bit_length() - 3))
        self._shift = 16 - bits
        counts = np.zeros(1 << bits, dtype=np.int64)
        for chunk in chunks:
            prefixes = (chunk[:, 0].astype(np.uint32) << 8 | chunk[:, 1]) >> self._shift
            counts += np.bincount(prefixes, minlength=1 << bits)
        bounds = np.zeros((1 << bits) + 1, dtype=np.uint32)
        np.cumsum(counts, out=bounds[1:])
        self._index = array("I", bounds.tobytes())

    def __len__(self) -> int:
        return self._count

    def find(self, digest: bytes) -> int:
        """Position of `digest`, or -1."""
        bucket = (digest[0] << 8 | digest[1]) >> self._shift
        lo, hi = self._index[bucket], self._index[bucket + 1]
        if lo == hi:
            return -1
        rows = self._read(self._offset + lo * 32, (hi - lo) * 32)
        left, right = 0, hi - lo
        while left < right:
            mid = (left + right) >> 1
            value = rows[mid * 32 : mid * 32 + 32]
            if value < digest:
                left = mid + 1
            elif value > digest:
                right = mid
            else:
                return lo + mid
        return -1


class ListMatcher:
    """Checks URLs and host names against one list."""

    def __init__(
        self,
        *,
        list_id: str,
        version: int,
        hash_name: HashName,
        hmac_key: bytes | None,
        read: Reader,
        spans: dict[str, tuple[int, int]],
        chunks: Callable[[str], Iterable[npt.NDArray[np.uint8]]],
        categories: Sequence[str],
        url_entries: int,
        transparency: Transparency,
        source: Source,
    ) -> None:
        """Build the filter and indexes from `chunks(member)`; `read` serves look-ups."""
        self.list_id = list_id
        self.version = version
        self.hash_name = hash_name
        self.transparency = transparency
        self.source: Source = source
        self._hmac_key = hmac_key
        self._read = read
        self._records = spans["entries.bin"][0]
        self._refs = spans["refs.txt"][0]
        self._categories = list(categories)
        entries_at, entries_size = spans["digests.bin"]
        self._entries = DigestTable(read, entries_at, entries_size // 32,
                                    chunks("digests.bin"))
        self._hosts: DigestTable | None = None
        members = ["digests.bin"]
        if "hosts.bin" in spans:
            hosts_at, hosts_size = spans["hosts.bin"]
            self._hosts = DigestTable(read, hosts_at, hosts_size // 32, chunks("hosts.bin"))
            members.append("hosts.bin")
        size = sum(spans[m][1] // 32 for m in members)
        self.bloom = BlockedBloom((c for m in members for c in chunks(m)), size=size)
        self._has_url_entries = url_entries > 0
        self._make_checks()

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
        return cls(
            list_id=m.list_id, version=m.version, hash_name=m.hash,
            hmac_key=hmac_key if m.hash == "hmac-sha256" else None,
            read=bundle.read, spans=bundle.spans, chunks=bundle.chunks,
            categories=m.categories, url_entries=m.url_entries,
            transparency=m.transparency, source="authority",
        )

    @classmethod
    def from_entries(cls, list_id: str, entries: Iterable[SourceEntry], *,
                     source: Source = "local", version: int = 1) -> ListMatcher:
        """A list hashed at load from plaintext entries (operators' local lists)."""
        digests, meta, refs, categories, hosts, _ = pack_entries(entries, make_hasher("sha256"))
        members = {"digests.bin": digests.tobytes(), "hosts.bin": hosts.tobytes(),
                   "entries.bin": meta.tobytes(), "refs.txt": refs}
        spans: dict[str, tuple[int, int]] = {}
        blob = bytearray()
        for name, data in members.items():
            spans[name] = (len(blob), len(data))
            blob += data
        memory = bytes(blob)
        arrays = {"digests.bin": digests, "hosts.bin": hosts}
        return cls(
            list_id=list_id, version=version, hash_name="sha256", hmac_key=None,
            read=lambda offset, size: memory[offset : offset + size], spans=spans,
            chunks=lambda member: [arrays[member]], categories=categories,
            url_entries=int(np.count_nonzero(meta["kind"])) if len(meta) else 0,
            transparency=Transparency(), source=source,
        )

    # ------------------------------------------------------------ matching

    def _match(self, position: int, expression: str) -> Match:
        return _match_function(self)(position, expression)

    def _make_checks(self) -> None:
        """Build the hot-path checks as closures over locals.

        `pairs(hosts, tails)` yields (i, j, digest) for every host + tail expression the
        Bloom filter may hold: in C (`netfilter._fastpath`: hashing and probing are
        almost all the work of a clean check) or, where the extension is not built, in
        Python with the same arithmetic as BlockedBloom.contains. Only those few
        candidates reach the exact look-up.
        """
        key = self._hmac_key
        words, nwords = self.bloom.words, self.bloom.nwords
        find = self._entries.find
        in_index = _remembered(self._hosts.find) if self._hosts is not None else None
        expand_all = in_index is None and self._has_url_entries
        match = _match_function(self)  # not self._match: see _match_function
        slash = ["/"]
        pairs = _fast_pairs(words, key) or _python_pairs(words, nwords, key)

        def check_host_suffixes(suffixes: Sequence[str],
                                tried: list[str] | None = None) -> Match | None:
            if tried is not None:
                tried.extend(s + "/" for s in suffixes)
            for i, _, digest in pairs(list(suffixes), slash):
                position = find(digest)
                if position >= 0:
                    return match(position, suffixes[i] + "/")
            return None

        def url_entries_on(suffixes: Sequence[str]) -> list[str]:
            """The suffixes (of a host with no domain-level entry) in the host index."""
            if in_index is None:
                return list(suffixes) if expand_all else []
            return [suffixes[i] for i, _, digest in pairs(list(suffixes), slash)
                    if in_index(digest) >= 0]

        def host_stage(suffixes: list[str]) -> Match | list[str]:
            """A domain-level match of the host, else its suffixes whose paths to try."""
            expand: list[str] = []
            for i, _, digest in pairs(suffixes, slash):
                position = find(digest)
                if position >= 0:
                    return match(position, suffixes[i] + "/")
                if in_index is not None and in_index(digest) >= 0:
                    expand.append(suffixes[i])
            return suffixes if expand_all else expand

        stages: dict[str, Match | list[str]] = {}

        def host_stage_of(host: str) -> Match | list[str]:
            return host_stage(host_suffixes(host))

        def staged(host: str) -> Match | list[str]:
            """host_stage of a canonical host, remembered: the table never changes
            under a matcher, and the same hosts come again and again (the answer is
            only read, never changed)."""
            return remember(stages, host, host_stage_of, STAGE_MEMO_SIZE)

        def check_parts(host: str, path: str, tried: list[str] | None = None) -> Match | None:
            if tried is None:
                expand = staged(host)
            else:
                suffixes = host_suffixes(host)
                tried.extend(s + "/" for s in suffixes)
                expand = host_stage(suffixes)
            if isinstance(expand, Match):
                return expand
            if not expand:
                return None
            paths = [p for p in path_prefixes(path) if p != "/"]
            if tried is not None:
                tried.extend(s + p for s in expand for p in paths)
            for i, j, digest in pairs(expand, paths):
                position = find(digest)
                if position >= 0:
                    return match(position, expand[i] + paths[j])
            return None

        def urls_free(host: str) -> bool:
            """No URL on this canonical host can match: no domain-level entry covers
            it and it carries no URL-level entries (check_parts would return None
            for every path)."""
            return staged(host) == []

        def has_url_entries_on(suffixes: Sequence[str]) -> bool:
            return bool(url_entries_on(suffixes))

        self.check_parts: Callable[[str, str, list[str] | None], Match | None] = check_parts
        """Match a canonical host and path (with query); `tried` collects expressions."""
        self.check_host_suffixes: Callable[[Sequence[str], list[str] | None], Match | None] = (
            check_host_suffixes)
        """Domain-level entries only, for host suffixes: what a resolver can enforce."""
        self.has_url_entries_on: Callable[[Sequence[str]], bool] = has_url_entries_on
        """First stage: may a URL on these host suffixes match a URL-level entry?"""
        self.urls_free: Callable[[str], bool] = urls_free
        """No URL on this canonical host can match (a proxy may skip its paths)."""


Pairs = Callable[[list[str], list[str]], Iterable[tuple[int, int, bytes]]]


def _match_function(m: ListMatcher) -> Callable[[int, str], Match]:
    """The Match of entry `position`, over the matcher's parts rather than the matcher.

    The checks the matcher keeps as attributes hold this function; had it been the
    bound `m._match`, matcher and checks would form a reference cycle, freed only by
    the cyclic GC, and never once the objects are frozen (`gc.freeze()`, which the proxy
    addon calls after each reload): each replaced list, with its open bundle copy,
    would then stay in memory for good."""
    read, records, refs, categories = m._read, m._records, m._refs, m._categories
    list_id, version, source = m.list_id, m.version, m.source

    def match(position: int, expression: str) -> Match:
        ref_at, ref_length, category, kind = _RECORD.unpack(
            read(records + position * _RECORD.size, _RECORD.size))
        ref = read(refs + ref_at, ref_length).decode("utf-8", "replace")
        return Match(list_id, version, ref, categories[category],
                     "url" if kind else "domain", source, expression)

    return match


INDEX_MEMO_SIZE = 1 << 15  # host-index answers kept per list; cleared wholesale when full
STAGE_MEMO_SIZE = 1 << 14  # host-stage answers (per canonical host) kept per list


def _remembered(find: Callable[[bytes], int]) -> Callable[[bytes], int]:
    """`find` for the host index, remembering its answers.

    Every request to a host of the host index asks the same question again, and the
    answer is a read from the bundle (a system call, whose cost in a VM is several
    times that of the look-up itself). The table never changes under a matcher, so
    the answers stay right for its whole life (a reload builds a new matcher).
    """
    memo: dict[bytes, int] = {}

    def remembered(digest: bytes) -> int:
        return remember(memo, digest, find, INDEX_MEMO_SIZE)

    return remembered


def _fast_pairs(words: array[int], key: bytes | None) -> Pairs | None:
    """The C candidate generator, or None where the extension is not built."""
    if _fastpath is None:
        return None
    first, second = pattern_arrays()
    maybe: Pairs = _fastpath.Filter(words, first, second, key or b"").maybe
    return maybe


def _python_pairs(words: array[int], nwords: int, key: bytes | None) -> Pairs:
    """The same candidates in Python (no compiler at install): same arithmetic."""
    sha256, keyed = hashlib.sha256, hmac.digest
    first_word, second_word = _FIRST.unpack_from, _SECOND.unpack_from
    first, second = pattern_masks()
    low = TABLE_MASK

    def pairs(hosts: list[str], tails: list[str]) -> Iterable[tuple[int, int, bytes]]:
        for i, host in enumerate(hosts):
            for j, tail in enumerate(tails):
                data = (host + tail).encode()
                digest = sha256(data).digest() if key is None else keyed(key, data, "sha256")
                w, a = first_word(digest)
                mask = first[a & low]
                if words[(w * nwords) >> 32] & mask != mask:
                    continue
                w, a = second_word(digest, 6)
                mask = second[a & low]
                if words[(w * nwords) >> 32] & mask == mask:
                    yield i, j, digest

    return pairs
