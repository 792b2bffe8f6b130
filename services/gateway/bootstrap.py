"""The local platform's first admin key (``make run``: no set-up, and nothing open).

Design: the gateway owns its key table, so the gateway makes the key. When
``PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE`` names a file (``make run`` sets it to
``<data dir>/run/admin.key``), the gateway, before it reports SERVING:

* reuses the key in the file if it still verifies (known, right secret, an admin key, neither
  revoked nor expired);
* otherwise (first start, file deleted, key revoked) creates a new admin key owned by
  ``admin`` and writes it to the file, mode 0600, replacing the old one atomically.

The CLI and SDK read that file when they talk to a platform on this machine. Production
deployments leave the variable unset and create their first admin key with this module's
:func:`ensure_admin_key` run once (or by pointing the variable at a secret volume).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from plinth_common.auth import PrincipalKind
from plinth_common.errors import Unauthenticated
from services.gateway.identity import ApiKeyRecord
from services.gateway.keys import new_key, parse_key, secret_matches

__all__ = ["BOOTSTRAP_ADMIN", "ensure_admin_key"]

#: The owner of the bootstrap key.
BOOTSTRAP_ADMIN = "admin"


class KeyTable(Protocol):
    """The part of the store the bootstrap uses."""

    async def get_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def add_key(self, key: ApiKeyRecord) -> None: ...


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    os.replace(scratch, path)


async def _still_valid(keys: KeyTable, token: str) -> bool:
    try:
        key_id, secret = parse_key(token)
    except Unauthenticated:
        return False
    record = await keys.get_key(key_id)
    return (
        record is not None
        and record.admin
        and secret_matches(secret, record.salt, record.hash)
        and record.usable_at(datetime.now(UTC))
    )


async def ensure_admin_key(keys: KeyTable, path: Path) -> tuple[str, bool]:
    """The admin key in ``path``, made (and written, 0600) when there is none that verifies.

    Returns:
        The key, and whether it was created now.
    """
    current = await asyncio.to_thread(_read, path)
    if current and await _still_valid(keys, current):
        return current, False
    generated = new_key()
    now = datetime.now(UTC)
    await keys.add_key(
        ApiKeyRecord(
            id=generated.id,
            name="local-admin",
            owner=BOOTSTRAP_ADMIN,
            kind=PrincipalKind.USER,
            admin=True,
            created_at=now,
            created_by="bootstrap",
            salt=generated.salt,
            hash=generated.hash,
        )
    )
    await asyncio.to_thread(_write_private, path, generated.token)
    return generated.token, True
