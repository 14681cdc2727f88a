"""HTTP tests against a running Serve app (tests/serve/conftest.py starts it once)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def sse_chunks(response: httpx.Response) -> list:
    """The data of each Server-Sent Event, [DONE] last."""
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    data = [e[len("data: "):] for e in events]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error


def test_healthz_and_models(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["n_positions"] == 128
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [health["model"]] == ["tiny-gpt2"]


def test_completion_has_the_openai_shape(client):
    body = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 8,
                                                "seed": 1}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_same_seed_same_text_and_generate_agrees(client):
    ask = {"prompt": "JULIET:", "max_tokens": 12, "seed": 7, "top_p": 0.8}
    a = client.post("/v1/completions", json=ask).json()["choices"][0]
    b = client.post("/v1/completions", json=ask).json()["choices"][0]
    assert a["text"] == b["text"]
    gen = client.post("/generate", json={"prompt": "JULIET:", "max_tokens": 12, "seed": 7,
                                         "nucleus_prob": 0.8}).json()
    assert gen["text"] == a["text"] and gen["finish_reason"] == a["finish_reason"]
    assert 0 < gen["tokens"] <= 12


def test_stream_equals_non_stream_under_the_same_seed(client):
    ask = {"prompt": ["ROMEO:", "The quick"], "n": 2, "max_tokens": 20, "seed": 3,
           "temperature": 0.9}
    whole = client.post("/v1/completions", json=ask).json()
    streamed = client.post("/v1/completions", json={**ask, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(streamed)
    assert chunks[-1]["choices"] == [] and all(c["choices"] for c in chunks[:-1])
    texts, finish = [""] * 4, [None] * 4
    for chunk in chunks[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    assert texts == [c["text"] for c in whole["choices"]]
    assert finish == [c["finish_reason"] for c in whole["choices"]]
    assert chunks[-1]["usage"] == whole["usage"]
    assert len(set(texts)) > 1  # choices differ: each has its own seed
    # without include_usage, OpenAI sends no usage chunk: every chunk has a choice
    plain = sse_chunks(client.post("/v1/completions", json={**ask, "stream": True}))
    assert all(c["choices"] for c in plain) and not any(c.get("usage") for c in plain)


def test_stop_string_cuts_the_text(client):
    ask = {"prompt": "ROMEO:", "max_tokens": 30, "seed": 2}  # a seed: the same text each time
    text = client.post("/v1/completions", json=ask).json()["choices"][0]["text"]
    clean = [i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
    if not clean:
        pytest.skip(f"no clean 2-character stop string in {text!r}")
    stop = text[clean[0]:clean[0] + 2]
    for stream in (False, True):
        r = client.post("/v1/completions", json={**ask, "stop": [stop, "never"], "stream": stream})
        if stream:
            choices = [c for chunk in sse_chunks(r) for c in chunk["choices"]]
            got = "".join(c["text"] for c in choices)
            reason = choices[-1]["finish_reason"]
        else:
            got, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert got == text[:text.index(stop)]
        assert reason == "stop"


def test_16_concurrent_requests_succeed_and_are_batched(client, server):
    def ask(i: int) -> httpx.Response:
        return httpx.post(f"{server}/v1/completions", timeout=120,
                          json={"prompt": f"Request {i}:", "max_tokens": 24, "seed": i})

    before, before_rows = (client.get("/healthz").json()["batches"][k] for k in ("count", "rows"))
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    batches = client.get("/healthz").json()["batches"]
    steps = batches["count"] - before
    new = batches["recent"][-min(steps, 32):]  # rows per decode step, the last 32 steps
    assert max(new) > 1, f"no request shared a batch: batch sizes {new}"
    # continuous batching: 16 x 24 tokens took far fewer steps than tokens
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    assert tokens > 16 and steps <= tokens / 4, (steps, tokens, new)
    # the step's time and the event loop's gap between steps, as a GPU run reads them
    assert batches["step_seconds"] > 0 and batches["gaps"] > 0 and batches["gap_seconds"] > 0
    # rows over all steps: a token each, and one more for each row that ended at eos
    assert tokens <= batches["rows"] - before_rows <= tokens + 16


def test_a_disconnected_stream_stops_decoding(client, server):
    before = client.get("/healthz").json()["batches"]["count"]
    body = {"prompt": "ROMEO:", "max_tokens": 127, "stream": True, "seed": 3}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first chunk has come; then the client goes away
    deadline = time.time() + 30
    while (health := client.get("/healthz").json())["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health["running"] == 0 and health["waiting"] == 0
    steps = health["batches"]["count"] - before
    assert steps < 100, f"the abandoned row went on for {steps} of its 127 tokens"


INVALID = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 5}, "prompt"),
    ([1, 2], None),
]


@pytest.mark.parametrize(("body", "param"), INVALID, ids=[str(b) for b, _ in INVALID])
def test_invalid_input_is_a_400_with_the_error_shape(client, body, param):
    assert_error(client.post("/v1/completions", json=body), 400, param)
    assert client.get("/healthz").json()["status"] == "ok"


def test_prompt_beyond_the_context_names_both_limits(client):
    prompt = "ROMEO: " * 40  # well over 100 tokens with a 300-token vocabulary
    error = assert_error(client.post("/v1/completions", json={"prompt": prompt,
                                                              "max_tokens": 100}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert "128" in error["message"] and "max_tokens is 100" in error["message"]
    assert_error(client.post("/generate", json={"prompt": prompt, "max_tokens": 100}), 400)


@pytest.mark.parametrize("content", [b"{not json", b"", "\xff".encode("latin-1")])
def test_malformed_json_is_a_400(client, content):
    r = client.post("/v1/completions", content=content,
                    headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"


def test_body_over_the_limit_is_a_413(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 70_000})
    assert assert_error(r, 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit still holds while reading
        for _ in range(80):
            yield b" " * 1024
    r = client.post("/generate", content=chunked())
    assert_error(r, 413)
    assert client.get("/healthz").json()["status"] == "ok"


def test_over_capacity_is_a_503_with_retry_after(server):
    """/tight holds one request and queues one; the rest are turned away at once."""
    def ask(i: int) -> httpx.Response:
        return httpx.post(f"{server}/tight/v1/completions", timeout=120,
                          json={"prompt": "ROMEO:", "max_tokens": 100, "seed": i})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1
    assert httpx.get(f"{server}/tight/healthz").json()["status"] == "ok"


def test_playground_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "v1/completions" in r.text and "<script" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # self-contained: no CDN


def test_a_dtype_int8_app_decodes_with_int8_weights(server):
    """/tight runs with dtype=int8 (conftest): its replica reports it and completes requests,
    seeded completions repeat; the default app stays float32."""
    assert httpx.get(f"{server}/healthz").json()["dtype"] == "float32"
    assert httpx.get(f"{server}/tight/healthz").json()["dtype"] == "int8"
    body = {"prompt": "ROMEO:", "max_tokens": 8, "seed": 3}
    first = httpx.post(f"{server}/tight/v1/completions", json=body, timeout=120)
    again = httpx.post(f"{server}/tight/v1/completions", json=body, timeout=120)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] >= 1
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
