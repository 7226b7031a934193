"""Signed notes: the Go package's published examples, C2SP's, netfilter keys, junk.

Vectors are copied verbatim from
  github.com/golang/mod  sumdb/note/note_test.go, sumdb/note/example_test.go, note.go
                         (PeterNeumann keys and note; EnochRoot, the key GenerateKey makes
                         from an all-zero random source, as ExampleSign_add_signatures does)
  github.com/C2SP/C2SP   signed-note.md ("Example": example.com/foo)
  github.com/transparency-dev/formats  log/note_test.go (a sum.golang.org tree note
                         with signatures by three more keys)
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from netfilter.audit import note
from netfilter.audit.note import (
    InvalidSignatureError,
    MalformedNoteError,
    Note,
    NoteError,
    Signature,
    Signer,
    UnknownVerifierError,
    UnverifiedNoteError,
    Verifier,
    VerifierList,
    key_hash,
    new_signer,
    new_verifier,
    open_note,
    sign,
)
from netfilter.errors import NetfilterError
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key

PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = ("If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n")
PETER_SIG = ("— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKv"
             "qfqdngotpRZb6KE6RyyBwJnAM=\n")
ENOCH_SIG = ("— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01o"
             "OTGwnWLox33WWd1RvMc+QQ=\n")
PETER = Signature("PeterNeumann", 0xC74F20A3, "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGU"
                  "gYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=")
ENOCH = Signature("EnochRoot", 0xAF0CFE78, "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp"
                  "+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=")
SIGNED = (TEXT + "\n" + PETER_SIG).encode()

C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = ("This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq"
             "6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n").encode()

SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = """go.sum database tree
6476701
mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=

— sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfvimWEPWL+o3GeoWwOoAw=
— monkeys 202ffh9ve46Mqbhuyb4wnC2Pwdan5EsXQym/tF1ggXJqhjGosU4T5intH4iKMRgDLxrnXuIjRaU2NbvAnaepM6Y+8ww=
— bananas z2OfE+2bbsBZ7NLgfuslc0v7NFW2QyexJ7fhePpoL2N/P7N/COd5S+JNHbQEAlYzz2C5sg0E+x/MggS1mDR6t3/9rQw=
— witness 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+UpDbGgCdcpR8SVSoqAU=
""".encode()  # noqa: E501
SUMDB_OTHER_VKEYS = [
    "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT",
    "bananas+cf639f13+AaPjhFnPCQnid/Ql32KWhmh+uk72FVRfK+2DLmO3BI3M",
    "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN",
]


def enoch_signer() -> Signer:
    """Go's GenerateKey(zeroReader, "EnochRoot"): the all-zero Ed25519 seed."""
    return Signer("EnochRoot", PrivateKey(Ed25519PrivateKey.from_private_bytes(bytes(32))))


@pytest.fixture(scope="module")
def netfilter_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("note") / "log")


# ------------------------------------------------------------------ Go's examples
def test_go_example_sign_is_byte_exact() -> None:
    assert sign(TEXT, new_signer(PETER_SKEY)) == SIGNED


def test_go_example_open() -> None:
    n = open_note(SIGNED, [new_verifier(PETER_VKEY)])
    assert n == Note(TEXT, (PETER,), ())
    assert (n.sigs[0].name, f"{n.sigs[0].key_hash:08x}") == ("PeterNeumann", "c74f20a3")


def test_go_example_add_signatures() -> None:
    n = open_note(SIGNED, [new_verifier(PETER_VKEY)])
    assert enoch_signer().verifier().vkey == ENOCH_VKEY
    assert sign(n, enoch_signer()) == (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()


def test_keys_round_trip_and_hash() -> None:
    peter = new_verifier(PETER_VKEY)
    assert peter.vkey == PETER_VKEY and peter.name == "PeterNeumann"
    assert peter.key_hash == 0xC74F20A3 == key_hash("PeterNeumann", b"\x01" + peter.public_key)
    signer = new_signer(PETER_SKEY)
    assert signer.verifier() == peter and signer.key_hash == peter.key_hash
    assert "PRIVATE" not in repr(signer) and "AYEK" not in repr(signer)


def _mangled(key: str) -> list[str]:
    """note_test.go: every proper substring, and every one-byte increment."""
    out = [key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)
           if (i, j) != (0, len(key))]
    out += [key[:i] + chr(ord(key[i]) + 1) + key[i + 1:] for i in range(len(key))]
    return out


