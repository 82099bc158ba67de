"""`python -m minigpt.generate ...`: the same as `minigpt generate ...` (the seed project's entry point).

A thin shim: every flag, default and error message lives in `minigpt.cli`, so the two spellings
can never drift apart.
"""

from __future__ import annotations

import sys
from typing import Sequence

from minigpt import cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run `minigpt generate` with `argv` (default: the process arguments)."""
    return cli.main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
