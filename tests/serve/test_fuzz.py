"""schemathesis against the running app's own /openapi.json: every operation, bounded
examples, bodies that fit the schema and bodies that do not; no answer may be a 5xx, every
error is OpenAI's error JSON, and the server lives on.

(schemathesis's pytest plugin does not run under this pytest, so each operation's strategy is
driven by hypothesis directly.)"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

pytestmark = pytest.mark.slow
NO_INPUTS = {"/v1/models", "/healthz", "/v1/models/{model}"}  # or only a free string


def test_no_input_is_a_server_error(server, client):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/generate", "/v1/models",
                                              "/v1/models/{model}", "/healthz"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=server, timeout=120)
                case.validate_response(response, checks=[not_a_server_error])
                seen.setdefault(op.path, set()).add(response.status_code)
                if response.status_code >= 400:  # OpenAI's error JSON
                    assert set(response.json()["error"]) == {"message", "type", "param",
                                                             "code"}, response.text

            try:
                run()
            except Unsatisfiable:  # nothing to get wrong: no input that can misfit
                assert mode is GenerationMode.NEGATIVE and op.path in NO_INPUTS, op.path
    assert 200 in seen["/v1/completions"] and 400 in seen["/v1/completions"], seen
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4})
    assert r.status_code == 200
