"""Optional Bearer API key (OFFRAMP_API_KEY) for predict and admin routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.service import RequestError


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the Bearer token equals the configured key."""
    key = request.app.state.settings.api_key
    if key is None or not key.get_secret_value():  # an empty key is no key (and refused at start)
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: the response time must not reveal how much of a key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise RequestError(401, "authorization", "a valid Bearer API key is required", "unauthorized")


LOOPBACK_HOSTS = ("localhost", "::1")


def anonymous_exposure(settings) -> str | None:
    """Why the server must not start: no key on an address others can reach, unless on purpose."""
    if (settings.api_key is not None and settings.api_key.get_secret_value()) or settings.allow_anonymous:
        return None
    host = settings.host.strip("[]").lower()
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return None
    return (f"refusing to serve {settings.host} without an API key: set OFFRAMP_API_KEY, or "
            "OFFRAMP_ALLOW_ANONYMOUS=true to serve predict and reload to anyone on purpose")
