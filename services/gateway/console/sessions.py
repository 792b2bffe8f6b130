"""Console sessions: the browser holds a random session id, the credential stays here."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Session:
    """One logged-in browser.

    Attributes:
        credential: the API key or OIDC token the console calls the gateway with.
        user: who it is (WhoAmI's name), for the page header.
        csrf: the token every POST form of this session carries.
        expires: monotonic time after which the session is gone.
    """

    credential: str
    user: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    expires: float = 0.0

    def csrf_ok(self, token: str | None) -> bool:
        """Whether ``token`` is this session's CSRF token (constant time)."""
        return token is not None and hmac.compare_digest(token, self.csrf)


class Sessions:
    """In-memory sessions of one gateway replica (a restart logs everyone out).

    Args:
        ttl_s: how long a session lives after login.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, ttl_s: float = 8 * 3600, clock: Callable[[], float] | None = None) -> None:
        self._ttl_s = ttl_s
        self._clock: Callable[[], float] = clock or time.monotonic
        self._sessions: dict[str, Session] = {}
        self._pending_oidc: dict[str, float] = {}

    def create(self, credential: str, user: str) -> tuple[str, Session]:
        """A new session; returns its id (the cookie's value) and the session."""
        self._expire()
        session_id = secrets.token_urlsafe(32)
        session = Session(credential=credential, user=user, expires=self._clock() + self._ttl_s)
        self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of ``session_id``, or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires < self._clock():
            self._sessions.pop(session_id, None)
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        """Logs the session out."""
        if session_id:
            self._sessions.pop(session_id, None)

    def new_oidc_state(self) -> str:
        """A one-time ``state`` for an authorization code flow (10 minutes)."""
        self._expire()
        state = secrets.token_urlsafe(24)
        self._pending_oidc[state] = self._clock() + 600
        return state

    def take_oidc_state(self, state: str | None) -> bool:
        """Whether ``state`` was issued here and not used yet (it is used now)."""
        deadline = self._pending_oidc.pop(state or "", None)
        return deadline is not None and deadline >= self._clock()

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]
        for key in [k for k, t in self._pending_oidc.items() if t < now]:
            del self._pending_oidc[key]
