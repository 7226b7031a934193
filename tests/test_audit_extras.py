"""Reports, the authority export, tlog-tiles and witness cosignatures."""

from __future__ import annotations

import json
import struct
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from netfilter.audit.checkpoint import CosignatureSigner, open_checkpoint
from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import leaf_hash, root
from netfilter.audit.note import Note, Signer, Verifier, open_note, sign
from netfilter.audit.report import authority_export, build_report, render
from netfilter.audit.store import AuditStore
from netfilter.audit.tiles import tile_path, write_tiles
from netfilter.audit.witness import add_cosignatures, with_cosignatures
from netfilter.errors import NetfilterError
from netfilter.events import Event
from netfilter.keys import generate_keypair, load_private_key
from netfilter.web.tiles import serve_tiles

ORIGIN = "gw-test.example"


def _event(kind: str, day: str, **fields: object) -> Event:
    return Event(kind, ORIGIN, time=f"{day}T10:00:00.000+00:00", **fields)  # type: ignore[arg-type]


@pytest.fixture
def filled(tmp_path: Path) -> tuple[AuditStore, AuditLog]:
    store = AuditStore(tmp_path / "audit.sqlite")
    log = AuditLog(store, origin=ORIGIN, key=load_node_key(tmp_path / "node.key"),
                   checkpoint_interval=3600)
    log.record(_event("list-loaded", "2026-11-01", list="demo", version=3,
                      detail="entries=1234 key=abcd"))
    for day, ref, category, frontend, client in (
            ("2026-11-01", "R-1", "csam", "dns", "p:aaaa"),
            ("2026-11-01", "R-1", "csam", "proxy", "p:bbbb"),
            ("2026-11-02", "R-2", "other", "dns", "p:aaaa"),
            ("2026-11-03", "R-1", "csam", "dns", "p:cccc")):
        log.record(_event("block", day, list="demo", version=3, ref=ref, category=category,
                          frontend=frontend, action="block", client=client, detail="A"))
    log.record(_event("override", "2026-11-02", list="demo", ref="R-9", action="allow",
                      detail="exception=APPEAL-1", client="p:dddd"))
    log.flush()
    log.close()
    return store, log


def test_report_counts_and_formats(filled: tuple[AuditStore, AuditLog]) -> None:
    store, _ = filled
    report = build_report(store, "2026-11-01", "2026-11-02")
    assert sum(report.blocks.values()) == 3
    assert report.per("ref") == {"R-1": 2, "R-2": 1}
    assert report.per("frontend") == {"dns": 2, "proxy": 1}
    assert report.lists == {"demo v3": 1234}
    assert sum(report.overrides.values()) == 1
    as_json = json.loads(render(report, "json"))
    assert as_json["blocks_total"] == 3 and as_json["period"] == {"from": "2026-11-01",
                                                                  "to": "2026-11-02"}
    csv_lines = render(report, "csv").strip().splitlines()
    assert csv_lines[0] == "day,list,ref,category,frontend,action,blocks" and len(csv_lines) == 4
    text = render(report, "text")
    assert "R-1: 2" in text and "demo v3: 1234" in text
    page = render(report, "html")
    assert page.startswith("<!doctype html>") and '<html lang="en">' in page
    assert page.count("<svg") == 2 and "<script" not in page
    assert "src=" not in page and "href=" not in page  # no external resources
    for output in (text, page, render(report, "csv"), render(report, "json")):
        assert "p:aaaa" not in output and "client" not in output  # never per person


def test_authority_export_is_signed_and_has_no_personal_data(
        filled: tuple[AuditStore, AuditLog], tmp_path: Path) -> None:
    store, _ = filled
    key = load_private_key(tmp_path / "node.key")
    exported = authority_export(store, "2026-11-01", "2026-11-30",
                                Signer.from_private_key(ORIGIN, key))
    note = open_note(exported, [Verifier.from_public_key(ORIGIN, key.public)])
    records = [json.loads(line) for line in note.text.splitlines()[2:]]
    assert records == [
        {"list": "demo", "ref": "R-1", "hits": 3, "first": "2026-11-01T10:00:00.000+00:00",
         "last": "2026-11-03T10:00:00.000+00:00", "frontends": ["dns", "proxy"]},
        {"list": "demo", "ref": "R-2", "hits": 1, "first": "2026-11-02T10:00:00.000+00:00",
         "last": "2026-11-02T10:00:00.000+00:00", "frontends": ["dns"]},
    ]
    assert "p:" not in note.text
    tampered = exported.replace(b'"hits":3', b'"hits":1')
    with pytest.raises(NetfilterError):
        open_note(tampered, [Verifier.from_public_key(ORIGIN, key.public)])


