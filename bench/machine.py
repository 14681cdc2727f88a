"""The machine a benchmark ran on, recorded in every results JSON (bench scripts import it)."""

import datetime
import os
import platform
from pathlib import Path


def machine_info(**extra) -> dict:
    """CPU model, cores, platform, Python, torch and the date, plus whatever the caller adds."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_at_start": os.getloadavg()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
