"""Run by test_memory.py in a fresh interpreter: load one bundle, report RSS and times.

    python benchmarks/loadchild.py CONFIG.json   ->  one JSON object on stdout

Config: bundle, pub, warm_bundle (a tiny bundle loaded first, so imports, lazily built
tables and allocator arenas are not counted), mode ("load" or "profile"), urls/hosts
(lists of [item, expected ref or null]), clean_urls (timed), profile_out.

RSS is read from /proc/self/status: VmRSS = RssAnon (heap: Bloom filter, prefix index,
Python objects) + RssFile (file pages mapped into the process: shared libraries only,
since bundles are read with pread and no longer mapped) + RssShmem.

The bundle's data lives in the page cache, outside the process's RSS: `load_lists`
copies the bundle to an unlinked file in the temporary directory and exact look-ups
pread from that copy. `page_cache` reports how much of the copy (and of the original
file) is cached when the checks are done, counted with mincore(2) on a fresh mapping,
which reads nothing and faults nothing in; and on which file system the copy lives
(on tmpfs the copy is shared memory, not reclaimable page cache).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import mmap
import os
import sys
import tempfile
import time
from typing import Any


def status() -> dict[str, int]:
    """Resident set fields of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cached_bytes(fd: int) -> int | None:
    """Bytes of the file behind `fd` in the page cache now (mincore; None if unsupported)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, size, vector) != 0:
            return None
        return sum(byte & 1 for byte in bytes(vector)) * mmap.PAGESIZE
    finally:
        libc.munmap(address, size)


def file_system_of(path: str) -> str:
    """The type of the file system holding `path` (longest mount point in /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def read_and_hash(path: str, buffer: bytearray) -> str:
    """The floor of a verified load: read every byte of the file once and SHA-256 it."""
    digest = hashlib.sha256()
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def verdicts(check: Any, items: list[list[Any]]) -> list[str | None]:
    out = []
    for item, _ in items:
        match = check(item)
        out.append(None if match is None else match.ref)
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    import numpy  # noqa: F401  (imported before the baseline reading)

    import netfilter
    from netfilter.canonical import canonical_parts, host_suffixes
    from netfilter.keys import load_public_key
    from netfilter.listfile import open_bundle
    from netfilter.lists import ListSource, load_lists
    from netfilter.matcher import ListMatcher

    source = ListSource(cfg["bundle"], [cfg["pub"]])
    warm = load_lists([ListSource(cfg["warm_bundle"], [cfg["pub"]])])
    warm.check_url("http://warm.example/a/b?c")
    warm.check_host("warm.example")
    del warm
    buffer = bytearray(1 << 23)
    read_and_hash(cfg["bundle"], buffer)  # page cache warm for both timings below
    result: dict[str, Any] = {"version": netfilter.__version__}

    if cfg["mode"] == "profile":
        import cProfile

        gc.collect()
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        bundle = open_bundle(cfg["bundle"], [load_public_key(cfg["pub"])],
                             allow_expired=True)
        opened = time.perf_counter()
        ListMatcher.from_bundle(bundle)
        profile.disable()
        built = time.perf_counter()
        profile.dump_stats(cfg["profile_out"])
        result.update(open_bundle=opened - start, matcher=built - opened)
        print(json.dumps(result))
        return

    floors = []
    for _ in range(2):
        start = time.perf_counter()
        read_and_hash(cfg["bundle"], buffer)
        floors.append(time.perf_counter() - start)
    gc.collect()
    before = status()
    start = time.perf_counter()
    lists = load_lists([source])
    load_seconds = time.perf_counter() - start
    after_load = status()

    clean = cfg["clean_urls"]
    check_url, sha256 = lists.check_url, hashlib.sha256

    def netfilter_checks() -> None:
        for url in clean:
            check_url(url)

    def hashing_floor() -> None:
        """The work no lookup structure saves: canonicalize, hash `host/` per suffix."""
        for url in clean:
            host, _ = canonical_parts(url)
            for suffix in host_suffixes(host):
                sha256((suffix + "/").encode()).digest()

    best = {"netfilter": float("inf"), "floor": float("inf")}
    for _ in range(3):
        for name, fn in (("netfilter", netfilter_checks), ("floor", hashing_floor)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    result.update(
        floor_seconds=min(floors),
        load_seconds=load_seconds,
        clean_check_seconds=best["netfilter"] / max(1, len(clean)),
        clean_floor_seconds=best["floor"] / max(1, len(clean)),
        url_refs=verdicts(lists.check_url, cfg["urls"]),
        host_refs=verdicts(lists.check_host, cfg["hosts"]),
        host_indexed=[lists.host_has_url_entries(h) for h, _ in cfg["hosts"]],
        entries=len(lists),
    )
    after_checks = status()
    result.update(before=before, after_load=after_load, after_checks=after_checks)
    copy = lists.bundles[0].file
    with open(cfg["bundle"], "rb") as original:
        result["page_cache"] = {
            "copy_cached": cached_bytes(copy.fileno()),
            "copy_size": os.fstat(copy.fileno()).st_size,
            "original_cached": cached_bytes(original.fileno()),
            "tempdir": tempfile.gettempdir(),
            "tempdir_fs": file_system_of(tempfile.gettempdir()),
        }
    result["after_mincore"] = status()  # the probe must not have faulted anything in
    try:  # how much of the heap growth is freed memory the allocator kept (glibc only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        result["after_trim"] = status()
    except (OSError, AttributeError):
        pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