@pytest.mark.parametrize(("index", "width", "path"), [
    (0, 256, "tile/0/000"), (5, 256, "tile/0/005"), (1000, 256, "tile/0/x001/000"),
    (1234067, 256, "tile/0/x001/x234/067"), (3, 17, "tile/0/003.p/17")])
def test_tile_paths(index: int, width: int, path: str) -> None:
    assert tile_path(0, index, width) == path


def test_tiles_rebuild_the_signed_tree(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    log = AuditLog(store, origin=ORIGIN, key=load_node_key(tmp_path / "node.key"),
                   checkpoint_interval=3600, batch_size=97)
    for i in range(600):  # two full level-0 tiles and a partial one
        log.record(_event("block", "2026-11-05", list="demo", ref=f"R-{i}", action="block"))
    log.close()
    out = tmp_path / "public"
    assert write_tiles(store, out) == 600
    key = load_private_key(tmp_path / "node.key")
    checkpoint = open_checkpoint((out / "checkpoint").read_bytes(),
                                 Verifier.from_public_key(ORIGIN, key.public))
    level0 = [(out / tile_path(0, t, w)).read_bytes() for t, w in ((0, 256), (1, 256), (2, 88))]
    hashes = [blob[i : i + 32] for blob in level0 for i in range(0, len(blob), 32)]
    assert root(hashes) == checkpoint.root
    level1 = (out / tile_path(1, 0, 2)).read_bytes()
    assert level1 == root(hashes[:256]) + root(hashes[256:512])
    bundle = (out / tile_path("entries", 2, 88)).read_bytes()
    entries, at = [], 0
    while at < len(bundle):
        (length,) = struct.unpack_from("!H", bundle, at)
        entries.append(bundle[at + 2 : at + 2 + length])
        at += 2 + length
    assert [leaf_hash(e) for e in entries] == hashes[512:]

    server = serve_tiles(out, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/checkpoint", timeout=5) as response:
            assert response.read() == (out / "checkpoint").read_bytes()
        with pytest.raises(urllib.error.HTTPError) as listing:
            urllib.request.urlopen(f"{base}/tile/", timeout=5)
        assert listing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_witness_cosignatures(filled: tuple[AuditStore, AuditLog], tmp_path: Path) -> None:
    store, _ = filled
    latest = store.latest_checkpoint()
    assert latest is not None
    witness = CosignatureSigner("witness.example",
                                load_private_key(generate_keypair(tmp_path / "w")[0]))
    text = latest.note.split(b"\n\n")[0].decode() + "\n"
    line = sign(Note(text), witness).decode().split("\n\n")[1]
    assert add_cosignatures(store, latest, line, [witness.verifier().vkey]) == [
        "witness.example"]
    served = with_cosignatures(store, latest)
    assert served.endswith(line.encode()) and served.startswith(latest.note)
    other = CosignatureSigner("witness.example",
                              load_private_key(generate_keypair(tmp_path / "x")[0]))
    with pytest.raises(NetfilterError, match="does not verify"):
        add_cosignatures(store, latest, line, [other.verifier().vkey])


def test_tiles_checkpoint_carries_stored_cosignatures(tmp_path: Path) -> None:
    """A witness's lines stored after the tiles were written (`audit cosign` in another
    process) reach the tiles' checkpoint file at the keeper's next interval, so an
    auditor fetching the tiles sees them; the tiles themselves are unchanged."""
    store = AuditStore(tmp_path / "audit.sqlite")
    tiles = tmp_path / "tiles"
    log = AuditLog(store, origin=ORIGIN, key=load_node_key(tmp_path / "node.key"),
                   checkpoint_interval=3600, tiles=tiles)
    try:
        log.record(_event("list-loaded", "2026-11-01", list="demo", version=3))
        log.flush()
        latest = log.checkpoint()
        assert latest is not None
        assert (tiles / "checkpoint").read_bytes() == latest.note
        witness = CosignatureSigner("witness.example",
                                    load_private_key(generate_keypair(tmp_path / "w")[0]))
        text = latest.note.split(b"\n\n")[0].decode() + "\n"
        line = sign(Note(text), witness).decode().split("\n\n")[1]
        add_cosignatures(store, latest, line, [witness.verifier().vkey])
        assert (tiles / "checkpoint").read_bytes() == latest.note  # not before the interval
        tile_files = {p: p.read_bytes() for p in tiles.rglob("*") if p.is_file()
                      and p.name != "checkpoint"}
        assert log.checkpoint() == latest  # the interval: nothing new to sign
        published = (tiles / "checkpoint").read_bytes()
        assert published == with_cosignatures(store, latest) and published.endswith(
            line.encode())
        open_note(published, [witness.verifier()])  # the witness's line verifies
        assert {p: p.read_bytes() for p in tile_files} == tile_files
    finally:
        log.close()
