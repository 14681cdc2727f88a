"""The official openai client, unmodified, against the server's /v1."""

import pytest

openai = pytest.importorskip("openai")  # a dev dependency; importorskip only for partial envs

pytestmark = pytest.mark.slow


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_completion(oai):
    (model,) = [m.id for m in oai.models.list()]
    out = oai.completions.create(model=model, prompt="ROMEO:", max_tokens=10, seed=5,
                                 top_p=0.9, temperature=0.8)
    assert out.model == model and len(out.choices) == 1
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 10


def test_streaming_matches_non_streaming(oai):
    ask = {"model": "tiny-gpt2", "prompt": "JULIET:", "max_tokens": 16, "seed": 11, "n": 2}
    whole = oai.completions.create(**ask)
    texts = ["", ""]
    for chunk in oai.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]


def test_errors_arrive_as_openai_errors(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny-gpt2", prompt="x", max_tokens=5, top_p=2.0)
    assert info.value.status_code == 400 and info.value.param == "top_p"