def test_new_verifier_rejects_manglings() -> None:
    bad = [*_mangled(PETER_VKEY),
           # wrong length key, with adjusted key hash
           "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
           # unknown algorithm, with adjusted key hash
           "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
           "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"]
    for key in bad:
        with pytest.raises(ValueError, match="note:"):
            new_verifier(key)


def test_new_signer_rejects_manglings_without_echoing_the_key() -> None:
    for key in _mangled(PETER_SKEY):
        with pytest.raises(ValueError, match="note:") as info:
            new_signer(key)
        assert "AYEKFALV" not in str(info.value)


def test_sign_replaces_a_signature_by_the_same_key() -> None:
    old = Note(TEXT, (Signature("PeterNeumann", 0xC74F20A3, "BADSIGN="),))
    assert sign(old, new_signer(PETER_SKEY)) == SIGNED


def test_sign_rejects_bad_inputs() -> None:
    peter = new_signer(PETER_SKEY)
    with pytest.raises(ValueError, match="newline"):
        sign("abc", peter)
    with pytest.raises(ValueError, match="malformed"):
        sign(Note(TEXT, (Signature("a+b", 0, "ABCD"),)), peter)
    with pytest.raises(ValueError, match="kept signature"):
        sign(Note(TEXT, (Signature("PeterNeumann", 0xC74F20A3, "BADHASH="),)), enoch_signer())
    with pytest.raises(ValueError, match="key ID"):  # AAAAAAA= does not start with c74f20a3
        sign(Note(TEXT, (Signature("PeterNeumann", 0xC74F20A3, "AAAAAAA="),)), enoch_signer())
    with pytest.raises(ValueError, match="control"):
        sign("tab\there\n", peter)
    with pytest.raises(ValueError, match="UTF-8"):
        sign("\ud800\n", peter)
    with pytest.raises(ValueError, match="at least one"):
        sign(TEXT)

    class BadName:
        name, key_hash = "bad name", 1

        def sign(self, msg: bytes) -> bytes:
            return b"x"

    with pytest.raises(ValueError, match="invalid signer name"):
        sign(TEXT, BadName())

    class Failing(BadName):
        name = "failing"

        def sign(self, msg: bytes) -> bytes:
            raise RuntimeError("surprise!")

    with pytest.raises(RuntimeError, match="surprise!"):
        sign(TEXT, Failing())


def test_verifier_list() -> None:
    peter, enoch = new_verifier(PETER_VKEY), new_verifier(ENOCH_VKEY)
    known = VerifierList([peter, enoch, enoch])  # the same key twice is not ambiguous
    assert known.verifier("PeterNeumann", 0xC74F20A3) is peter
    assert known.verifier("EnochRoot", 0xAF0CFE78) is enoch
    for name, hash_ in [("PeterNeumann", 0xC74F20A4), ("PeterNeuman", 0xC74F20A3)]:
        with pytest.raises(UnknownVerifierError) as info:
            known.verifier(name, hash_)
        assert (info.value.name, info.value.key_hash) == (name, hash_)
        assert f"unknown key {name}+{hash_:08x}" in str(info.value)

    class Impostor:
        name, key_hash = "EnochRoot", 0xAF0CFE78

        def verify(self, msg: bytes, sig: bytes) -> bool:
            return True

    with pytest.raises(ValueError, match="ambiguous key EnochRoot\\+af0cfe78"):
        open_note((TEXT + "\n" + ENOCH_SIG).encode(), [enoch, Impostor(), peter])
    open_note(SIGNED, [enoch, Impostor(), peter])  # unused ambiguity is no error


