"""Secrets out of logs and error messages: one helper for every line that can carry a URL or a key.

`redact_url` masks the credentials of one URL (`redis://:secret@host` -> `redis://:***@host`, and
`password=` / `token=`-like query parameters); `redact` does that to every URL inside a text and masks
the secrets it is given (the admin key) wherever they appear. `RedactingFilter` applies `redact` to
every record a logging handler emits, so a library's log line (arq's, uvicorn's, redis-py's
exception texts) is covered as well as ours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"
# scheme://user:password@ or scheme://password@ (Redis accepts a bare password): everything between
# the scheme and the last '@' of the authority is credentials (a password may hold an unescaped '@').
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#]*)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:password|passwd|pass|pwd|token|secret|key|api_key|apikey)=)[^&;#\s]*",
                           re.IGNORECASE)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _password = match["userinfo"].partition(":")
    kept = f"{user}:{MASK}" if sep else MASK
    return f"{match['scheme']}{kept}@"


def redact_url(url: str) -> str:
    """The URL with its password (and password-like query parameters) masked; the host and path kept."""
    return redact(url)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with the credentials of every URL in it masked, and each of `secrets` replaced by ***."""
    out = _QUERY_SECRET.sub(lambda m: m["key"] + MASK, _USERINFO.sub(_mask_userinfo, text))
    for secret in secrets:
        if secret and len(secret) >= 4:  # a one-letter "secret" would mask half the text
            out = out.replace(secret, MASK)
    return out


class RedactingFilter(logging.Filter):
    """Formats each record's message once and redacts it (attach to handlers: it sees every logger's records)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: let logging report it as it does
            return True
        clean = redact(message, self.secrets)
        if record.exc_info and not record.exc_text:  # tracebacks quote exception texts, which may hold a URL
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def install(secrets: Iterable[str | None] = ()) -> None:
    """Redact every line: on the root logger's handlers (ours, arq's and redis-py's records propagate there),
    and on uvicorn's loggers, whose records stop at handlers of their own (a logger's filters survive the
    logging config uvicorn applies when it starts; its handlers do not)."""
    filt = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(filt)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(filt)
