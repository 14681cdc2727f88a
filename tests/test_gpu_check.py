"""bench/gpu_check.py (make gpu-check): without CUDA it says so and exits 0, having run
nothing; on a GPU it is the prepared check itself (not run by the test suite)."""

import json
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run make gpu-check")
def test_the_device_script_unpacks_the_bundle_and_runs_the_check(tmp_path):
    """bench/gpu_device.sh, what a lent GPU machine runs: here (no CUDA) it unpacks a bundle,
    runs gpu_check.py with the checkout on PYTHONPATH and keeps its log; a missing bundle is
    one sentence and exit 2."""
    import tarfile

    site = tmp_path / "site"
    site.mkdir()
    (site / "bundle_probe.py").write_text("")
    with tarfile.open(tmp_path / "bundle.tar.xz", "w:xz") as tar:
        tar.add(site, arcname=".")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    script = [str(ROOT / "bench" / "gpu_device.sh")]
    out = subprocess.run(["bash", *script, str(tmp_path / "bundle.tar.xz"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "no CUDA device is visible" in log and (tmp_path / "out" / "gpu.txt").exists()
    assert "torch " in out.stdout and "| ray 2." in out.stdout  # what it runs with
    missing = subprocess.run(["bash", *script, str(tmp_path / "none.tar.xz"), str(tmp_path)],
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "no bundle at" in missing.stderr


def test_the_table_shows_every_part():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import gpu_inference
    import gpu_training

    inference = {"decode": [{"batch": 32, "generate_tok_s": 9e3, "engine_compiled_tok_s": 2e4,
                             "transformers_tok_s": 3e3, "transformers_static_tok_s": 5e3,
                             "vs_transformers": 3.0, "compiled_vs_transformers": 6.67}],
                 "profile": [{"what": "engine compiled", "rows": 16, "kernels_per_step": 3,
                              "d2h_copies_per_step": 1, "syncs_per_step": 1,
                              "cpu_ms_per_step": 0.2, "device_ms_per_step": 1.5}],
                 "serve": [{"clients": 16, "tokens_per_s": 4000.0, "ttft_p50_s": 0.02,
                            "ttft_p99_s": 0.05, "p50_s": 0.3}],
                 "profile_error": "RuntimeError: y"}
    training = {"step": [{"batch": 16, "seq": 1024, "compile": False, "shard": False,
                          "loss_impl": "torch", "tokens_per_s": 4e5, "mfu": 0.3,
                          "first_step_s": 2.0, "max_memory_gb": 30.0},
                         {"batch": 32, "seq": 1024, "compile": True, "error": "RuntimeError: x"}],
                "pipeline": [{"compile": True, "ratio": 0.97,
                              "pipeline": {"tokens_per_s": 5e5, "mfu": 0.45, "windows": 6,
                                           "seconds": 90},
                              "bare": {"tokens_per_s": 5.15e5, "vocab": 8192}}]}
    results = {"machine": {"gpu": "NVIDIA H200", "capability": "9.0"},
               "gpu_tests": {"ok": True, "summary": "4 passed"},
               "train": {"ok": True, "table": gpu_training.table(training)},
               "inference": {"ok": True, "table": gpu_inference.table(inference)},
               "evaluate": {"ok": True, "seconds": 20}, "serve": {"ok": True, "seconds": 30}}
    text = gpu_check.table(results)
    for part in ("H200", "4 passed", "eager    16x1024", "400,000 tok/s  MFU  30.0 %",
                 "loss torch    first step 2.0 s, 30.0 GB", "compiled 32x1024",
                 "FAIL RuntimeError: x", "pipeline compiled", "= x0.97 the bare step (515,000",
                 "x3.00 / x6.67",
                 "static    5,000", "engine compiled    20,000", "3 kernels, 1 D2H, 1 syncs",
                 "16 clients      4,000 tok/s  TTFT p50 20 ms", "profile: FAIL RuntimeError: y",
                 "evaluate", "serve"):
        assert part in text, part


@pytest.mark.slow
def test_the_training_part_runs_end_to_end_on_a_cpu(tmp_path):
    """bench/gpu_training.py --device cpu --quick: every bare-step shape (compiled ones too)
    and the pipeline run beside its bare step, tiny, so the GPU run has no surprise of ours."""
    out = tmp_path / "training.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_training.py"), "--device",
                           "cpu", "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "step_error" not in result and "pipeline_error" not in result, result
    steps = result["step"]
    assert [("error" in r) for r in steps] == [False] * 5, steps
    assert [r["loss_impl"] for r in steps[:2]] == ["torch", "chunked"]  # chosen; forced
    assert all(r["tokens_per_s"] > 0 and r["first_step_s"] > 0 for r in steps)
    assert not any(r["compile_error"] for r in steps)
    (row,) = result["pipeline"]
    assert "error" not in row, row
    assert row["pipeline"]["windows"] >= 2 and 0 < row["ratio"] < 10
    assert "pipeline compiled" in done.stdout


@pytest.mark.slow
def test_the_inference_part_runs_end_to_end_on_a_cpu(tmp_path):
    """bench/gpu_inference.py --device cpu --quick: decode beside transformers, the per-step
    profile, the Serve app (compiled, as on a GPU) under 1, 16 and 64 clients, and the step
    beside a busy Python thread, tiny."""
    out = tmp_path / "inference.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_inference.py"),
                           "--device", "cpu", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not [k for k in result if k.endswith("_error")], result
    assert [r["batch"] for r in result["decode"]] == [1, 8, 32, 128]
    assert all(r["generate_tok_s"] > 0 and r["engine_compiled_tok_s"] > 0
               for r in result["decode"])
    steps = {(r["what"], r["rows"]): r for r in result["profile"]}
    assert set(steps) == {(w, n) for w in ("engine eager", "engine compiled", "serve Decoder")
                          for n in (1, 16)}
    assert steps["engine compiled", 16]["syncs_per_step"] == 0  # no host read in the step
    assert [r["clients"] for r in result["serve"]] == [1, 16, 64]
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["gap_ms"] > 0
               for r in result["serve"])  # the replica's step, and the gap between steps
    assert "serve  64 clients" in done.stdout
    assert [r["rows"] for r in result["gil"]] == [1, 16]  # the step beside a busy thread
    assert all(r["busy_0_ms"] > 0 and r["busy_100_ms"] > 0 for r in result["gil"])
    assert "step beside a busy Python thread, rows 16" in done.stdout
