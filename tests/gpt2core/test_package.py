"""gpt2core stays a pure PyTorch library: importing it pulls in no Ray, MLflow or FastAPI."""

import subprocess
import sys


def test_import_pulls_no_ray_mlflow_or_fastapi():
    code = ("import sys, gpt2core; bad = [m for m in ('ray', 'mlflow', 'fastapi') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_api():
    import gpt2core

    for name in ("GPT2Config", "GPT2", "Tokenizer", "generate", "stream"):
        assert hasattr(gpt2core, name)
