"""Bearer-token auth for gRPC (a server interceptor) and HTTP (an aiohttp middleware), one policy for both.

- Tokens come from CONVSERVE_AUTH_TOKENS (comma-separated) and/or CONVSERVE_AUTH_TOKENS_FILE (one per
  line); none configured: the data plane is open (the default).
- Admin tokens (CONVSERVE_ADMIN_TOKENS / _FILE) are accepted wherever a token is, and are the only
  ones allowed to load and unload models when CONVSERVE_REPOSITORY_CONTROL=admin.
- Health (grpc.health.v1, KServe ServerLive/ServerReady/ModelReady, /v2/health/*) and reflection are
  open unless CONVSERVE_AUTH_HEALTH=true.
- A presented token is compared with every configured token (SHA-256 digests, hmac.compare_digest,
  no early exit), so timing tells neither which token nor how much of one matched.

- Repository control (load/unload) is off unless CONVSERVE_REPOSITORY_CONTROL (--repository-control)
  turns it on. Over HTTP, whatever the setting, a state-changing route refuses what a page of
  another web site can send (see `check_not_cross_site`).

Tokens are never logged: errors say "missing bearer token" / "invalid bearer token" only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.settings import Settings

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
MISSING = "missing bearer token"
INVALID = "invalid bearer token"
NOT_ADMIN = "repository control needs an admin token"
CONTROL_DISABLED = (
    "repository control (model load/unload) is disabled on this server; start it with "
    "--repository-control enabled (CONVSERVE_REPOSITORY_CONTROL=enabled) to allow it"
)
CROSS_SITE = "refused: a request from another web site may not change the server"
NOT_JSON = "refused: load and unload take Content-Type: application/json"

#: A model name the repository may be asked to load or unload: one plain folder name.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: no trailing newline

#: Methods (the last part of a gRPC method, or an HTTP route's method name) by access class.
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
CONTROL_METHODS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
#: The HTTP route name of the web console's static files: open to anyone (they hold no data; every
#: call the page makes needs the token like any other client's).
STATIC_METHOD = "ConsoleFile"
_OPEN_GRPC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


#: What a refused request raises: domain errors, mapped to their statuses by service/errors.py.
AuthError = (Unauthenticated, PermissionDenied)


def check_model_name(name: str) -> None:
    """INVALID_ARGUMENT unless `name` is a plain model name (no path separators, no "..")."""
    if not MODEL_NAME.fullmatch(name) or ".." in name or len(name) > 255:
        raise InvalidArgument(
            f"invalid model name {name[:64]!r}: a plain name (letters, digits, '_', '.', '-') is expected"
        )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(inline: str, file: Path | None) -> list[str]:
    """Tokens from a comma-separated string and a file (one per line; blank lines and #comments skipped)."""
    tokens = [t.strip() for t in inline.split(",")]
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise OSError(f"cannot read token file {file}: {exc.strerror}") from None
        tokens += [line.strip() for line in lines if not line.strip().startswith("#")]
    return [t for t in tokens if t]


@dataclass(frozen=True)
class AuthPolicy:
    """Who may call what. Built once from the settings; `check` is all the transports use."""

    tokens: tuple[bytes, ...] = ()  # SHA-256 digests of the user tokens
    admin_tokens: tuple[bytes, ...] = ()  # and of the admin tokens
    protect_health: bool = False
    repository_control: str = "disabled"

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthPolicy:
        users = read_tokens(settings.auth_tokens.get_secret_value(), settings.auth_tokens_file)
        admins = read_tokens(settings.admin_tokens.get_secret_value(), settings.admin_tokens_file)
        if settings.repository_control == "admin" and not admins:
            log.warning("repository_control is 'admin' but no admin token is configured: load/unload refused")
        return cls(
            tokens=tuple(_digest(t) for t in users),
            admin_tokens=tuple(_digest(t) for t in admins),
            protect_health=settings.auth_health,
            repository_control=settings.repository_control,
        )

    @property
    def enabled(self) -> bool:
        """Whether the data plane asks for tokens at all (any user token configured)."""
        return bool(self.tokens)

    def check(self, method: str, authorization: str | None, *, health: bool = False) -> None:
        """Raise Unauthenticated or PermissionDenied unless a call of `method` with this
        Authorization value may proceed."""
        if method in CONTROL_METHODS:
            self._check_control(authorization)
        elif health and not self.protect_health:
            return
        elif self.enabled:
            self._authenticate(authorization)

    def check_token(self, authorization: str | None) -> None:
        """Unauthenticated unless the Authorization value carries a known (user or admin) token."""
        self._authenticate(authorization)

    def _check_control(self, authorization: str | None) -> None:
        if self.repository_control == "admin":
            if self._authenticate(authorization) != "admin":
                raise PermissionDenied(NOT_ADMIN)
            return
        if self.enabled:
            self._authenticate(authorization)
        if self.repository_control == "disabled":
            raise PermissionDenied(CONTROL_DISABLED)

    def _authenticate(self, authorization: str | None) -> str:
        """'admin' or 'user' for a known token; Unauthenticated otherwise."""
        token = _bearer(authorization)
        if token is None:
            raise Unauthenticated(MISSING)
        given = _digest(token)
        user = _matches(given, self.tokens)
        admin = _matches(given, self.admin_tokens)
        if admin:
            return "admin"
        if user:
            return "user"
        raise Unauthenticated(INVALID)


def _matches(given: bytes, known: Iterable[bytes]) -> bool:
    """Compare with every known digest, without stopping at the first match."""
    found = False
    for digest in known:
        found |= hmac.compare_digest(given, digest)
    return found


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# gRPC --------------------------------------------------------------------------------------------


class MethodAccess:
    """The policy's check for one gRPC method, with what can be known before a call worked out once."""

    def __init__(self, policy: AuthPolicy, full_method: str) -> None:
        self._policy = policy
        self._method = full_method.rsplit("/", 1)[-1]
        open_service = full_method.startswith(_OPEN_GRPC_PREFIXES)
        self._health = open_service or (
            full_method.startswith("/inference.") and self._method in HEALTH_METHODS
        )

    def check(self, metadata: Any) -> None:
        """Raise Unauthenticated or PermissionDenied unless a call with this metadata may proceed."""
        self._policy.check(self._method, metadata_value(metadata, AUTHORIZATION), health=self._health)


def metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of `key` in gRPC metadata, as text."""
    for item_key, value in metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


# HTTP --------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_middleware(policy: AuthPolicy) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The same rules on HTTP: `Authorization: Bearer ...`; raises Unauthenticated or PermissionDenied
    (the call observation answers 401/403 with {"error": ...}). /v2/health/* and model readiness are
    health routes."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or ""
        method = route.split(".", 1)[0]
        if method in CONTROL_METHODS:
            check_not_cross_site(request)
        if method and method != STATIC_METHOD:  # unknown routes answer 404 as before
            policy.check(method, request.headers.get("Authorization"), health=method in HEALTH_METHODS)
        return await handler(request)

    return auth_middleware


def check_not_cross_site(request: web.Request) -> None:
    """Refuse (PERMISSION_DENIED) a state-changing request that a page of another site could send.

    Browsers send cross-site "simple" requests without asking first, e.g. a form post with
    `Content-Type: text/plain`; they always add `Origin` (and `Sec-Fetch-Site`) to them. So: an
    `Origin` other than this server's own, or `Sec-Fetch-Site` other than same-origin, is refused,
    and the body must be declared JSON. A request with no Content-Type at all is let through only
    without those browser headers (tritonclient's HTTP client sends none: it is not a browser).
    """
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise PermissionDenied(CROSS_SITE)
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise PermissionDenied(CROSS_SITE)
    content_type = request.headers.get("Content-Type")
    if content_type is None:
        return
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise PermissionDenied(NOT_JSON)
