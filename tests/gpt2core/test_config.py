"""gpt2core.config: defaults, presets, validation, HF config.json round trip."""

import pytest

from gpt2core import GPT2Config


def test_n_inner_defaults_to_four_times_n_embd():
    assert GPT2Config(n_embd=64, n_head=4).n_inner == 256
    assert GPT2Config(n_embd=64, n_head=4, n_inner=100).n_inner == 100


@pytest.mark.parametrize("name,layers,dims", [("gpt2", 12, 768), ("gpt2-medium", 24, 1024),
                                              ("gpt2-large", 36, 1280), ("gpt2-xl", 48, 1600),
                                              ("tiny", 4, 128)])
def test_presets(name, layers, dims):
    c = GPT2Config.from_preset(name)
    assert (c.n_layer, c.n_embd) == (layers, dims)


def test_preset_overrides_and_unknown_preset():
    assert GPT2Config.from_preset("tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-medium"):
        GPT2Config.from_preset("gpt3")


@pytest.mark.parametrize("kw,msg", [(dict(n_embd=100, n_head=3), "divisible by n_head"),
                                    (dict(n_layer=0), "n_layer must be a positive"),
                                    (dict(dropout=1.0), "dropout")])
def test_invalid_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPT2Config(**kw)


def test_hf_dict_round_trip():
    c = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=80,
                   dropout=0.1)
    d = c.to_hf_dict(eos_token_id=299)
    assert d["model_type"] == "gpt2" and d["eos_token_id"] == 299
    assert GPT2Config.from_hf_dict(d) == c


def test_hf_dict_rejects_other_models():
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        GPT2Config.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        GPT2Config.from_hf_dict({"model_type": "gpt2", "reorder_and_upcast_attn": True})
