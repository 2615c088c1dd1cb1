"""Progress bars for long loops (download, decode, write): tqdm on stderr, quiet with RESNET_PROGRESS=0.

On a terminal the bar redraws twice a second; in a log (CI, `ray job logs`) it prints a line every 10 s, so
long work stays visible without flooding the log.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(
    iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "img"
) -> Any:
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        disable=os.environ.get("RESNET_PROGRESS") == "0",
        leave=True,  # the finished bar stays: a record of how much and how fast
    )
