"""Command-line flags from a config dataclass or a pydantic model, so nobody types a field list
twice.

Each field becomes `--<name>`; its help line is a dataclass field's `metadata["help"]` (see
`option`) or a pydantic field's description, and its default is the flag's default, shown once
by the help formatter. A field without a default is a required flag. Types: `str`, `int`,
`float`, `X | None`, `bool` (`--x`, plus `--no-x` when it defaults to on), `bool | None`
(`--x` and `--no-x`; None when neither is given) and `list[str]`
(several values: `--corpus a.txt b.txt`). A pydantic model serves flags for a class this package
may not import by name (`gpt2 serve` loads the Serve app's args model by import path).

`parse` also gives every stage `-v/--verbose` (Ray's own logs on the console: see
ray_session.init_ray) and ends `--help` with the first example commands of the stage's
docstring. A help line should read on its own and name its unit; the formatter adds the
default, so a help line never states it (one that means "absent" says what absence does).

    @dataclass
    class Config:
        seq_len: int = option(1024, "tokens per row")

    cfg = parse(Config, ["--seq_len", "256"], prog="gpt2 x")  # __post_init__'s ValueError: exit 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


VERBOSE_ENV = "GPT2_VERBOSE"  # what --verbose sets; also for `ray job submit` jobs


def verbose() -> bool:
    """Whether Ray's own logs go to the console (--verbose, or GPT2_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def option(default: Any, help: str, *, aliases: Sequence[str] = (),
           required: bool = False) -> Any:
    """A dataclass field with its help line (and extra spellings of its flag); `required`: a
    flag the command line must give although the dataclass has a default (for callers that
    fill it in later)."""
    meta = {"help": help, "aliases": tuple(aliases), "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Each flag's default once, where it says something: not for a flag that is off, empty
    or absent by default (its help says what absence does). The epilog's examples unwrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], "") or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def examples(doc: str, most: int = 3) -> str:
    """Up to `most` lines of a docstring's first indented block, as --help's closing lines; a
    command continued over lines (joined into one long line in a docstring) is left out."""
    block = itertools.takewhile(lambda line: line.startswith("    "),
                                itertools.dropwhile(lambda line: not line.startswith("    "),
                                                    doc.splitlines()[1:]))
    lines = [line for line in block if len(line) <= 100][:most]
    return "examples:\n" + "\n".join(lines) if lines else ""


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An empty parser whose help shows each flag's default. `description`: a line, or a
    stage's module docstring (its first line, then its examples at the end of --help)."""
    first = description.strip().split("\n")[0]
    return argparse.ArgumentParser(prog=prog, description=first, epilog=examples(description),
                                   formatter_class=_HelpFormatter)


def _fields(cls: type) -> list[tuple[str, Any, Any, str, tuple[str, ...]]]:
    """(name, type, default or MISSING, help, extra spellings) of each field of a config
    dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name],
                 dataclasses.MISSING if f.metadata.get("required")
                 else f.default_factory() if f.default_factory is not dataclasses.MISSING
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
            kwargs.update(required=True, default=argparse.SUPPRESS, help=f"{help} (required)")
        else:
            kwargs["default"] = default
        if kind is bool:  # --x; a flag that defaults to on also gets --no-x
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif kind == bool | None:  # --x / --no-x, None (decided later) when neither is given
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="PATH")
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kwargs["type"] = args[0] if args else kind
        parser.add_argument(*names, **kwargs)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """`cls`'s flags and -v/--verbose; `description` as new_parser takes it."""
    parser = new_parser(prog, description)
    add_flags(parser, cls)
    add_verbose(parser)
    return parser


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Ray Train's and Ray Data's own logs and progress "
                             "on the console (also: GPT2_VERBOSE=1)")


def set_verbose(flag: bool) -> None:
    """--verbose, recorded in GPT2_VERBOSE for ray_session and the processes this one starts;
    without it (nor GPT2_VERBOSE) MLflow's INFO lines go too."""
    if flag:
        os.environ[VERBOSE_ENV] = "1"
    elif not verbose():  # MLflow's INFO lines (a new store's tables) too; read at its import
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        import logging

        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """Flags -> config. A bad value ends like any argparse error: one line, exit status 2.
    `description`: the stage's module docstring (see new_parser)."""
    parser = build_parser(cls, prog, description)
    namespace = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    set_verbose(namespace.pop("verbose"))
    try:
        return cls(**namespace)
    except ValueError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
