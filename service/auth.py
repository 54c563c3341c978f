"""Who may use the control plane, and which upstreams it may point the gateway at.

- `require_admin`: a router dependency. With `FAIRPATCH_ADMIN_KEY` set, every management request
  needs `Authorization: Bearer <key>` (401 without one, 403 with a wrong one; compared in constant
  time). Without a key the control plane is open, which is only sensible on loopback: startup logs
  a warning when that is not where the gateway listens.
- `check_upstream_allowed`: a registered upstream URL must start with one of the allow-list's
  prefixes, at a boundary (`http://127.0.0.1` admits `http://127.0.0.1:9000/...` but not
  `http://127.0.0.1.evil.example`; URLs with userinfo are refused). An empty allow-list admits
  loopback only.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Request
from starlette.exceptions import HTTPException

from service.errors import ApiError
from service.settings import Settings

LOOPBACK_PREFIXES = ("http://127.0.0.1", "http://localhost", "http://[::1]",
                     "https://127.0.0.1", "https://localhost", "https://[::1]")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


async def require_admin(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.admin_key is None:
        return
    token = _bearer(request)
    if token is None:
        raise HTTPException(401, "this endpoint needs the admin key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_key.get_secret_value().encode()
    if not token or not hmac.compare_digest(token.encode(), expected):
        raise HTTPException(403, "the admin key is wrong", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def upstream_allowed(url: str, allowlist: list[str]) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    # Userinfo (`http://127.0.0.1:80@evil.example`) and backslashes make what a prefix match sees differ
    # from the host a client connects to: refuse them outright.
    if "@" in parts.netloc or "\\" in url or not parts.hostname:
        return False
    prefixes = allowlist or LOOPBACK_PREFIXES
    url_l = url.lower()
    for prefix in prefixes:
        p = prefix.lower()
        if not url_l.startswith(p):
            continue
        # The prefix must end at a URL boundary, so a prefix naming a host cannot be extended into another one.
        if len(url_l) == len(p) or p.endswith(("/", ":")) or url_l[len(p)] in "/:?#":
            return True
    return False


def check_upstream_allowed(url: str, allowlist: list[str]) -> None:
    if not upstream_allowed(url, allowlist):
        allowed = ", ".join(allowlist) if allowlist else "loopback only (FAIRPATCH_UPSTREAM_ALLOWLIST is empty)"
        raise ApiError(403, f"upstream URL {url} is not on the allow-list ({allowed}); add its prefix to "
                            "FAIRPATCH_UPSTREAM_ALLOWLIST to let the gateway call it")
