"""The signed list bundle (`.nfl`): what an authority publishes and an operator installs.

An uncompressed tar (digests are random bytes; compression would gain nothing and
would stop look-ups from reading a record at its offset) holding, in this order:

    manifest.yaml   list id, version, times, hash, counts, transparency text, and the
                    size and SHA-256 of every other member (the signed statement)
    signature       one line per signing key: `ed25519 <key id> <base64 signature>`
                    over b"netfilter-list-manifest v1\\n" + manifest.yaml
    digests.bin     entry digests, 32 bytes each, sorted, unique
    entries.bin     per digest (same order): ref offset u32, ref length u16,
                    category index u8, kind u8 (0 domain, 1 url), little-endian
    refs.txt        the entry references, UTF-8, concatenated
    hosts.bin       host index: digests of `host/` for every host that carries
                    URL-level entries, sorted, unique (absent: no host index)

No plaintext URL or domain is in a bundle. Verification order: members, signature
(against trusted keys), manifest schema, each member's size and hash, array shapes
and order, expiry. Anything off raises BundleError naming the part.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from netfilter.digest import HashName, hmac_key_id, make_hasher
from netfilter.errors import BundleError, BundleExpired, SourceError
from netfilter.keys import PrivateKey, PublicKey
from netfilter.listsource import SourceEntry, read_source

__all__ = [
    "ENTRY_DTYPE",
    "FORMAT",
    "Bundle",
    "Manifest",
    "Transparency",
    "build_bundle",
    "open_bundle",
    "read_manifest_unverified",
    "write_bundle",
    "write_signed_bundle",
]

FORMAT: Literal["netfilter-list/1"] = "netfilter-list/1"
SIGNED_PREFIX = b"netfilter-list-manifest v1\n"
ENTRY_DTYPE = np.dtype(
    [("ref_offset", "<u4"), ("ref_length", "<u2"), ("category", "u1"), ("kind", "u1")]
)
KIND_CODES: dict[str, int] = {"domain": 0, "url": 1}
MAX_MANIFEST = 1 << 20
MAX_SIGNATURE = 1 << 12
MAX_TEXT = 1000
CHUNK_BYTES = 1 << 22  # 4 MiB: a multiple of every record size
_LIST_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DATA_MEMBERS = ("digests.bin", "entries.bin", "refs.txt", "hosts.bin")
RECORD_SIZES = {"digests.bin": 32, "hosts.bin": 32, "entries.bin": ENTRY_DTYPE.itemsize,
                "refs.txt": 1}
MEMBER_DTYPES: dict[str, Any] = {"digests.bin": np.uint8, "hosts.bin": np.uint8,
                                 "entries.bin": ENTRY_DTYPE, "refs.txt": np.dtype("V1")}


class TransparencyText(BaseModel):
    """What the stop page and the DNS error text say about the list, in one language."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    issuer: str | None = Field(None, max_length=MAX_TEXT)
    legal_basis: str | None = Field(None, max_length=MAX_TEXT)
    contact: str | None = Field(None, max_length=MAX_TEXT)
    appeal_url: str | None = Field(None, max_length=MAX_TEXT)
    hotline_url: str | None = Field(None, max_length=MAX_TEXT)


class Transparency(TransparencyText):
    """The default text plus translations keyed by language tag (`de`, `fr`, ...)."""

    translations: dict[str, TransparencyText] = Field(default_factory=dict)

    def for_language(self, language: str) -> TransparencyText:
        """The text in `language`, falling back field by field to the default."""
        local = self.translations.get(language.lower())
        if local is None:
            return TransparencyText(**self.model_dump(exclude={"translations"}))
        base = self.model_dump(exclude={"translations"})
        base.update({k: v for k, v in local.model_dump().items() if v is not None})
        return TransparencyText(**base)