def test_open_one_verified_one_not() -> None:
    msg = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    assert open_note(msg, [new_verifier(PETER_VKEY)]) == Note(TEXT, (PETER,), (ENOCH,))
    both = open_note(msg, VerifierList([new_verifier(PETER_VKEY), new_verifier(ENOCH_VKEY)]))
    assert both == Note(TEXT, (PETER, ENOCH), ())
    with pytest.raises(UnverifiedNoteError) as info:
        open_note(msg, [])
    assert info.value.note == Note(TEXT, (), (PETER, ENOCH))
    assert "note has no verifiable signatures" in str(info.value)


def test_open_counts_repeated_lines_once() -> None:
    enoch_abcd = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    msg = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd
    n = open_note(msg.encode(), [new_verifier(PETER_VKEY)])
    assert n.sigs == (PETER,)
    assert n.unverified_sigs == (
        ENOCH, Signature("EnochRoot", 0xAF0CFE78, enoch_abcd[len("— EnochRoot "):-1]))


def test_open_rejects_an_invalid_signature_by_a_known_key() -> None:
    bad = (TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]).encode()
    with pytest.raises(InvalidSignatureError) as info:
        open_note(bad, [new_verifier(PETER_VKEY)])
    assert (info.value.name, info.value.key_hash) == ("PeterNeumann", 0xC74F20A3)
    assert "invalid signature for key PeterNeumann+c74f20a3" in str(info.value)
    # A second, bad signature by the known key fails the note even after a good one.
    with pytest.raises(InvalidSignatureError):
        open_note(SIGNED + bad[len(TEXT) + 1:], [new_verifier(PETER_VKEY)])


@pytest.mark.parametrize("msg", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqf"
    "qdngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    TEXT + "\n" + PETER_SIG * 101,
    # and more junk
    "",
    "\n\n",
    TEXT + "\n" + PETER_SIG + "\n",
    TEXT + "\n" + PETER_SIG + "junk",
    TEXT.replace("\n", "\r\n") + "\r\n" + PETER_SIG,
    "tab\t\n\n" + PETER_SIG,
    TEXT + "\n" + PETER_SIG.replace("— ", "-- "),
    TEXT + "\n" + PETER_SIG.replace("— ", "—"),
    TEXT + "\n" + PETER_SIG.replace("=\n", "\n"),
    TEXT + "\n" + PETER_SIG.replace("=\n", "==\n"),
    TEXT + "\n" + PETER_SIG.replace("=\n", "= \n"),
    TEXT + "\n" + "— PeterNeumann\n",
    TEXT + "\n" + "— PeterNeumann \n",
    TEXT + "\n" + "— PeterNeumann AAAA\n",  # 3 bytes: no room for a key ID and signature
    TEXT + "\n" + "—  x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvq\n",
    TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "Peter+Neumann"),
])
def test_open_rejects_malformed_notes(msg: str) -> None:
    with pytest.raises(MalformedNoteError, match="malformed note"):
        open_note(msg.encode(), [new_verifier(PETER_VKEY)])
    with pytest.raises(MalformedNoteError):
        open_note(msg.encode(), [])


@pytest.mark.parametrize("msg", [b"\xff" + SIGNED, SIGNED[:-3] + b"\xc0\x80\n",
                                 b"\xed\xa0\x80\n\n" + PETER_SIG.encode()])
def test_open_rejects_invalid_utf8(msg: bytes) -> None:
    with pytest.raises(MalformedNoteError, match="UTF-8"):
        open_note(msg, [new_verifier(PETER_VKEY)])


def test_text_may_hold_blank_lines_and_unicode() -> None:
    signer = enoch_signer()
    for text in ["\n", "a\n\nb\n", "a\n\n\n", "Ognuno sta solo sul cuor della terra\n\ned è"
                 " subito sera.\n", "— looks like a signature line\n\n— x y\n"]:
        assert open_note(sign(text, signer), [signer.verifier()]).text == text


