"""What every stage's `main()` shares: bad input (a UserError) ends in one sentence and exit
status 2, a `Failure` in one sentence and exit status 1, anything else with its traceback;
`one_document` keeps `--json` output clean.

Run as a file (`python pipelines/train.py`, `ray job submit -- python pipelines/train.py`), a
stage first puts the repository root in place of its own folder at sys.path[0], so it imports
`pipelines` (and Ray pickles its functions) by package, and its own folder shadows nothing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from gpt2core.errors import UserError


class Failure(Exception):
    """A failure that is not the user's input but is understood (a bug of ours found early, a
    broken node): one line on stderr, exit status 1."""


def stage_main(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a stage's `main(argv=None) -> int`: a UserError raised anywhere in it (bad
    input, gpt2core/errors.py) ends as one line on stderr and exit status 2, a Failure as one
    line and exit status 1. Anything else, a ValueError from inside a library included, is not
    the user's: it goes on, with its traceback (exit status 1)."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except UserError as e:
                if type(e).__module__.startswith("ray"):  # a Ray task's error, wrapped: a
                    raise  # worker's input check that failed there is a bug of ours
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            except Failure as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 1
        return run
    return decorate


@contextlib.contextmanager
def one_document() -> Iterator[TextIO]:
    """stdout for one machine-readable document (`--json`): yields the real stdout, and sends
    everything else written to stdout (Ray's forwarded worker and raylet lines, a library's
    print) to stderr. At the file descriptor when stdout is the process's fd 1 (C code's writes
    too) and for the rest of the process, since Ray's log threads print until it exits;
    otherwise (stdout captured, e.g. by pytest) by sys.stdout, restored afterwards."""
    document, saved = sys.stdout, sys.stdout
    try:
        is_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, io.UnsupportedOperation):
        is_fd1 = False
    if is_fd1:
        sys.stdout.flush()
        document = os.fdopen(os.dup(1), "w", encoding=sys.stdout.encoding)
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield document
    finally:
        document.flush()
        if not is_fd1:
            sys.stdout = saved
