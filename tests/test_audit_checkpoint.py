"""Checkpoints and cosignatures: golden texts, strict parsing, signing and forgery.

Vectors are copied verbatim from
  github.com/golang/mod  sumdb/tlog/note_test.go (TestFormatTree / TestParseTree)
  github.com/transparency-dev/formats  log/checkpoint_test.go (invalid inputs),
      log/note_test.go (a real sum.golang.org checkpoint and its verifier key),
      note/note_cosigv1_test.go (a type 0x04 verifier key, a cosignature's timestamp)
  github.com/C2SP/C2SP  tlog-checkpoint.md, tlog-cosignature.md (example checkpoint,
      example cosignature line and its time)
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from netfilter.audit import checkpoint, merkle
from netfilter.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    CosignatureSigner,
    CosignatureVerifier,
    cosignature_timestamp,
    new_cosignature_verifier,
    open_checkpoint,
    sign_checkpoint,
)
from netfilter.audit.note import (
    InvalidSignatureError,
    Signature,
    Signer,
    UnverifiedNoteError,
    Verifier,
    new_verifier,
    open_note,
    sign,
)
from netfilter.errors import NetfilterError
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key

GO_TREE = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"
C2SP_CHECKPOINT = ("example.com/behind-the-sofa\n20852163\n"
                   "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_CHECKPOINT = (
    "go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n\n"
    "— sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYf"
    "vimWEPWL+o3GeoWwOoAw=\n"
).encode()
REMORA_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
ROOT = merkle.leaf_hash(b"hello world")


@pytest.fixture(scope="module")
def log_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrivateKey, Verifier]:
    key_path, pub_path = generate_keypair(tmp_path_factory.mktemp("cp") / "log")
    verifier = Verifier.from_public_key("audit.example/log", load_public_key(pub_path))
    return load_private_key(key_path), verifier


# ------------------------------------------------------------------------ text format
def test_go_tree_golden_text() -> None:
    cp = Checkpoint("go.sum database tree", 123456789012, ROOT)
    assert cp.to_text() == GO_TREE
    assert Checkpoint.parse(GO_TREE) == cp


def test_c2sp_example_round_trips() -> None:
    cp = Checkpoint.parse(C2SP_CHECKPOINT)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.to_text() == C2SP_CHECKPOINT


@pytest.mark.parametrize(("text", "extensions"), [
    (GO_TREE + "JOE\n", ("JOE",)),
    (GO_TREE + "JOE\n" * 1000, ("JOE",) * 1000),
    (GO_TREE + "time 1679315147\nsome extension: with spaces\n",
     ("time 1679315147", "some extension: with spaces")),
])
def test_extension_lines(text: str, extensions: tuple[str, ...]) -> None:
    cp = Checkpoint.parse(text)
    assert cp.extensions == extensions and cp.to_text() == text


@pytest.mark.parametrize("size", [0, 1, 9, 10, 2**63, 2**64 - 1])
def test_sizes(size: int) -> None:
    text = f"log\n{size}\n{base64.b64encode(ROOT).decode()}\n"
    assert Checkpoint.parse(text).size == size


R64 = "TszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0="


@pytest.mark.parametrize("text", [
    # golang.org/x/mod sumdb/tlog/note_test.go badTrees
    "go.sum database tree\n0xabcdef\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
    "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBTOOBIG=\n",
    GO_TREE + "JOE",  # not newline-terminated (Go's tree parser ignored this junk)
    # transparency-dev/formats log/checkpoint_test.go invalid cases
    "Head\n9944\n",
    "\n9944\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n",
    "Log\n123\nYmFuYW5hcw==",
    "Log\nbananas\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n",
    "Log\n-34\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n",
    "Log\n3438945738945739845734895735\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n",
    "Log\n123\nThisIsn'tBase64\n",
    "Log\n123\nYmFuYW5hcw==\n",  # valid base64, but not 32 bytes
    # non-canonical sizes
    f"log\n0123\n{R64}\n", f"log\n00\n{R64}\n", f"log\n+5\n{R64}\n", f"log\n 5\n{R64}\n",
    f"log\n5 \n{R64}\n", f"log\n\u0663\n{R64}\n", f"log\n{2**64}\n{R64}\n", f"log\n\n{R64}\n",
    f"log\n1_000\n{R64}\n",
    # roots
    "log\n5\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0\n",  # no padding
    "log\n5\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb1=\n",  # non-canonical last char
    "log\n5\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0= \n",
    f"log\n5\n{base64.b64encode(bytes(33)).decode()}\n",
    f"log\n5\n{base64.b64encode(bytes(31)).decode()}\n",
    # structure and characters
    "", "\n", "log\n", f"log\n5\n{R64}", f"log\n5\n{R64}\n\n", f"log\n5\n{R64}\nok\n\n",
    f"lo\rg\n5\n{R64}\n", f"lo\x00g\n5\n{R64}\n", f"log\n5\n{R64}\next\x7f\n",
    f"log\r\n5\r\n{R64}\r\n",
    f"log\n5\n{R64}\n" + "x" * 70000 + "\n",
])
def test_strict_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="checkpoint:"):
        Checkpoint.parse(text)


@pytest.mark.parametrize("args", [
    ("", 1, ROOT), ("a\nb", 1, ROOT), ("log", -1, ROOT), ("log", 2**64, ROOT),
    ("log", 1, ROOT[:31]), ("log", 1, ROOT, ("",)), ("log", 1, ROOT, ("a\nb",)),
])
def test_constructor_validates(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match="checkpoint:"):
        Checkpoint(*args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ signatures
def test_real_sumdb_checkpoint_opens() -> None:
    verifier = new_verifier(SUMDB_VKEY)
    cp = open_checkpoint(SUMDB_CHECKPOINT, verifier, origin="go.sum database tree")
    assert cp == Checkpoint("go.sum database tree", 6476701,
                            base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="))
    with pytest.raises(CheckpointError, match="not 'sum.golang.org'"):
        open_checkpoint(SUMDB_CHECKPOINT, verifier, origin="sum.golang.org")
    with pytest.raises(InvalidSignatureError):
        open_checkpoint(SUMDB_CHECKPOINT.replace(b"6476701", b"6476702"), verifier)


def test_sign_and_open_with_a_netfilter_key(log_key: tuple[PrivateKey, Verifier]) -> None:
    key, verifier = log_key
    signer = Signer.from_private_key("audit.example/log", key)
    store = merkle.MemoryHashStore(merkle.leaf_hash(b"event %d" % i) for i in range(37))
    cp = Checkpoint("audit.example/log", 37, merkle.tree_root(37, store))
    msg = sign_checkpoint(cp, signer)
    assert msg.startswith(cp.to_text().encode() + b"\n\xe2\x80\x94 audit.example/log ")
    opened = open_checkpoint(msg, verifier, origin="audit.example/log")
    assert opened == cp
    proof = merkle.inclusion_proof(11, opened.size, store)
    merkle.verify_inclusion(11, opened.size, merkle.leaf_hash(b"event 11"), proof, opened.root)


def test_forged_checkpoints_fail(log_key: tuple[PrivateKey, Verifier]) -> None:
    key, verifier = log_key
    cp = Checkpoint("audit.example/log", 5, ROOT)
    msg = sign_checkpoint(cp, Signer.from_private_key("audit.example/log", key))
    with pytest.raises(InvalidSignatureError):
        open_checkpoint(msg.replace(b"\n5\n", b"\n6\n"), verifier)
    other = Signer("audit.example/log", PrivateKey(Ed25519PrivateKey.generate()))
    with pytest.raises(UnverifiedNoteError):  # right name, another key: not trusted
        open_checkpoint(sign_checkpoint(cp, other), verifier)

    class Forger:  # another key claiming the trusted key's name and key ID
        name, key_hash = verifier.name, verifier.key_hash

        def sign(self, msg: bytes) -> bytes:
            return other.sign(msg)

    with pytest.raises(InvalidSignatureError):
        open_checkpoint(sign_checkpoint(cp, Forger()), verifier)
    signed_junk = sign("audit.example/log\n05\n" + base64.b64encode(ROOT).decode() + "\n",
                       Signer.from_private_key("audit.example/log", key))
    with pytest.raises(CheckpointError, match="canonical") as info:
        open_checkpoint(signed_junk, verifier)
    assert isinstance(info.value, NetfilterError)


# ---------------------------------------------------------------------- cosignatures
def test_cosignature_verifier_key_uses_type_0x04() -> None:
    v = new_cosignature_verifier(REMORA_VKEY)
    assert v.name == "remora.n621.de" and v.key_hash == 0xDA77ADE7 and v.vkey == REMORA_VKEY
    with pytest.raises(ValueError, match="checkpoint:"):  # a type 0x01 key is no cosigner key
        new_cosignature_verifier(SUMDB_VKEY)
    with pytest.raises(ValueError, match="hash does not match"):
        new_cosignature_verifier(REMORA_VKEY.replace("da77ade7", "da77ade8"))
    with pytest.raises(ValueError, match="checkpoint:"):
        new_cosignature_verifier("remora.n621.de+da77ade7+BOvN63jn")


@pytest.mark.parametrize(("line", "time"), [
    # c2sp.org/tlog-cosignature example line, whose time is that of the spec's message
    ("jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe"
     "+mbIUBkBIfZ+qnA==", 1679315147),
    # transparency-dev/formats TestCoSigV1Timestamp "works"
    ("ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcF"
     "iEBYJXORmnFBOBA==", 1727964367),
])
def test_cosignature_timestamps(line: str, time: int) -> None:
    assert cosignature_timestamp(Signature("w", 0, line)) == time


def test_cosignature_timestamp_rejects_other_signatures() -> None:
    plain = ("eQjRQm6eSKzFoiYalgwCPXu2y3ijtg68is9M46JKxuZB+dRfTmeQeDBoXnvxZx2ugnkyV+MUMLXpWs1hP"
             "b/W/4xkNQY=")
    for b64 in [plain, "5%/$!\n 2"]:
        with pytest.raises(ValueError, match="checkpoint:"):
            cosignature_timestamp(Signature("w", 0, b64))


def test_witness_cosigns_a_signed_checkpoint(log_key: tuple[PrivateKey, Verifier]) -> None:
    key, log_verifier = log_key
    cp = Checkpoint("audit.example/log", 20852163, ROOT)
    msg = sign_checkpoint(cp, Signer.from_private_key("audit.example/log", key))
    witness_key = PrivateKey(Ed25519PrivateKey.generate())
    witness = CosignatureSigner("witness.example/w1", witness_key, clock=lambda: 1679315147)
    w_verifier = CosignatureVerifier.from_public_key("witness.example/w1", witness_key.public)
    assert witness.verifier() == w_verifier
    assert new_cosignature_verifier(w_verifier.vkey) == w_verifier
    assert "PRIVATE" not in repr(witness)

    cosigned = sign(open_note(msg, [log_verifier]), witness)
    n = open_note(cosigned, [log_verifier, w_verifier])
    assert [s.name for s in n.sigs] == ["audit.example/log", "witness.example/w1"]
    assert cosignature_timestamp(n.sigs[1]) == 1679315147
    assert open_checkpoint(cosigned, log_verifier) == cp  # witnesses do not disturb the log

    # The signed message is c2sp.org/tlog-cosignature's, byte for byte.
    raw = base64.b64decode(n.sigs[1].base64)
    assert raw[:4] == w_verifier.key_hash.to_bytes(4, "big")
    assert raw[4:12] == (1679315147).to_bytes(8, "big")
    message = b"cosignature/v1\ntime 1679315147\n" + cp.to_text().encode()
    assert witness_key.public.verify(raw[12:], message)

    # A plain Ed25519 verifier for the same key does not accept a cosignature.
    with pytest.raises(UnverifiedNoteError):
        open_note(cosigned.replace(msg[len(cp.to_text()) + 1:], b""),
                  [Verifier.from_public_key("witness.example/w1", witness_key.public)])
    # Changing the claimed time breaks the signature.
    forged = bytearray(raw)
    forged[11] ^= 1
    line = "— witness.example/w1 " + base64.b64encode(bytes(forged)).decode() + "\n"
    with pytest.raises(InvalidSignatureError):
        open_note(msg + line.encode(), [log_verifier, w_verifier])


def test_cosigner_signs_only_checkpoints_at_valid_times() -> None:
    key = PrivateKey(Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="only a checkpoint"):
        sign("not a checkpoint\n", CosignatureSigner("w", key))
    late = CosignatureSigner("w", key, clock=lambda: 2**63)
    with pytest.raises(ValueError, match="out of range"):
        late.sign(GO_TREE.encode())
    v = late.verifier()
    sig = CosignatureSigner("w", key, clock=lambda: 5).sign(GO_TREE.encode())
    assert v.verify(GO_TREE.encode(), sig)
    assert not v.verify(b"not a checkpoint\n", sig)
    assert not v.verify(GO_TREE.encode(), sig[:-1])
    assert not v.verify(GO_TREE.encode(), b"\xff" * 8 + sig[8:])  # time >= 2**63


def test_exports() -> None:
    for name in checkpoint.__all__:
        assert hasattr(checkpoint, name), name
    assert issubclass(CheckpointError, NetfilterError)
