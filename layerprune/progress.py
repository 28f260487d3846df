"""Progress bars that behave in a terminal and in a log: ``tqdm`` as usual on a terminal; elsewhere (a log file, a
pipe, CI) one plain ASCII line per refresh, at most every ``LOG_INTERVAL`` seconds, instead of carriage-return
redraws that pile up into one long line."""
from __future__ import annotations

import re
import sys

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of a bar in a log
_CONTROL = re.compile(r"\r|\x1b\[A")  # carriage returns and cursor-up moves (nested bars)


class _Lines:
    """A stream for tqdm that writes each refresh as its own line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = _CONTROL.sub("", s).rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def tqdm(iterable=None, **kw):
    """``tqdm.auto.tqdm``, with the log behaviour above when stderr is not a terminal."""
    stream = kw.get("file") or sys.stderr
    if not kw.get("disable") and not getattr(stream, "isatty", lambda: False)():
        kw.update(file=_Lines(stream), dynamic_ncols=False, ascii=True, leave=True)  # a log keeps the final count
        kw.setdefault("mininterval", LOG_INTERVAL)
        kw.setdefault("ncols", 100)
    return _tqdm(iterable, **kw)