def test_c2sp_example_verifies_and_tampering_fails() -> None:
    v = new_verifier(C2SP_VKEY)
    assert open_note(C2SP_NOTE, [v]).text == "This is an example message.\n"
    with pytest.raises(InvalidSignatureError):
        open_note(C2SP_NOTE.replace(b"example message", b"example massage"), [v])


def test_sumdb_tree_note_with_four_signatures() -> None:
    verifiers = [new_verifier(k) for k in [SUMDB_VKEY, *SUMDB_OTHER_VKEYS]]
    n = open_note(SUMDB_NOTE, verifiers)
    assert [s.name for s in n.sigs] == ["sum.golang.org", "monkeys", "bananas", "witness"]
    only_log = open_note(SUMDB_NOTE, [verifiers[0]])
    assert len(only_log.sigs) == 1 and len(only_log.unverified_sigs) == 3


# ------------------------------------------------------------------ netfilter keys
def test_round_trip_with_netfilter_keys(netfilter_key: tuple[Path, Path]) -> None:
    private, public = load_private_key(netfilter_key[0]), load_public_key(netfilter_key[1])
    signer = Signer.from_private_key("audit.example/log", private)
    verifier = Verifier.from_public_key("audit.example/log", public)
    assert signer.verifier() == verifier and new_verifier(verifier.vkey) == verifier
    skey = (f"PRIVATE+KEY+audit.example/log+{verifier.key_hash:08x}+"
            + base64.b64encode(b"\x01" + private.raw_seed()).decode())
    assert new_signer(skey).verifier() == verifier
    msg = sign("size 3\nroot abc\n", signer)
    assert msg.startswith(b"size 3\nroot abc\n\n\xe2\x80\x94 audit.example/log ")
    assert open_note(msg, [verifier]).text == "size 3\nroot abc\n"
    assert open_note(msg, [verifier]).sigs[0].key_hash == verifier.key_hash

    with pytest.raises(InvalidSignatureError):
        open_note(msg.replace(b"size 3", b"size 4"), [verifier])
    # Same key under another name, or another key under this name: unknown, not invalid.
    for other in [Verifier("other.example/log", public.raw), enoch_signer().verifier()]:
        with pytest.raises(UnverifiedNoteError):
            open_note(msg, [other])


def test_forged_key_id_is_an_invalid_signature(netfilter_key: tuple[Path, Path]) -> None:
    """A signature by another key that claims a known key's name and ID must not pass."""
    public = load_public_key(netfilter_key[1])
    verifier = Verifier.from_public_key("audit.example/log", public)

    class Forger:
        name, key_hash = verifier.name, verifier.key_hash

        def sign(self, msg: bytes) -> bytes:
            return enoch_signer().sign(msg)

    with pytest.raises(InvalidSignatureError):
        open_note(sign("forged\n", Forger()), [verifier])


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2028b", "a\nb"])
def test_invalid_key_names(name: str) -> None:
    assert not note.is_valid_name(name)
    with pytest.raises(ValueError, match="invalid key name"):
        Verifier(name, bytes(32))
    with pytest.raises(ValueError, match="invalid key name"):
        Signer(name, PrivateKey(Ed25519PrivateKey.generate()))


def test_errors_are_netfilter_errors() -> None:
    for error in (MalformedNoteError, UnknownVerifierError, InvalidSignatureError,
                  UnverifiedNoteError):
        assert issubclass(error, NoteError) and issubclass(error, NetfilterError)
    for name in note.__all__:
        assert hasattr(note, name), name


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "replace")))
def test_junk_never_opens_or_crashes(junk: bytes) -> None:
    verifier = new_verifier(PETER_VKEY)
    for msg in (junk, SIGNED + junk, junk + SIGNED):
        if msg == SIGNED:
            continue
        try:
            n = open_note(msg, [verifier])
        except NoteError:
            continue
        # Only a note whose text Peter really signed can open.
        assert n.text == TEXT, msg
