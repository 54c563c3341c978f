"""Schemathesis over the gateway's whole OpenAPI document (tests/openapi_fuzz.py): a gateway served for real on
loopback with a registered, patched model, the admin key on every request. No case may get a 5xx or no answer,
every error must be JSON with `error`, and the gateway must still serve the patched prediction afterwards.
Derandomized with a fixed number of cases per operation, so a run sends the same cases on every machine;
benchmarks/fuzz_long.py runs the long, seeded version."""

from __future__ import annotations

import json
import os

from tests.openapi_fuzz import assert_patched_prediction, fuzz, fuzz_world, problem

EXAMPLES = int(os.environ.get("FAIRPATCH_FUZZ_OPENAPI_EXAMPLES", "25"))  # per operation


def test_no_operation_of_the_openapi_document_gets_a_server_error(adult, adult_model, redis_url, tmp_path):
    with fuzz_world(adult, adult_model, redis_url, tmp_path / "gw") as world:
        assert_patched_prediction(world)
        tally = fuzz(world, EXAMPLES)
        print(tally.summary())
        assert not tally.findings, "\n".join(tally.findings[:20])
        # every operation was reached, and answered with more than its 404s: the real ids were used
        assert len(tally.operations) >= 34, sorted(tally.operations)
        assert tally.statuses[200] > 0 and tally.statuses[400] > 0, tally.summary()
        assert_patched_prediction(world)


class Answer:
    """An answer as schemathesis gives it (header values are lists)."""

    def __init__(self, status: int, kind: str, content: bytes) -> None:
        self.status_code, self.headers, self.content = status, {"content-type": [kind]}, content

    def json(self):
        return json.loads(self.content)


def test_the_fuzzer_takes_5xx_and_errors_without_error_json_as_findings():
    assert problem(Answer(200, "application/json", b"[]")) is None
    assert problem(Answer(404, "application/json", b'{"error": "no model x"}')) is None
    assert problem(Answer(500, "application/json", b'{"error": "boom"}')) == "server error 500"
    assert problem(Answer(502, "application/json", b'{"error": "upstream down"}')) == "server error 502"
    assert "content-type 'text/plain'" in problem(Answer(400, "text/plain", b"bad"))
    assert "not JSON" in problem(Answer(400, "application/json", b"{"))
    assert "without an `error`" in problem(Answer(422, "application/json", b'{"detail": []}'))
    assert "without an `error`" in problem(Answer(400, "application/json", b'{"error": ""}'))
