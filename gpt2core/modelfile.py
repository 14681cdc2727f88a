"""Model dirs in the Hugging Face GPT-2 format: the contract between train, evaluate and serve.

A model dir holds `config.json` (model_type gpt2), `model.safetensors` (HF names and layouts) and
the tokenizer files. `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads what we write, and
we load what it writes, including OpenAI's released weights converted by HF.

Our module names already match the checkpoint's; the one difference is that HF (like OpenAI's
TensorFlow code) stores the four projection matrices as Conv1D weights, (in, out), while
nn.Linear holds (out, in). Loading never unpickles: safetensors, or `torch.load(weights_only=True)`
for legacy `pytorch_model.bin` files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2core import storage
from gpt2core.config import GPT2Config
from gpt2core.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints (large models)
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")
# HF GPT-2 checkpoints may carry the causal-mask buffers; they are constants, not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class ModelFileError(UserError):
    """A model dir that is missing, corrupt, or not a GPT-2; the message says which and why."""


def read_config(path: str | Path) -> GPT2Config:
    """The GPT2Config described by `path/config.json` (a local dir or a URI: s3://…)."""
    if not storage.is_dir(path):
        raise ModelFileError(f"model dir {path} does not exist; pass a directory holding "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE} (as written by training)")
    cfg_file = storage.join(path, CONFIG_FILE)
    try:
        raw = json.loads(storage.read_text(cfg_file))
    except FileNotFoundError:
        raise ModelFileError(f"{path} has no {CONFIG_FILE}; it is not a model dir") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{cfg_file} is not valid JSON ({e}); the model dir is corrupt") \
            from None
    try:
        return GPT2Config.from_hf_dict(raw)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{cfg_file}: {e}") from None


def read_weights(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load the weights of a model dir as a GPT2 state dict, checking them against `shapes`,
    every tensor the config implies (gpt2core.model.state_shapes(config))."""
    if storage.is_uri(path):
        with storage.local_copy(path) as local:
            return read_weights(local, shapes)
    path = Path(path)
    hf = _read_tensor_files(path)
    state = from_hf_state_dict(hf, where=path)
    _check_state(state, shapes, where=path)
    return state


def write_model_dir(path: str | Path, config: GPT2Config, state_dict: dict[str, torch.Tensor],
                    tokenizer=None) -> None:
    """Write config.json, model.safetensors and (if given) the tokenizer files into `path`.

    Files are written into a temporary dir beside `path` and moved in only when all are
    complete, so an interrupted save never leaves a dir that looks loadable but is not.
    """
    if any(name.endswith(".qweight") for name in state_dict):
        raise ModelFileError(f"cannot write {path}: the model is int8 (converted for inference); "
                             "model dirs hold float weights, so save it before converting")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        eos = tokenizer.eos_id if tokenizer is not None else None
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(eos), indent=2) + "\n")
        save_file(to_hf_state_dict(state_dict), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
            _write_tokenizer_config(tmp, tokenizer, config)
        if not path.exists():
            os.rename(tmp, path)
            return
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        for stale in (INDEX_FILE, LEGACY_WEIGHTS_FILE):  # older weights would shadow or confuse
            (path / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Name and layout conversion ---------------------------------------------------------------


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GPT2LMHeadModel tensors (Conv1D transposed; tied head stored once)."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; HF re-ties it on load
        t = t.detach().cpu()
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()  # (out, in) -> (in, out)
        out[name] = t.contiguous()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor],
                       where: Path | str = "") -> dict[str, torch.Tensor]:
    """HF tensors (GPT2LMHeadModel or bare GPT2Model names) -> our state dict."""
    state = {}
    for name, t in hf.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name  # GPT2Model checkpoints (OpenAI's) lack the prefix
        if name.endswith(CONV1D_SUFFIXES) and t.dim() == 2:
            t = t.t()
        state[name] = t.contiguous()
    wte = state.get("transformer.wte.weight")
    head = state.pop("lm_head.weight", None)
    if wte is not None and head is not None and not torch.equal(head, wte):
        raise ModelFileError(f"{where}: lm_head.weight differs from transformer.wte.weight; "
                             "GPT-2 ties them, so this checkpoint is not a GPT-2")
    if wte is not None:
        state["lm_head.weight"] = wte
    return state


# --- Helpers ----------------------------------------------------------------------------------


def _read_tensor_files(path: Path) -> dict[str, torch.Tensor]:
    files = _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".bin":
                # Legacy pickle format: weights_only refuses anything but tensors and containers.
                loaded = torch.load(f, map_location="cpu", weights_only=True)
            else:
                loaded = load_file(str(f))
        except pickle.UnpicklingError:
            raise ModelFileError(f"{f} holds pickled objects other than tensors; refusing to "
                                 "unpickle it (that could run code) — convert it to "
                                 "model.safetensors with a tool you trust") from None
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise ModelFileError(f"cannot read weights file {f} ({e}); it is corrupt or "
                                 "truncated — re-export or re-download the model") from None
        if not isinstance(loaded, dict):
            raise ModelFileError(f"{f} does not hold a dict of tensors; it is not a checkpoint")
        tensors.update(loaded)
    return tensors


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelFileError(f"{path / INDEX_FILE} is corrupt ({e})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / LEGACY_WEIGHTS_FILE).is_file():
        return [path / LEGACY_WEIGHTS_FILE]
    raise ModelFileError(f"{path} has no {WEIGHTS_FILE} (nor {INDEX_FILE} or "
                         f"{LEGACY_WEIGHTS_FILE}); the model dir is incomplete")


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                 where: Path) -> None:
    """Every tensor the config implies, with its shape; nothing else."""
    for name, shape in expected.items():
        if name not in state:
            raise ModelFileError(f"{where}: tensor {name!r} is missing; the weights are incomplete "
                                 "or were saved for a different model")
        if tuple(state[name].shape) != shape:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"but config.json implies {shape}; config and weights disagree")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ModelFileError(f"{where}: unexpected tensors {extra[:3]}; config.json implies "
                             "fewer, so the weights belong to another model")
    for name, t in state.items():
        if not t.is_floating_point():
            raise ModelFileError(f"{where}: tensor {name!r} has dtype {t.dtype}, "
                                 "not floating point")


def _write_tokenizer_config(path: Path, tokenizer, config: GPT2Config) -> None:
    """Lets `transformers.AutoTokenizer.from_pretrained(dir)` pick the fast tokenizer."""
    eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.n_positions,
           "eos_token": eos, "bos_token": eos, "unk_token": eos, "add_prefix_space": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
