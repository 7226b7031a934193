from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
