"""Provider-key encryption: AES-256-GCM under the master key, a fresh 96-bit nonce per record, and the
key's id as associated data so a ciphertext cannot be moved to another record."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rungate.config import Settings, parse_master_key
from rungate.errors import ConfigError, StoreError


class Keyring:
    """Encrypts and decrypts provider keys; the plaintext never leaves this object except to go upstream."""

    def __init__(self, master_key: bytes, *, pending_file: Path | None = None) -> None:
        if len(master_key) != 32:
            raise ConfigError("RUNGATE_MASTER_KEY must be 32 bytes")
        self._aead = AESGCM(master_key)
        self._key = master_key
        # A freshly made key not yet written beside the database (see `persist`).
        self._pending_file = pending_file

    @property
    def generated(self) -> bool:
        """True when no key existed: provider keys already stored could not be read with this one."""
        return self._pending_file is not None

    def persist(self) -> None:
        """Write a freshly made key to its file (mode 0600); if another process wrote one first, use that."""
        if self._pending_file is None:
            return
        path, self._pending_file = self._pending_file, None
        _create_key_file(path, self._key)
        self._key = parse_master_key(path.read_text().strip(), str(path))
        self._aead = AESGCM(self._key)

    def encrypt(self, key_id: str, plaintext: str) -> tuple[str, str]:
        """Returns (nonce, ciphertext), both base64."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), key_id.encode("utf-8"))
        return base64.b64encode(nonce).decode(), base64.b64encode(sealed).decode()

    def decrypt(self, key_id: str, nonce: str, ciphertext: str) -> str:
        try:
            plain = self._aead.decrypt(base64.b64decode(nonce), base64.b64decode(ciphertext), key_id.encode())
        except (InvalidTag, ValueError) as exc:
            raise StoreError(f"provider key {key_id} does not decrypt under the configured master key") from exc
        return plain.decode("utf-8")


def key_hint(secret: str) -> str:
    """At most the last four characters, so an operator can tell keys apart."""
    return f"…{secret[-4:]}" if len(secret) >= 12 else "…"


def load_keyring(settings: Settings) -> Keyring:
    """The keyring from `RUNGATE_MASTER_KEY`, or from the key file beside the SQLite database.

    Without either, a key is made and written (mode 0600) by `Keyring.persist` once the caller has checked
    that no provider key is stored under a lost one. Losing the file makes stored provider keys
    unreadable, so production deployments should set `RUNGATE_MASTER_KEY` explicitly.
    """
    if settings.master_key is not None:
        return Keyring(settings.master_key_bytes())
    db_path = settings.sqlite_path
    if db_path is None:
        raise ConfigError("RUNGATE_MASTER_KEY must be set when the database is PostgreSQL")
    key_path = Path(f"{db_path}.key")
    if key_path.exists():
        return Keyring(parse_master_key(key_path.read_text().strip(), str(key_path)))
    return Keyring(secrets.token_bytes(32), pending_file=key_path)


def _create_key_file(key_path: Path, key: bytes) -> None:
    """Write a key atomically: a temporary file, then a hard link that fails if another process won."""
    key_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = key_path.with_name(f"{key_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temporary, key_path)
        except FileExistsError:
            pass  # another process (the CLI beside the server) created it first: use theirs
    finally:
        temporary.unlink(missing_ok=True)
