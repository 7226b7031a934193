from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from netfilter.audit.log import load_node_key
from netfilter.errors import KeyFileError
from netfilter.keys import generate_keypair, key_id, load_private_key, load_public_key


def test_generate_writes_private_0600_and_public(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "sub" / "node")
    assert key_path.name == "node.key" and pub_path.name == "node.pub"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_path.read_bytes()
    assert b"PUBLIC KEY" in pub_path.read_bytes()
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert private.public.raw == public.raw
    signature = private.sign(b"message")
    assert public.verify(signature, b"message")
    assert not public.verify(signature, b"messagE")
    assert not public.verify(b"\0" * 64, b"message")
    assert public.id == key_id(public.raw) and len(public.id) == 16
    assert "PrivateKey(id=" in repr(private) and "BEGIN" not in repr(private)


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k")
    with pytest.raises(KeyFileError, match="exists already"):
        generate_keypair(tmp_path / "k")


@pytest.mark.parametrize(
    ("content", "loader", "reason"),
    [
        (None, load_private_key, "not found"),
        (b"garbage", load_private_key, "not a PEM private key"),
        (None, load_public_key, "not found"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", load_public_key,
         "not a PEM public key"),
    ],
)
def test_bad_key_files_name_file_and_reason(tmp_path: Path, content: bytes | None,
                                            loader: object, reason: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=reason) as info:
        loader(path)  # type: ignore[operator]
    assert str(path) in str(info.value)


def test_other_key_types_are_refused(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    private = tmp_path / "x.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "x.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        load_private_key(private)
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(public)


def _node_key_id(path: str, barrier: Any, out: Any) -> None:
    barrier.wait(timeout=20)
    try:
        out.put(load_node_key(Path(path)).public.id)
    except Exception as e:  # the test reports what a loser saw
        out.put(f"error: {e}")


def test_processes_starting_together_share_one_node_key(tmp_path: Path) -> None:
    """DNS workers, Squid helper children and two serves on one state directory may all
    start on a fresh node at once: each must load the one key made, none a half-written
    file or an 'exists already' error."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = tmp_path / str(round_) / "node.key"
        barrier, out = ctx.Barrier(6), ctx.Queue()
        workers = [ctx.Process(target=_node_key_id, args=(str(path), barrier, out))
                   for _ in range(6)]
        for worker in workers:
            worker.start()
        seen = {out.get(timeout=30) for _ in workers}
        for worker in workers:
            worker.join(timeout=30)
        assert seen == {load_private_key(path).public.id}, seen
        assert load_public_key(path.with_suffix(".pub")).raw == load_private_key(path).public.raw
        assert sorted(p.name for p in path.parent.iterdir()) == ["node.key", "node.pub"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
