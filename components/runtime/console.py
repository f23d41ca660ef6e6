"""Console output that reads well in a log file: progress as lines when stderr is not a terminal.

Why: a run whose stderr goes to a file or a pipe (`sa2crq compare`'s stages, `... 2> run.log`, CI) got
every progress-bar refresh as a carriage-return frame, thousands per bar. On a terminal nothing changes.
`lines_when_redirected` (the CLI calls it first) puts a `LineStream` in front of sys.stderr, so every
tqdm bar of the process (ours, sentence-transformers', cornac's) prints at most one line per
LINE_EVERY_S seconds, plus its first and last state. Lightning's bar is replaced by a line callback
when stderr is not a terminal (components/runtime/train_loggers.py line_progress).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_EVERY_S = 30.0   # a redirected progress bar prints a line at most this often (its first and last state always)


def stderr_is_tty() -> bool:
    """Whether sys.stderr is an interactive terminal (False for a file, a pipe or a closed stream)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


class LineStream:
    """A text stream in front of `stream` that turns tqdm's in-place refreshes ('\\r' + state) into lines.

    Text without '\\r' passes through as written. A refresh is held back, and printed as a line of its own
    when `every_s` seconds passed since the last one printed (so a bar's first state prints at once) or
    when its bar closes (the newline after it). A blank refresh (a bar clearing itself: closed with
    leave=False, or around tqdm.write) drops the held one, as a terminal would show nothing.
    """

    def __init__(self, stream: TextIO, every_s: float = LINE_EVERY_S):
        self.stream, self.every_s = stream, float(every_s)
        self._pending = ""       # the last refresh, not printed yet
        self._printed = ""       # the last refresh printed (a closing bar repeats it)
        self._in_bar = False     # the last write was a refresh: a newline now closes that bar
        self._last = float("-inf")

    def write(self, text: str) -> int:
        head, *frames = str(text).split("\r")
        if head:
            self._text(head)
        for frame in frames:
            self._refresh(frame.rstrip())
        return len(text)

    def _text(self, text: str) -> None:
        if self._in_bar and text.startswith("\n"):   # a bar closed (leave=True): its last state is its line
            self._emit()
            text = text[1:]
        self._in_bar = False
        if text:
            self.stream.write(text)

    def _refresh(self, frame: str) -> None:
        self._in_bar = True
        self._pending = frame
        if frame and time.monotonic() - self._last >= self.every_s:
            self._emit()

    def _emit(self) -> None:
        if self._pending and self._pending != self._printed:
            self.stream.write(self._pending + "\n")
            self._printed, self._last = self._pending, time.monotonic()
        self._pending = ""

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):   # fileno, encoding, errors, buffer...: the wrapped stream's
        return getattr(self.stream, name)


def lines_when_redirected() -> None:
    """Put a LineStream in front of sys.stderr unless it is a terminal (or one is there already)."""
    if not isinstance(sys.stderr, LineStream) and sys.stderr is not None and not stderr_is_tty():
        sys.stderr = LineStream(sys.stderr)
