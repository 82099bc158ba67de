"""Who may ask `minigpt serve`: the Host check and the API key, run before routing.

Design choices
- Any web page the user opens can reach a port on localhost, so requests are hostile. A server
  bound to loopback answers only Host headers that name loopback (403 otherwise: DNS rebinding
  would let a page on another site reach it under that site's name).
- `--api-key` / MINIGPT_API_KEY guards every route but the chat page `/` (which asks for the key):
  401 with `WWW-Authenticate: Bearer`, and the token compared in constant time.
- Plain ASGI middleware, so a refusal costs no routing, body reading or validation.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi.responses import JSONResponse

from minigpt.serve_api import error_body

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}  # what a Host header may say on loopback


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def host_name(header: str) -> str:
    """The name in a Host header, lowercased, without its port ("[::1]:8000" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


class Guard:
    """ASGI middleware run before routing: the Host check (bound to loopback) and the API key."""

    def __init__(self, app, host: str, api_key: str | None):
        self.app = app
        self.hosts = LOOPBACK_NAMES | {host.lower() if ":" not in host else f"[{host}]"}
        self.check_host = is_loopback(host)
        self.key = api_key.encode() if api_key else None

    def refusal(self, scope) -> tuple[int, dict, dict] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.check_host:
            host = headers.get("host", "")
            if host_name(host) not in self.hosts:
                return 403, error_body(
                    f"Host header {host or '(none)'!r} is not allowed: this server is bound to "
                    "loopback and answers only 127.0.0.1, localhost and [::1] (a page on another "
                    "site may reach it by DNS rebinding)", code="host_not_allowed"), {}
        if self.key is not None and not (scope["method"] == "GET" and scope["path"] == "/"):
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(token.strip().encode("latin-1"), self.key)):
                message = ("Incorrect API key provided" if token else
                           "You didn't provide an API key: send the header "
                           "'Authorization: Bearer <key>' (the key of minigpt serve --api-key)")
                return 401, error_body(message, code="invalid_api_key"), {
                    "WWW-Authenticate": "Bearer"}
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refused := self.refusal(scope)):
            status, body, headers = refused
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)
