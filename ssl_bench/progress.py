"""A small progress line for long work: count, rate, ETA and the latest losses (stderr)."""
from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """On a terminal the line is redrawn in place; otherwise a line is printed at most every ``every_s``."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "it", start: int = 0,
                 every_s: float = 10.0, stream=None):
        self.total, self.label, self.enabled, self.unit = total, label, enabled, unit
        self.start, self.every_s = start, every_s
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.done = start
        self.rate = 0.0

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        elapsed = time.perf_counter() - self.t0
        self.rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        if not self.enabled:
            return
        final = done >= self.total
        if not self.tty and not final and elapsed - self.last_print < self.every_s:
            return
        self.last_print = elapsed
        eta = (self.total - done) / self.rate if self.rate > 0 else float("nan")
        eta_s = _fmt_time(eta) if eta == eta else "?"
        line = (f"{self.label}: {done}/{self.total} {self.unit} | {self.rate:.2f} {self.unit}/s | "
                f"ETA {eta_s}{(' | ' + extra) if extra else ''}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