class FileDigest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """The signed statement about a bundle; parsed strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["netfilter-list/1"]
    list_id: str = Field(pattern=_LIST_ID)
    version: int = Field(ge=1)
    issued: datetime
    expires: datetime | None = None
    hash: Literal["sha256", "hmac-sha256"]
    hmac_key_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    entries: int = Field(ge=0)
    domain_entries: int = Field(ge=0)
    url_entries: int = Field(ge=0)
    hosts: int | None = Field(None, ge=0)
    categories: list[str] = Field(max_length=256)
    transparency: Transparency = Field(default_factory=Transparency)
    files: dict[str, FileDigest]

    @field_validator("issued", "expires")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("time must carry a zone (use Z for UTC)")
        return value

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires

    def to_yaml(self) -> bytes:
        import yaml

        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


@dataclass
class Bundle:
    """A verified bundle, read from a private copy that only this process can reach.

    The arrays are not mapped: loading streams them once (verification, then the
    filter build), and afterwards exact look-ups read the few bytes they need with
    pread. The page cache keeps what is hot; the process keeps only its filters. (A
    mapping would do the same, but the kernel maps 16 neighbouring pages per fault,
    so a few thousand look-ups made the whole file count as the process's memory.)
    """

    path: Path
    manifest: Manifest
    signer: PublicKey
    file: IO[bytes] = field(repr=False)  # the private, unlinked copy
    spans: dict[str, tuple[int, int]] = field(repr=False)  # member -> (offset, size)

    @property
    def expired(self) -> bool:
        return self.manifest.is_expired()

    @property
    def has_host_index(self) -> bool:
        return "hosts.bin" in self.spans

    def manifest_bytes(self) -> bytes:
        """The signed manifest exactly as the bundle holds it (a delta names its base by
        the SHA-256 of these bytes)."""
        return self.read(*self.spans["manifest.yaml"])

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at an absolute offset of the bundle (thread-safe: pread)."""
        return os.pread(self.file.fileno(), size, offset)

    def chunks(self, member: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[npt.NDArray[Any]]:
        """A member's records as consecutive numpy arrays (digests: shape (k, 32))."""
        offset, size = self.spans[member]
        yield from _chunks(self.file, offset, size, MEMBER_DTYPES[member], chunk_bytes)

    def array(self, member: str) -> npt.NDArray[Any]:
        """A whole member in memory (tools and benchmarks; matching never needs it)."""
        parts = list(self.chunks(member))
        if parts:
            return np.concatenate(parts)
        dtype = MEMBER_DTYPES[member]
        return np.zeros((0, 32) if dtype == np.uint8 else 0, dtype=dtype)

    def close(self) -> None:
        self.file.close()

    def summary(self) -> str:
        m = self.manifest
        expiry = m.expires.isoformat() if m.expires else "never"
        hosts = "none" if m.hosts is None else str(m.hosts)
        return (f"list={m.list_id} version={m.version} entries={m.entries} "
                f"(domain={m.domain_entries} url={m.url_entries}) host-index={hosts} "
                f"hash={m.hash} issued={m.issued.isoformat()} expires={expiry} "
                f"key={self.signer.id}")


def _chunks(f: IO[bytes], offset: int, size: int, dtype: Any,
            chunk_bytes: int) -> Iterator[npt.NDArray[Any]]:
    """Read [offset, offset+size) in whole records; uint8 members come as (k, 32) rows."""
    fd = f.fileno()
    end = offset + size
    rows = np.dtype(dtype) == np.uint8
    while offset < end:
        data = os.pread(fd, min(chunk_bytes, end - offset), offset)
        if not data:
            raise BundleError(getattr(f, "name", "bundle"), "truncated while reading")
        offset += len(data)
        array = np.frombuffer(data, dtype=dtype)
        yield array.reshape(-1, 32) if rows else array


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_bundle(
    out: str | Path,
    *,
    key: PrivateKey,
    list_id: str,
    version: int,
    hash_name: HashName,
    digests: npt.NDArray[np.uint8],
    entries: npt.NDArray[Any],
    refs: bytes,
    categories: Sequence[str],
    hosts: npt.NDArray[np.uint8] | None,
    transparency: Transparency | None = None,
    hmac_key: bytes | None = None,
    issued: datetime | None = None,
    expires: datetime | None = None,
    hmac_id: str | None = None,
) -> Manifest:
    """Sign and write a bundle from prepared arrays (digests pre-sorted, unique).

    The file appears atomically (written beside, then renamed): a reader never sees
    half a bundle. `hmac_id` names the list key when only its id is at hand (a bundle
    re-written from another bundle); `hmac_key`, when given, wins.
    """
    issued = (issued or datetime.now(UTC)).replace(microsecond=0)
    members = {
        "digests.bin": np.ascontiguousarray(digests, dtype=np.uint8).tobytes(),
        "entries.bin": np.ascontiguousarray(entries, dtype=ENTRY_DTYPE).tobytes(),
        "refs.txt": refs,
    }
    if hosts is not None:
        members["hosts.bin"] = np.ascontiguousarray(hosts, dtype=np.uint8).tobytes()
    kinds = entries["kind"] if len(entries) else np.zeros(0, np.uint8)
    url_entries = int(np.count_nonzero(kinds))
    manifest = Manifest(
        format=FORMAT,
        list_id=list_id,
        version=version,
        issued=issued,
        expires=expires,
        hash=hash_name,
        hmac_key_id=hmac_key_id(hmac_key) if hmac_key is not None else hmac_id,
        entries=len(entries),
        domain_entries=len(entries) - url_entries,
        url_entries=url_entries,
        hosts=None if hosts is None else len(hosts),
        categories=list(categories),
        transparency=transparency or Transparency(),
        files={name: FileDigest(size=len(data), sha256=hashlib.sha256(data).hexdigest())
               for name, data in members.items()},
    )
    manifest_bytes = manifest.to_yaml()
    signature = key.sign(SIGNED_PREFIX + manifest_bytes)
    sig_line = f"ed25519 {key.public.id} {base64.b64encode(signature).decode()}\n".encode()
    write_signed_bundle(out, manifest_bytes, sig_line, members, int(issued.timestamp()))
    return manifest


def write_signed_bundle(out: str | Path, manifest: bytes, signature: bytes,
                        members: dict[str, bytes], mtime: int, *, mode: int = 0o644,
                        prefix: str = ".tmp-") -> Path:
    """Write an already signed manifest, its signature lines and the data members (in
    the given order) as a bundle, atomically. Equal inputs give equal bytes, so a node
    that re-creates a bundle's members (from a delta) re-creates the authority's file.

    The temporary file beside `out` is named `prefix`...`.tmp` (an updater's stage
    prefix, so its clean-up after a kill finds it) and gets `mode` once complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=out.parent)
    try:
        with (os.fdopen(fd, "wb") as f,
              tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar):
            _tar_member(tar, "manifest.yaml", manifest, mtime)
            _tar_member(tar, "signature", signature, mtime)
            for name, data in members.items():
                _tar_member(tar, name, data, mtime)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def sort_unique(digests: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.intp], int]:
    """Order that sorts (n, 32) digests bytewise, first occurrence of duplicates kept.

    Returns the selecting index array and how many duplicates were dropped.
    """
    if len(digests) == 0:
        return np.zeros(0, dtype=np.intp), 0
    keys = np.ascontiguousarray(digests).view("S32").ravel()
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return order[keep], int(len(order) - np.count_nonzero(keep))


def pack_entries(
    entries: Iterable[SourceEntry], hasher: Any, progress: bool = False
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[Any], bytes, list[str],
           npt.NDArray[np.uint8], int]:
    """Hash plaintext entries into sorted arrays: (digests, meta, refs, categories, hosts, dups)."""
    from tqdm import tqdm

    digests = bytearray()
    host_digests: set[bytes] = set()
    meta: list[tuple[int, int, int, int]] = []
    ref_blob = bytearray()
    ref_at: dict[str, tuple[int, int]] = {}
    categories: dict[str, int] = {}
    for entry in tqdm(entries, desc="hashing", unit=" entries", disable=not progress,
                      mininterval=0.5):
        digests += hasher(entry.expression)
        if entry.kind == "url":
            host_digests.add(hasher(entry.host + "/"))
        where = ref_at.get(entry.ref)
        if where is None:
            raw = entry.ref.encode()
            where = ref_at[entry.ref] = (len(ref_blob), len(raw))
            ref_blob += raw
        category = categories.setdefault(entry.category, len(categories))
        if category > 255:
            raise SourceError(entry.category, "more than 256 categories in one list")
        meta.append((where[0], where[1], category, KIND_CODES[entry.kind]))
    if len(ref_blob) >= 1 << 32:
        raise SourceError("refs", "references exceed 4 GiB")
    digest_array = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, 32)
    meta_array = np.array(meta, dtype=ENTRY_DTYPE)
    order, dups = sort_unique(digest_array)
    hosts = np.frombuffer(b"".join(sorted(host_digests)), dtype=np.uint8).reshape(-1, 32)
    return (digest_array[order], meta_array[order], bytes(ref_blob), list(categories),
            hosts, dups)


def build_bundle(
    source: str | Path,
    out: str | Path,
    *,
    key: PrivateKey,
    list_id: str,
    version: int,
    hash_name: HashName = "sha256",
    hmac_key: bytes | None = None,
    expires: datetime | None = None,
    host_index: bool = True,
    progress: bool = False,
) -> tuple[Manifest, int]:
    """Build a signed bundle from a YAML/CSV source; returns (manifest, duplicates dropped)."""
    header, entries = read_source(source)
    try:
        transparency = Transparency(**header)
    except (ValidationError, TypeError) as e:
        raise SourceError(source, _first_error(e)) from e
    hasher = make_hasher(hash_name, hmac_key)
    digests, meta, refs, categories, hosts, dups = pack_entries(entries, hasher, progress)
    manifest = write_bundle(
        out, key=key, list_id=list_id, version=version, hash_name=hash_name,
        digests=digests, entries=meta, refs=refs, categories=categories,
        hosts=hosts if host_index else None, transparency=transparency,
        hmac_key=hmac_key, expires=expires,
    )
    return manifest, dups


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "value"
        return f"{where}: {err['msg']}"
    return str(e)


# ---------------------------------------------------------------- reading


def _members(path: Path, fileobj: IO[bytes] | None = None) -> dict[str, tarfile.TarInfo]:
    try:
        if fileobj is not None:
            fileobj.seek(0)
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
            infos = tar.getmembers()
    except FileNotFoundError as e:
        raise BundleError(path, "file not found") from e
    except IsADirectoryError as e:
        raise BundleError(path, "is a directory, not a bundle") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(path, f"not a readable bundle (truncated or not a tar: {e})") from e
    members: dict[str, tarfile.TarInfo] = {}
    for info in infos:
        if info.name in members:
            raise BundleError(path, f"member {info.name} appears twice")
        if not info.isfile():
            raise BundleError(path, f"member {info.name} is not a regular file")
        members[info.name] = info
    if "result.yaml" in members:
        raise BundleError(path, "a delta bundle, not a full bundle: apply it to its base "
                                "with `netfilter list apply`")
    for required in ("manifest.yaml", "signature", "digests.bin", "entries.bin", "refs.txt"):
        if required not in members:
            raise BundleError(path, f"member {required} missing")
    unknown = set(members) - {"manifest.yaml", "signature", *_DATA_MEMBERS}
    if unknown:
        raise BundleError(path, f"unexpected member {sorted(unknown)[0]}")
    return members


def _check_signature(path: Path, sig_text: bytes, message: bytes,
                     trusted: Sequence[PublicKey], prefix: bytes = SIGNED_PREFIX) -> PublicKey:
    by_id = {k.id: k for k in trusted}
    seen: list[str] = []
    for line in sig_text.decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ed25519" or not re.fullmatch(r"[0-9a-f]{16}", parts[1]):
            raise BundleError(path, "signature: malformed line")
        seen.append(parts[1])
        key = by_id.get(parts[1])
        if key is None:
            continue
        try:
            signature = base64.b64decode(parts[2], validate=True)
        except ValueError as e:
            raise BundleError(path, "signature: not base64") from e
        if not key.verify(signature, prefix + message):
            raise BundleError(path, f"signature by key {key.id} does not verify")
        return key
    if not seen:
        raise BundleError(path, "signature: none present")
    trusted_ids = ", ".join(sorted(by_id)) or "none"
    raise BundleError(
        path, f"signed by unknown key {', '.join(seen)} (trusted: {trusted_ids})")


ModelT = TypeVar("ModelT", bound=BaseModel)


def _parse_model(path: Path, data: bytes, model: type[ModelT], what: str) -> ModelT:
    """A signed YAML document as `model`; one line naming the first problem."""
    import yaml

    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise BundleError(path, f"malformed {what}: not YAML") from e
    if not isinstance(raw, dict):
        raise BundleError(path, f"malformed {what}: not a mapping")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise BundleError(path, f"malformed {what}: {_first_error(e)}") from e


def _parse_manifest(path: Path, data: bytes) -> Manifest:
    return _parse_model(path, data, Manifest, "manifest")


class _MemberCheck:
    """Checks one member while it streams past for hashing: order, ranges, counts."""

    def __init__(self, path: Path, name: str, manifest: Manifest, refs_size: int) -> None:
        self.path, self.name, self.manifest, self.refs_size = path, name, manifest, refs_size
        self.problem: str | None = None
        self.previous: bytes | None = None
        self.url_entries = 0

    def feed(self, chunk: npt.NDArray[Any]) -> None:
        if self.problem is not None or not len(chunk):
            return
        if self.name in ("digests.bin", "hosts.bin"):
            keys = np.ascontiguousarray(chunk).view("S32").ravel()
            first = bytes(chunk[0])
            if (self.previous is not None and not first > self.previous) or not bool(
                    np.all(keys[1:] > keys[:-1])):
                self.problem = f"{self.name}: digests not sorted and unique"
            self.previous = bytes(chunk[-1])
        elif self.name == "entries.bin":
            if int(chunk["category"].max()) >= len(self.manifest.categories):
                self.problem = "entries.bin: category index out of range"
            elif int(chunk["kind"].max()) > 1:
                self.problem = "entries.bin: unknown kind"
            elif int((chunk["ref_offset"].astype(np.uint64) + chunk["ref_length"]).max()) > (
                    self.refs_size):
                self.problem = "entries.bin: reference beyond refs.txt"
            self.url_entries += int(np.count_nonzero(chunk["kind"]))


def _verify_data(path: Path, f: IO[bytes], members: dict[str, tarfile.TarInfo],
                 m: Manifest) -> None:
    """Stream every data member once: its SHA-256 against the manifest, then its records."""
    data_members = {n for n in members if n in _DATA_MEMBERS}
    if set(m.files) != data_members:
        raise BundleError(path, "manifest lists other files than the bundle holds")
    checks: dict[str, _MemberCheck] = {}
    for name in sorted(data_members):
        info, expected = members[name], m.files[name]
        if info.size != expected.size:
            raise BundleError(path, f"{name}: size {info.size} != signed size {expected.size}")
        itemsize = RECORD_SIZES[name]
        if info.size % itemsize:
            raise BundleError(path, f"{name}: size not a multiple of {itemsize}")
        check = checks[name] = _MemberCheck(path, name, m, members["refs.txt"].size)
        digest = hashlib.sha256()
        for chunk in _chunks(f, info.offset_data, info.size, MEMBER_DTYPES[name], CHUNK_BYTES):
            digest.update(chunk.data)
            check.feed(chunk)
        if digest.hexdigest() != expected.sha256:
            raise BundleError(path, f"{name}: SHA-256 does not match the signed manifest")
        if check.problem:
            raise BundleError(path, check.problem)
    if members["digests.bin"].size // 32 != m.entries or (
            members["entries.bin"].size // ENTRY_DTYPE.itemsize != m.entries):
        raise BundleError(path, "digests.bin/entries.bin: counts differ from the manifest")
    if m.domain_entries + m.url_entries != m.entries:
        raise BundleError(path, "malformed manifest: domain + url entries != entries")
    hosts = members.get("hosts.bin")
    if (hosts is None) != (m.hosts is None) or (hosts is not None and hosts.size // 32 != m.hosts):
        raise BundleError(path, "hosts.bin: count differs from the manifest")
    if checks["entries.bin"].url_entries != m.url_entries:
        raise BundleError(path, "entries.bin: url entry count differs from the manifest")


def _unlinked_file(beside: Path) -> IO[bytes]:
    """An anonymous file on the bundle's own file system when it is writable there.

    The default temporary directory may be a tmpfs, where a 10M-entry copy would be
    ~560 MB of memory that cannot be reclaimed; beside the bundle it is disk.
    """
    try:
        return tempfile.TemporaryFile(prefix=".netfilter-bundle-", dir=beside)
    except OSError:
        return tempfile.TemporaryFile(prefix="netfilter-bundle-")


def _private_copy(path: Path) -> IO[bytes]:
    """An unlinked copy of the bundle that only this process can reach.

    Verification and matching then read the same bytes, and an operator who
    overwrites the bundle in place (`cp new.nfl old.nfl`) cannot change a list in
    force under a running node.
    """
    try:
        source = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError as e:
        raise BundleError(path, "file not found") from e
    except IsADirectoryError as e:
        raise BundleError(path, "is a directory, not a bundle") from e
    except OSError as e:
        raise BundleError(path, f"cannot read ({e.strerror})") from e
    copy = _unlinked_file(path.parent)
    try:
        with source:
            size = os.fstat(source.fileno()).st_size
            if size == 0:
                raise BundleError(path, "empty file")
            offset = 0
            while offset < size:
                sent = os.sendfile(copy.fileno(), source.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent
    except BaseException:
        copy.close()
        raise
    copy.seek(0)
    return copy


def open_bundle(
    path: str | Path,
    trusted: Sequence[PublicKey],
    *,
    allow_expired: bool = False,
    now: datetime | None = None,
) -> Bundle:
    """Verify a bundle completely; raises BundleError on any fault."""
    path = Path(path)
    if not trusted:
        raise BundleError(path, "no trusted key configured")
    f = _private_copy(path)
    try:
        members = _members(path, f)
        file_size = os.fstat(f.fileno()).st_size
        for info in members.values():
            if info.offset_data + info.size > file_size:
                raise BundleError(path, f"truncated: member {info.name} extends past the end")
        if members["manifest.yaml"].size > MAX_MANIFEST:
            raise BundleError(path, "malformed manifest: larger than 1 MiB")
        if members["signature"].size > MAX_SIGNATURE:
            raise BundleError(path, "signature: larger than 4 KiB")
        manifest_bytes = os.pread(f.fileno(), members["manifest.yaml"].size,
                                  members["manifest.yaml"].offset_data)
        sig_text = os.pread(f.fileno(), members["signature"].size,
                            members["signature"].offset_data)
        signer = _check_signature(path, sig_text, manifest_bytes, trusted)
        manifest = _parse_manifest(path, manifest_bytes)
        _verify_data(path, f, members, manifest)
        if manifest.is_expired(now) and not allow_expired:
            assert manifest.expires is not None
            raise BundleExpired(path, f"expired at {manifest.expires.isoformat()}")
    except BaseException:
        f.close()
        raise
    spans = {name: (info.offset_data, info.size) for name, info in members.items()}
    return Bundle(path, manifest, signer, f, spans)


def read_manifest_unverified(path: str | Path) -> Manifest:
    """The manifest alone, for `list info` without a trusted key: NOT verified."""
    path = Path(path)
    members = _members(path)
    info = members["manifest.yaml"]
    if info.size > MAX_MANIFEST:
        raise BundleError(path, "malformed manifest: larger than 1 MiB")
    with open(path, "rb") as f:
        f.seek(info.offset_data)
        return _parse_manifest(path, f.read(info.size))
