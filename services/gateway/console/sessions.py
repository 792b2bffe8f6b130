"""Console sessions: the browser holds a random session id, the credential stays here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: How long a browser has between leaving for the identity provider and coming back.
OIDC_LOGIN_TTL_S = 600.0


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
        # Bytes: compare_digest refuses str with non-ASCII characters (a forged form).
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


@dataclass(frozen=True)
class OidcLogin:
    """One authorization code flow under way, kept here until its callback.

    Attributes:
        state: the ``state`` sent to the provider; the browser holds it in a cookie too, so a
            callback started in another browser (login CSRF) is refused.
        nonce: the ``nonce`` the ID token must carry (no replayed token).
        code_verifier: the PKCE secret; only its S256 challenge leaves this process before the
            code is exchanged.
        target: the console page to land on after the login.
        deadline: monotonic time after which the callback is refused.
    """

    state: str
    nonce: str
    code_verifier: str
    target: str
    deadline: float

    @property
    def code_challenge(self) -> str:
        """The PKCE ``S256`` challenge of :attr:`code_verifier` (RFC 7636)."""
        digest = hashlib.sha256(self.code_verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


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
        self._pending_oidc: dict[str, OidcLogin] = {}

    def create(
        self, credential: str, user: str, *, ttl_s: float | None = None
    ) -> tuple[str, Session]:
        """A new session; returns its id (the cookie's value) and the session.

        Args:
            credential: what the console calls the gateway with.
            user: who it is.
            ttl_s: a shorter life than the sessions' own (an OIDC token's remaining validity:
                the session ends when the gateway would stop accepting its credential).
        """
        self._expire()
        session_id = secrets.token_urlsafe(32)
        life = self._ttl_s if ttl_s is None else max(0.0, min(ttl_s, self._ttl_s))
        session = Session(credential=credential, user=user, expires=self._clock() + life)
        self._sessions[session_id] = session
        return session_id, session

    def now(self) -> float:
        """The sessions' clock (monotonic seconds)."""
        return self._clock()

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

    def new_oidc_login(self, target: str = "") -> OidcLogin:
        """A new authorization code flow: fresh ``state``, ``nonce`` and PKCE verifier."""
        self._expire()
        login = OidcLogin(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            code_verifier=secrets.token_urlsafe(48),  # 64 characters: RFC 7636 allows 43-128
            target=target,
            deadline=self._clock() + OIDC_LOGIN_TTL_S,
        )
        self._pending_oidc[login.state] = login
        return login

    def take_oidc_login(self, state: str | None) -> OidcLogin | None:
        """The flow ``state`` was issued for, if it is here and not used yet (it is used now)."""
        login = self._pending_oidc.pop(state or "", None)
        return login if login is not None and login.deadline >= self._clock() else None

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]
        for key in [k for k, p in self._pending_oidc.items() if p.deadline < now]:
            del self._pending_oidc[key]
