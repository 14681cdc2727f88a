"""Command-line flags from a config dataclass, so a stage never types its field list twice.

Each field becomes `--<name>`; its `metadata["help"]` is the help line and its default is the
flag's default. Types: `str`, `int`, `float`, `str | None`, `bool` (`--x`, plus `--no-x` when it
defaults to on) and `list[str]` (several values: `--corpus a.txt b.txt`).

    @dataclass
    class Config:
        seq_len: int = option(1024, "tokens per row")

    cfg = parse(Config, ["--seq_len", "256"], prog="gpt2 x")  # __post_init__'s ValueError: exit 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, aliases: Sequence[str] = ()) -> Any:
    """A dataclass field with its help line (and extra spellings of its flag)."""
    meta = {"help": help, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        kind = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": f.metadata.get("help", "")}
        if kind is bool:  # --x; a flag that defaults to on also gets --no-x
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="PATH")
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kwargs["type"] = args[0] if args else kind
        parser.add_argument(*names, **kwargs)
    return parser


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """Flags -> config. A bad value ends like any argparse error: one line, exit status 2."""
    parser = build_parser(cls, prog, description)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return cls(**vars(namespace))
    except ValueError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
