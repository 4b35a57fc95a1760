"""The server's front door, as ASGI middleware (before any route runs): Host and Origin allow-lists (403), API keys
(401), JSON-only bodies (415) and a body size enforced while the body is read (413). Torch-free.

Host: a browser page can reach a loopback server through a DNS name that resolves to 127.0.0.1 (DNS rebinding);
such a request carries that name as Host, so a server bound to loopback answers only Hosts naming loopback (or
those in --allowed-hosts). Origin: browsers send it on cross-site requests; one not in --allowed-origins is
refused, so no web page a user visits can drive the server. API keys: `Authorization: Bearer KEY`, compared in
constant time with every configured key; /health answers without a key but then says only "ok" or "degraded".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from kvblend.serve.protocol import ApiError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def key_salt(key: str) -> str:
    """The isolation salt of an API key (--salt-per-key): a hash, so the key itself is never stored."""
    return "key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS  # None: any Host
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    max_body_bytes: int = 16 * 2**20
    salt_per_key: bool = False  # each API key gets its own cache namespace

    def key_index(self, authorization: str) -> int | None:
        """Which configured key the Authorization header carries (every key compared, in constant time)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        found = None
        for i, key in enumerate(self.api_keys):
            if hmac.compare_digest(token.encode(), key.encode()) and found is None:
                found = i
        return found


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware applying a GuardPolicy; counts refusals through `count(outcome)`."""

    def __init__(self, app, policy: GuardPolicy, count=lambda outcome: None):
        self.app, self.policy, self.count = app, policy, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            state = scope.setdefault("state", {})
            state["tenant_salt"], state["authenticated"] = self._check(scope, headers)
            if scope["method"] == "POST":
                receive = await self._bounded_body(receive, headers)
        except ApiError as exc:
            self.count({401: "unauthorized", 403: "forbidden"}.get(exc.status, "bad_request"))
            return await _send_error(send, exc)
        return await self.app(scope, receive, send)

    def _check(self, scope, headers: dict) -> tuple[str, bool]:
        p = self.policy
        host = _host_name(headers.get("host", ""))
        if p.allowed_hosts is not None and host not in p.allowed_hosts:
            raise ApiError(403, f"Host '{host}' is not served here (a DNS-rebinding guard); call the server by an "
                                f"address it is bound to, or start it with --allowed-hosts", code="forbidden_host")
        origin = headers.get("origin")
        if origin is not None and origin not in p.allowed_origins:
            raise ApiError(403, f"cross-site requests from Origin '{origin}' are refused; start the server with "
                                f"--allowed-origins to allow that site", code="forbidden_origin")
        index = p.key_index(headers.get("authorization", "")) if p.api_keys else None
        if p.api_keys and index is None and scope["path"] not in OPEN_PATHS:
            raise ApiError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        salt = key_salt(p.api_keys[index]) if p.salt_per_key and index is not None else ""
        return salt, not p.api_keys or index is not None

    async def _bounded_body(self, receive, headers: dict):
        """Read the body (refusing it once it passes the limit, before the rest is read) and hand the app a
        receive that replays it, then passes on what the client sends next (a disconnect)."""
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be JSON sent as 'Content-Type: application/json', got "
                                f"'{kind or 'none'}'", code="unsupported_media_type")
        limit = self.policy.max_body_bytes
        too_big = ApiError(413, f"request body over {limit} bytes (--max-body-bytes)", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise too_big
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_error(send, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
