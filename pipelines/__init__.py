"""pipelines: the Ray jobs of gpt2-ray, one stage per file, and `cli.py`, the `gpt2` command.

Each stage (`prepare.py`, `train.py`, `tune.py`, `evaluate.py`, ...) runs as
`python pipelines/<stage>.py`, under `ray job submit`, or as `gpt2 <stage>`, with the same flags.
This package imports nothing at import time, so `gpt2 --help` stays instant.
"""
