"""gpt2core.modelfile: model dirs in the Hugging Face GPT-2 format, both ways, and bad dirs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2core import GPT2, GPT2Config, ModelFileError, Tokenizer, generate

transformers = pytest.importorskip("transformers")

CFG = GPT2Config(vocab_size=300, n_positions=48, n_embd=32, n_layer=2, n_head=4, n_inner=80)


@pytest.fixture
def ours() -> GPT2:
    torch.manual_seed(0)
    return GPT2(CFG).eval()


@pytest.fixture
def saved(ours, tmp_path):
    ours.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                  n_inner=80, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_our_dir_loads_in_transformers_with_the_same_logits(ours, saved):
    assert {"config.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    hf = transformers.GPT2LMHeadModel.from_pretrained(saved).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=0)


def test_transformers_dir_loads_in_ours_with_same_logits_and_greedy_text(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT2.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
        prompt = torch.tensor([[5, 6, 7, 8]])
        hf_ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                             do_sample=False, pad_token_id=0)
    assert generate(ours, prompt[0], 16, temperature=0.0) == hf_ids[0, 4:].tolist()


def test_bare_gpt2model_names_and_legacy_bin_load(ours, saved, tmp_path):
    """OpenAI's checkpoints on the Hub are GPT2Model dicts (no 'transformer.' prefix,
    attn.bias buffers); old dirs ship pytorch_model.bin instead of safetensors."""
    tensors = load_file(saved / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_text((saved / "config.json").read_text())
    torch.save(bare, d / "pytorch_model.bin")
    x = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(GPT2.from_pretrained(d).eval()(x), ours(x))


def test_save_writes_tokenizer_files_and_metadata(ours, tmp_path):
    tok = Tokenizer.train(["to be or not to be, that is the question"] * 20, vocab_size=300)
    ours.save_pretrained(tmp_path / "m", tokenizer=tok)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json",
            "merges.txt"} <= names
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_id and cfg["model_type"] == "gpt2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf_tok("to be or not")["input_ids"] == tok.encode("to be or not")


def test_overwrite_an_existing_dir(ours, saved):
    torch.manual_seed(1)
    other = GPT2(CFG).eval()
    other.save_pretrained(saved)
    x = torch.randint(0, 300, (1, 5))
    torch.testing.assert_close(GPT2.from_pretrained(saved).eval()(x), other(x))


# --- Bad dirs: one clear error each -------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        GPT2.from_pretrained(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        GPT2.from_pretrained(tmp_path)


def test_not_gpt2(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelFileError, match="model_type is 'llama'"):
        GPT2.from_pretrained(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        GPT2.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        GPT2.from_pretrained(saved)


def test_missing_tensor(saved):
    t = load_file(saved / "model.safetensors")
    del t["transformer.h.1.ln_2.weight"]
    save_file(t, saved / "model.safetensors")
    with pytest.raises(ModelFileError, match="'transformer.h.1.ln_2.weight' is missing"):
        GPT2.from_pretrained(saved)


def test_wrong_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "n_embd": 64, "n_inner": 160}))
    with pytest.raises(ModelFileError, match="has shape .* but config.json implies"):
        GPT2.from_pretrained(saved)


def test_extra_layers(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        GPT2.from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        GPT2.from_pretrained(saved)


def test_legacy_bin_with_pickled_code_is_refused(saved, tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    (saved / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "evil": ModelFileError("x")}, saved / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="refusing to unpickle"):
        GPT2.from_pretrained(saved)
