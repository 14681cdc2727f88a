"""gpt2core: GPT-2 in pure PyTorch — model, byte-level BPE tokenizer, sampling, HF model files.

No Ray, MLflow or web framework here: the pipelines and the server build on this library.
"""

from gpt2core.config import PRESETS, GPT2Config
from gpt2core.model import GPT2, KVCache
from gpt2core.modelfile import ModelFileError
from gpt2core.sampling import generate, sample, stream
from gpt2core.tokenizer import Tokenizer, TokenizerError

__all__ = ["GPT2", "GPT2Config", "KVCache", "ModelFileError", "PRESETS", "Tokenizer",
           "TokenizerError", "generate", "sample", "stream"]
