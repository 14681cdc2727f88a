"""The machine a benchmark ran on, recorded in every results JSON (bench scripts import it)."""

import datetime
import os
import platform
from pathlib import Path

# what decides a CPU's matmul speed per dtype (AVX2, AVX-512, int8 dot products, bf16, AMX)
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def write_results(results: dict, path: str) -> None:
    """A benchmark's results as JSON at `path` (its folder made), and where they went."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def machine_info(**extra) -> dict:
    """CPU model and SIMD flags, cores, platform, Python, torch, load and the date, plus extra."""
    import torch

    cpu, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_at_start": os.getloadavg()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
