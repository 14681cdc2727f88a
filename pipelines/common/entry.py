"""What every stage's `main()` shares: bad input ends in one sentence and exit status 2.

Run as a file (`python pipelines/train.py`, `ray job submit -- python pipelines/train.py`), a
stage first puts the repository root in place of its own folder at sys.path[0], so it imports
`pipelines` (and Ray pickles its functions) by package, and its own folder shadows nothing.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


def user_error(prog: str, e: ValueError) -> int:
    """Bad input (gpt2core's and the pipelines' errors are all ValueErrors): one line on
    stderr, exit status 2. A ValueError raised inside Ray is not the user's: it goes on, with
    its traceback."""
    if type(e).__module__.startswith("ray"):
        raise e
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def stage_main(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a stage's `main(argv=None) -> int`: bad input raised anywhere in it ends as
    user_error says, with exit status 2."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except ValueError as e:
                return user_error(prog, e)
        return run
    return decorate
