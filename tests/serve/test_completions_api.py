"""OpenAI completions parity over HTTP: logprobs, echo, best_of, penalties, logit_bias, prompt
shapes, the declared API (/openapi.json, offline /docs). tests/serve/conftest.py starts the app."""

import json

import numpy as np
import pytest
import torch

from gpt2core import GPT2, Tokenizer
from gpt2core.scoring import score
from serve.completions import token_text

pytestmark = pytest.mark.slow

TEXT = "ROMEO: What light through yonder window breaks? JULIET: O Romeo, Romeo!"


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_equal_evaluates_scoring(client, tok, model_dir):
    """What lm-eval-harness asks: echo, logprobs, max_tokens 0 and a token-id prompt; the
    log-likelihood is what gpt2core.scoring (gpt2 evaluate's scorer) computes."""
    ids = tok.encode(TEXT)
    body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert lp["tokens"] == [token_text(tok, i) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                             "total_tokens": len(ids)}
    model = GPT2.from_pretrained(model_dir).eval()
    ref = score(model, [np.array(ids)], window=128, stride=64, batch=1, device="cpu")
    served = -sum(lp["token_logprobs"][1:])
    assert ref["count"] == len(ids) - 1
    assert abs(served / ref["count"] - ref["nats"] / ref["count"]) < 1e-4
    # the same text as a string prompt scores the same
    text = complete(client, prompt=TEXT, max_tokens=0, echo=True, logprobs=0)
    assert text["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def test_generated_logprobs_are_the_models(client, tok, model_dir):
    body = complete(client, prompt="JULIET:", max_tokens=6, temperature=0, logprobs=3)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"][0] == len("JULIET:")  # offsets count the prompt's characters
    if not any(t.startswith("bytes:") for t in lp["tokens"]):
        assert "".join(lp["tokens"]) == choice["text"]
    model = GPT2.from_pretrained(model_dir).eval()
    ids = tok.encode("JULIET:")
    with torch.no_grad():
        for token_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
            nxt = int(logp.argmax())  # greedy: the sampled token is the likeliest
            assert abs(token_lp - float(logp[nxt])) < 1e-4
            assert len(top) == 3 and abs(max(top.values()) - token_lp) < 1e-6
            ids.append(nxt)


def test_best_of_returns_the_likeliest_candidates(client):
    ask = {"prompt": "ROMEO:", "max_tokens": 8, "seed": 21, "logprobs": 0}
    candidates = complete(client, **ask, n=4)["choices"]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    best = complete(client, **ask, n=2, best_of=4)
    expected = [candidates[i]["text"] for i in sorted(np.argsort(sums)[::-1][:2])]
    assert [c["text"] for c in best["choices"]] == expected
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["tokens"]) for c in candidates)  # every candidate was generated


def test_logit_bias_and_penalties_follow_openais_formula(client, tok):
    x, y = tok.encode(" the")[0], tok.encode(" O")[0]
    bias = {str(x): 100.0, str(y): 99.0}

    def ids(**extra) -> list[int]:
        lp = complete(client, prompt="ROMEO:", max_tokens=5, temperature=0, logprobs=0,
                      logit_bias=bias, **extra)["choices"][0]["logprobs"]["tokens"]
        return [tok.encode(t)[0] for t in lp]

    assert ids() == [x] * 5
    # frequency: x pays 2 per use, so x (100) and y (99) alternate: 100, 99, 98, 97, ...
    assert ids(frequency_penalty=2.0) == [x, y, x, y, x]
    # presence: a flat 2 once used: x 98 then stays above y's 97
    assert ids(presence_penalty=2.0) == [x, y, x, x, x]


def test_prompt_shapes_agree(client, tok):
    a, b = "ROMEO:", "The quick"
    ask = {"max_tokens": 6, "seed": 5, "n": 2}
    as_text = complete(client, prompt=[a, b], **ask)["choices"]
    as_ids = complete(client, prompt=[tok.encode(a), tok.encode(b)], **ask)["choices"]
    assert [c["text"] for c in as_text] == [c["text"] for c in as_ids]
    one = complete(client, prompt=tok.encode(a), **ask)["choices"]
    assert [c["text"] for c in one] == [c["text"] for c in as_text[:2]]
    echoed = complete(client, prompt=a, max_tokens=3, seed=1, echo=True, user="u-1")
    plain = complete(client, prompt=a, max_tokens=3, seed=1)
    assert echoed["choices"][0]["text"] == a + plain["choices"][0]["text"]


def test_stream_with_echo_and_logprobs_equals_the_whole(client):
    ask = {"prompt": "JULIET:", "max_tokens": 10, "seed": 4, "echo": True, "logprobs": 2}
    whole = complete(client, **ask)["choices"][0]
    r = client.post("/v1/completions", json={**ask, "stream": True})
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for c in chunks for v in c["logprobs"][key]] == whole["logprobs"][key]


BAD = [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprob": 1}, "logprob"),  # a misspelt field is named, not dropped
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": [1, 100000]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": "x", "n": 16, "best_of": 16, "max_tokens": 1} | {"prompt": ["a"] * 9},
     "prompt"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[str(b)[:60] for b, _ in BAD])
def test_bad_parameters_are_400s_naming_the_field(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_models_by_id(client):
    card = client.get("/v1/models/tiny-gpt2").json()
    assert card["id"] == "tiny-gpt2" and card["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_openapi_declares_the_bodies_and_docs_work_offline(client):
    spec = client.get("/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/generate", "GenerateRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].endswith(model)
        assert "400" in spec["paths"][path]["post"]["responses"]
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"logprobs", "echo", "best_of", "logit_bias", "stream_options", "suffix",
            "user"} <= set(fields)
    assert "/v1/models/{model}" in spec["paths"]
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
