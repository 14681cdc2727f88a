"""gpt2core: GPT-2 in pure PyTorch — model, byte-level BPE tokenizer, sampling, HF model files.

No Ray, MLflow or web framework here: the pipelines and the server build on this library.
Names load on first use (PEP 562), so `from gpt2core import storage` in a Ray Data worker does
not import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"PRESETS": "config", "GPT2Config": "config", "GPT2": "model", "KVCache": "model",
            "ModelFileError": "modelfile", "generate": "generation", "sample": "sampling",
            "stream": "generation", "TextStream": "detokenize", "Tokenizer": "tokenizer",
            "TokenizerError": "tokenizer", "to_inference_dtype": "quant", "UserError": "errors"}

__all__ = ["GPT2", "GPT2Config", "KVCache", "ModelFileError", "PRESETS", "TextStream",
           "Tokenizer", "TokenizerError", "UserError", "generate", "sample", "stream",
           "to_inference_dtype"]

if TYPE_CHECKING:
    from gpt2core.config import PRESETS, GPT2Config
    from gpt2core.detokenize import TextStream
    from gpt2core.errors import UserError
    from gpt2core.generation import generate, stream
    from gpt2core.model import GPT2, KVCache
    from gpt2core.modelfile import ModelFileError
    from gpt2core.quant import to_inference_dtype
    from gpt2core.sampling import sample
    from gpt2core.tokenizer import Tokenizer, TokenizerError


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"gpt2core.{_EXPORTS[name]}"), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'gpt2core' has no attribute {name!r}")
