"""Command-line flags from a config dataclass or a pydantic model, so nobody types a field list
twice.

Each field becomes `--<name>`; its help line is a dataclass field's `metadata["help"]` (see
`option`) or a pydantic field's description, and its default is the flag's default, shown once
by the help formatter. A field without a default is a required flag. Types: `str`, `int`,
`float`, `X | None`, `bool` (`--x`, plus `--no-x` when it defaults to on) and `list[str]`
(several values: `--corpus a.txt b.txt`). A pydantic model serves flags for a class this package
may not import by name (`gpt2 serve` loads the Serve app's args model by import path).

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
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, aliases: Sequence[str] = ()) -> Any:
    """A dataclass field with its help line (and extra spellings of its flag)."""
    meta = {"help": help, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An empty parser whose help shows each flag's default."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _fields(cls: type) -> list[tuple[str, Any, Any, str, tuple[str, ...]]]:
    """(name, type, default or MISSING, help, extra spellings) of each field of a config
    dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name],
                 f.default_factory() if f.default_factory is not dataclasses.MISSING
                 else f.default, f.metadata.get("help", ""), f.metadata.get("aliases", ()))
                for f in dataclasses.fields(cls)]
    return [(name, f.annotation, dataclasses.MISSING if f.is_required() else f.get_default(),
             " ".join((f.description or "").split()), ())
            for name, f in cls.model_fields.items()]  # a pydantic BaseModel


def add_flags(parser: argparse.ArgumentParser, cls: type,
              aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add a flag per field of `cls` (a dataclass or a pydantic model); `aliases` adds extra
    spellings by field name, e.g. {"model_dir": ["--model_path"]}."""
    for name, kind, default, help, more in _fields(cls):
        names = [f"--{name}", *more, *(aliases or {}).get(name, ())]
        kwargs: dict[str, Any] = {"dest": name, "help": help}
        if default is dataclasses.MISSING:  # required: no default to show
            kwargs.update(required=True, default=argparse.SUPPRESS)
        else:
            kwargs["default"] = default
        if kind is bool:  # --x; a flag that defaults to on also gets --no-x
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="PATH")
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kwargs["type"] = args[0] if args else kind
        parser.add_argument(*names, **kwargs)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = new_parser(prog, description)
    add_flags(parser, cls)
    return parser


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """Flags -> config. A bad value ends like any argparse error: one line, exit status 2."""
    parser = build_parser(cls, prog, description)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return cls(**vars(namespace))
    except ValueError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
