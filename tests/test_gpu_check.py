"""bench/gpu_check.py (make gpu-check): without CUDA it says so and exits 0, having run
nothing; on a GPU it is the prepared check itself (not run by the test suite)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run make gpu-check")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--json",
                          str(tmp_path / "out.json")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device is visible" in out.stdout and "nothing was run" in out.stdout
    assert not (tmp_path / "out.json").exists()


def test_the_table_shows_every_part():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import gpu_inference

    inference = {"decode": [{"batch": 32, "generate_tok_s": 9e3, "engine_compiled_tok_s": 2e4,
                             "transformers_tok_s": 3e3, "transformers_static_tok_s": 5e3,
                             "vs_transformers": 3.0, "compiled_vs_transformers": 6.67}],
                 "profile": [{"what": "engine compiled", "rows": 16, "kernels_per_step": 3,
                              "d2h_copies_per_step": 1, "syncs_per_step": 1,
                              "cpu_ms_per_step": 0.2, "device_ms_per_step": 1.5}],
                 "serve": [{"clients": 16, "tokens_per_s": 4000.0, "ttft_p50_s": 0.02,
                            "ttft_p99_s": 0.05, "p50_s": 0.3}],
                 "profile_error": "RuntimeError: y"}
    results = {"machine": {"gpu": "NVIDIA H200", "capability": "9.0"},
               "gpu_tests": {"ok": True, "summary": "4 passed"},
               "train": [{"compile": False, "tokens_per_s": 4e5, "mfu": 0.3, "dtype": "bf16",
                          "batch": 16, "max_memory_gb": 30.0},
                         {"compile": True, "ok": False, "error": "RuntimeError: x"}],
               "inference": {"ok": True, "table": gpu_inference.table(inference)},
               "evaluate": {"ok": True, "seconds": 20}, "serve": {"ok": True, "seconds": 30}}
    text = gpu_check.table(results)
    for part in ("H200", "4 passed", "MFU  30.0 %", "FAIL RuntimeError: x", "x3.00 / x6.67",
                 "static    5,000", "engine compiled    20,000", "3 kernels, 1 D2H, 1 syncs",
                 "16 clients      4,000 tok/s  TTFT p50 20 ms", "profile: FAIL RuntimeError: y",
                 "evaluate", "serve"):
        assert part in text, part
