"""The operator dashboard's accounts (`web.accounts`, else in the node's state
directory, where the list state is) and its session secret (in the state directory),
each a 0600 file written whole (temp file, rename).

Accounts are made on the command line only (`netfilter user add NAME`): nothing on the
web creates one. Passwords are kept as argon2id hashes (argon2-cffi's defaults); a
login for an unknown name still costs one hash, so timing does not say which names exist.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from netfilter.config import Settings
from netfilter.errors import NetfilterError

__all__ = ["ACCOUNTS_NAME", "NAME", "SECRET_NAME", "Accounts", "session_secret", "state_dir"]

ACCOUNTS_NAME = "admin-accounts.json"
SECRET_NAME = "admin-session.key"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_PASSWORD = 1024  # bytes: longer is refused (the hash's cost is per byte too)


def state_dir(settings: Settings) -> Path:
    """The node's state directory: the list state file's."""
    from netfilter.updates.state import state_path

    return state_path(settings).parent


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` as a 0600 file, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def session_secret(settings: Settings) -> bytes:
    """The key that signs the dashboard's cookies: made on first use (32 random bytes,
    0600), then kept; never logged. The sessions themselves live in the node's memory
    and end with it; a login form opened before a restart still works after it."""
    path = state_dir(settings) / SECRET_NAME
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    data = secrets.token_bytes(32)
    _write_private(path, data)
    return data


class Accounts:
    """The accounts file: {"accounts": {NAME: argon2 hash}}; read at each login (an
    account added while the node runs can log in at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = PasswordHasher()
        self._dummy = self.hasher.hash(secrets.token_hex(16))
        self._seen: tuple[tuple[int, int, int], dict[str, str]] | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> Accounts:
        """`web.accounts`, else admin-accounts.json in the state directory."""
        web = settings.web
        if web is not None and web.accounts is not None:
            return cls(settings.resolve(web.accounts))
        return cls(state_dir(settings) / ACCOUNTS_NAME)

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise NetfilterError(self.path, f"unreadable accounts file: {e}") from e
        accounts = data.get("accounts") if isinstance(data, dict) else None
        if not isinstance(accounts, dict):
            raise NetfilterError(self.path, "not an accounts file")
        return {str(k): str(v) for k, v in accounts.items()}

    def names(self) -> list[str]:
        return sorted(self._read())

    def credential(self, name: str) -> str | None:
        """`name`'s stored hash (None: no such account, or the file is unreadable). A
        session keeps the one it logged in with, so removing an account or giving it a
        new password ends its sessions. Re-read only when the file changed: it is asked
        at every dashboard request."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None
        if self._seen is None or self._seen[0] != stamp:
            try:
                self._seen = (stamp, self._read())
            except NetfilterError:
                return None
        return self._seen[1].get(name)

    def remove(self, name: str) -> None:
        """Take account `name` away (its sessions end at their next request)."""
        accounts = self._read()
        if name not in accounts:
            raise NetfilterError(name, f"no such account in {self.path}")
        del accounts[name]
        self._write(accounts)

    def add(self, name: str, password: str, *, replace: bool = False) -> bool:
        """Make account `name` (an existing one is refused unless `replace`: then it gets
        the new password); True when new."""
        if not NAME.match(name):
            raise NetfilterError(name, "not an account name (letters, digits, _ . @ -; "
                                       "at most 64)")
        if not password or len(password.encode()) > MAX_PASSWORD:
            raise NetfilterError(name, f"the password must be 1 to {MAX_PASSWORD} bytes")
        accounts = self._read()
        new = name not in accounts
        if not new and not replace:
            raise NetfilterError(name, f"the account exists already in {self.path} "
                                       "(--replace sets a new password)")
        accounts[name] = self.hasher.hash(password)
        self._write(accounts)
        return new

    def _write(self, accounts: dict[str, str]) -> None:
        body = json.dumps({"accounts": dict(sorted(accounts.items()))}, indent=1)
        try:
            _write_private(self.path, (body + "\n").encode())
        except OSError as e:
            raise NetfilterError(self.path, f"cannot write the accounts file: "
                                            f"{e.strerror or e}") from None

    def verify(self, name: str, password: str) -> bool:
        """Whether `password` is `name`'s; an unknown name costs a hash all the same."""
        if len(password.encode()) > MAX_PASSWORD:
            return False
        try:
            stored = self._read().get(name)
        except NetfilterError:
            stored = None
        try:
            return self.hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False
