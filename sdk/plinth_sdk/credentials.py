"""Which API key the SDK and CLI send, and where ``plinth login`` keeps it.

A call carries ``authorization: Bearer <key>``; the key is the first found of:

1. the ``api_key=`` given to :class:`~plinth_sdk.Plinth` (or the transport),
2. ``$PLINTH_API_KEY``,
3. the key ``plinth login`` stored for this gateway address in
   ``$XDG_CONFIG_HOME/plinth/credentials.json`` (else ``~/.config/plinth/credentials.json``;
   the file is 0600, its folder 0700),
4. for a gateway on this machine (loopback), the admin key ``make run`` wrote for the local
   platform: ``<data dir>/run/admin.key``, the data dir being ``$PLINTH_DATA_DIR`` or the
   checkout's ``.data``.

With none of them the call goes without a credential, and the gateway answers UNAUTHENTICATED.

Key material is never part of a repr, an exception or a log line: a :class:`Credential` shows
only where it came from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plinth_common.config import admin_key_file, default_data_dir

__all__ = [
    "API_KEY_ENV",
    "LOGIN_HINT",
    "Credential",
    "CredentialStore",
    "auth_headers",
    "credentials_path",
    "is_loopback",
    "local_admin_key_path",
    "resolve_credential",
]

log = logging.getLogger(__name__)

API_KEY_ENV = "PLINTH_API_KEY"
DATA_DIR_ENV = "PLINTH_DATA_DIR"
_FILE_VERSION = 1

#: What to do when the gateway finds no valid credential.
LOGIN_HINT = f"log in with `plinth login` or set {API_KEY_ENV}"


@dataclass(frozen=True)
class Credential:
    """An API key and where it was found.

    Attributes:
        key: The bearer token itself; never shown in a repr.
        source: Where it came from, in words: ``api_key argument``, ``$PLINTH_API_KEY``,
            ``plinth login (<file>)`` or ``the local platform's admin key (<file>)``.
    """

    key: str = field(repr=False)
    source: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that carries it."""
        return (("authorization", f"Bearer {self.key}"),)


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/plinth/credentials.json``, else ``~/.config/plinth/credentials.json``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "plinth" / "credentials.json"


def local_admin_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """The admin key file of the local platform (what ``make run`` writes)."""
    env = os.environ if environ is None else environ
    data_dir = Path(env[DATA_DIR_ENV]) if env.get(DATA_DIR_ENV) else default_data_dir()
    return admin_key_file(data_dir)


def is_loopback(target: str) -> bool:
    """True when a gateway address (``host:port``, ``[::1]:port``, ``localhost``, optionally
    with a ``dns:///`` or ``ipv4:``/``ipv6:`` scheme) names this machine."""
    host = target.strip()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        host = host.removeprefix(scheme)
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CredentialStore:
    """The API keys ``plinth login`` stored, one per gateway address, in a 0600 JSON file.

    Args:
        path: The file; :func:`credentials_path` by default.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path or credentials_path()

    @property
    def path(self) -> Path:
        """The credentials file."""
        return self._path

    def get(self, gateway: str) -> str | None:
        """The key stored for ``gateway``, or None (no file, no entry, or an unreadable file:
        that is logged, without its contents)."""
        entry = self._read().get(gateway)
        key = entry.get("api_key") if isinstance(entry, dict) else None
        return key if isinstance(key, str) and key else None

    def put(self, gateway: str, key: str, *, name: str = "") -> None:
        """Stores ``key`` for ``gateway`` (replacing the one stored), keeping the others.

        The folder is created 0700 and the file written 0600, whole or not at all.
        """
        gateways = self._read()
        gateways[gateway] = {
            "api_key": key,
            "name": name,
            "stored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write(gateways)

    def remove(self, gateway: str) -> bool:
        """Forgets the key of ``gateway``; False when none was stored."""
        gateways = self._read()
        if gateways.pop(gateway, None) is None:
            return False
        self._write(gateways)
        return True

    def gateways(self) -> list[str]:
        """The gateway addresses a key is stored for."""
        return sorted(self._read())

    def _read(self) -> dict[str, Any]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            log.warning("cannot read the credentials file %s: %s", self._path, err.strerror)
            return {}
        try:
            document = json.loads(text)
        except ValueError:
            # The message stays generic: a JSON error quotes the text, which holds keys.
            log.warning("the credentials file %s is not valid JSON; ignoring it", self._path)
            return {}
        gateways = document.get("gateways") if isinstance(document, dict) else None
        return dict(gateways) if isinstance(gateways, dict) else {}

    def _write(self, gateways: Mapping[str, Any]) -> None:
        folder = self._path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # an older, wider folder is narrowed: it holds secrets
        document = {"version": _FILE_VERSION, "gateways": dict(gateways)}
        # mkstemp creates the file 0600, so the key is never readable by others, not even for
        # a moment; the rename puts the whole file in place or nothing.
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=".credentials.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(name, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise


def resolve_credential(
    target: str,
    api_key: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    store: CredentialStore | None = None,
) -> Credential | None:
    """The credential a call to ``target`` carries, in the module's order; None for none.

    Args:
        target: The gateway address (credentials are stored per address).
        api_key: A key given explicitly; it wins over everything else.
        environ: The environment to read (tests); ``os.environ`` by default.
        store: The login store; the one at :func:`credentials_path` by default.
    """
    env = os.environ if environ is None else environ
    if api_key:
        return Credential(api_key.strip(), "api_key argument")
    if env.get(API_KEY_ENV, "").strip():
        return Credential(env[API_KEY_ENV].strip(), f"${API_KEY_ENV}")
    store = store or CredentialStore(credentials_path(env))
    stored = store.get(target)
    if stored:
        return Credential(stored, f"plinth login ({store.path})")
    if is_loopback(target):
        local = _read_key_file(local_admin_key_path(env))
        if local is not None:
            return local
    return None


def auth_headers(target: str | None = None) -> dict[str, str]:
    """The header a stock client (``tritonclient``, ``requests``) sends to authenticate to the
    gateway at ``target`` (default: ``$PLINTH_GATEWAY``), found as the SDK finds its own key.

    Example:
        >>> client.infer("diabetes", [x], headers=auth_headers())  # doctest: +SKIP

    Raises:
        LookupError: no key was found (the message says how to log in).
    """
    from plinth_sdk.transport import resolve_target  # the transport imports this module

    resolved = resolve_target(target)
    credential = resolve_credential(resolved)
    if credential is None:
        raise LookupError(f"no API key for the gateway at {resolved}; {LOGIN_HINT}")
    return {"authorization": f"Bearer {credential.key}"}


def _read_key_file(path: Path) -> Credential | None:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("cannot read the local admin key %s: %s", path, err.strerror)
        return None
    return Credential(key, f"the local platform's admin key ({path})") if key else None
