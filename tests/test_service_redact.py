"""The redaction helper: URL credentials and given secrets masked in texts and in every log record."""

from __future__ import annotations

import logging

import pytest

from service.redact import RedactingFilter, redact, redact_url


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://default:s3cret@cache.internal:6380", "rediss://default:***@cache.internal:6380"),
    ("redis://s3cret@host/0", "redis://***@host/0"),  # a bare password
    ("unix://:s3cret@/var/run/redis.sock", "unix://:***@/var/run/redis.sock"),
    ("redis://:p@ss@host:6379", "redis://:***@host:6379"),  # an unescaped @ in the password
    ("unix:///tmp/redis.sock?db=0&password=s3cret", "unix:///tmp/redis.sock?db=0&password=***"),
    ("http://127.0.0.1:9000/v2/models/a@b/infer", "http://127.0.0.1:9000/v2/models/a@b/infer"),  # no userinfo
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url(url, masked):
    assert redact_url(url) == masked


def test_redact_masks_every_url_in_a_text_and_the_given_secrets():
    text = "no Redis answers at redis://:pw1@a:1 nor rediss://u:pw2@b:2; key admin-key-123 refused"
    # a secret too short to mask safely ("key") is left alone: masking it would garble every line
    assert redact(text, ["admin-key-123", None, "key"]) == \
        "no Redis answers at redis://:***@a:1 nor rediss://u:***@b:2; key *** refused"


def test_the_filter_redacts_messages_arguments_and_tracebacks():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter(["admin-key-123"]))
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)  # whatever level other tests left on the root logger
    try:
        logger.warning("worker on %s with key %s", "redis://:pw@h:1/0", "admin-key-123")
        try:
            raise ConnectionError("Error connecting to redis://:pw@h:1/0")
        except ConnectionError:
            logger.exception("lost Redis")
    finally:
        logger.removeHandler(handler)
    assert records[0] == "worker on redis://:***@h:1/0 with key ***"
    assert "redis://:***@h:1/0" in records[1] and ":pw@" not in records[1]
