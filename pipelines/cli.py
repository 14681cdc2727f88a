"""The `gpt2` command: one face over every stage.

    gpt2 prepare|train|tune|evaluate|generate|visualize|serve [flags]
    gpt2 <command> --help          # the stage's own flags

A stage plugs in by being a module `pipelines/<stage>.py` with `main(argv=None) -> int | None`
and a line in STAGES below; `gpt2 <stage> ARGS` imports it only then and calls `main(ARGS)`,
so `gpt2 --help` imports neither torch nor Ray. `gpt2 serve` (pipelines/serve.py) starts the
Serve app by its import path (`serve.app:app`), so pipelines never import serve.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module whose main(argv) runs the stage, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("pipelines.prepare", "tokenize, pack and shard text into a dataset dir "
                "(Ray Data)"),
    "train": ("pipelines.train", "train a GPT-2 on a dataset dir into a model dir (Ray Train)"),
    "tune": ("pipelines.tune", "search hyperparameters over the train loop (Ray Tune)"),
    "evaluate": ("pipelines.evaluate", "loss, perplexity and bits per byte of a model dir"),
    "generate": ("pipelines.generate", "sample text from a model dir"),
    "visualize": ("pipelines.visualize", "plot a run's metrics from a model or run dir"),
    "serve": ("pipelines.serve", "serve a model dir over HTTP: /v1/completions (Ray Serve)"),
}

class _HelpFormatter(argparse.HelpFormatter):
    """argparse measures command names without their indent and wraps the longest; pad it."""

    def add_arguments(self, actions) -> None:
        super().add_arguments(actions)
        self._action_max_length += 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; it only lists the commands, each stage parses its own flags."""
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2 from raw text to a served model, on a laptop or a Ray cluster.",
        epilog="Run `gpt2 <command> --help` for the flags of one command.",
        formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="<command>", title="commands",
                                     required=True)
    for name, (_, help_text) in STAGES.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def run_stage(name: str, argv: list[str]) -> int:
    """Import the stage's module now, not before, and hand it the rest of the command line."""
    module_name = STAGES[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"gpt2 {name}: cannot import {e.name!r}, which it needs; install the project "
              "with its dependencies (pip install -e .).", file=sys.stderr)
        return 1
    return module.main(argv) or 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return run_stage(argv[0], argv[1:])
    parser = build_parser()
    parser.parse_args(argv)  # --help, no command, unknown command: prints and exits
    parser.print_usage(sys.stderr)  # not reached: a command name was dispatched above
    return 2


if __name__ == "__main__":
    sys.exit(main())
