"""What rank 0's console shows, and `train.log`, the file that keeps it.

A logged step is one fixed-width line of short columns with units, the same columns every time
so they line up down the screen:

    step  120/300 | loss 2.412 | 5.2k tok/s | mfu  3.1% | 1.21 GiB | lr 2.1e-03 | 412 ms/step

(evaluation steps add `| val 2.301 | 1.234 bpb`); everything else of the record (per-layer keys,
lists) goes to metrics.jsonl and the dashboards. `ConsoleLog` copies what rank 0 writes to
stdout and stderr into `<run dir>/train.log`, each line as the terminal finally shows it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def human(n: float) -> str:
    """3 significant digits with a k/M/G suffix: 5210 -> '5.21k'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


# the optional columns of a step's line, in order: (record key, its text); a column whose key the
# record lacks is left out (mfu without a known peak, memory off the logging steps, val off evaluations)
COLUMNS: list[tuple[str, Callable[[float], str]]] = [
    ("tokens_per_s", lambda v: f"{human(v):>5} tok/s"),
    ("mfu", lambda v: f"mfu {v:5.1%}"),
    ("mem_gib", lambda v: f"{v:.2f} GiB"),
    ("lr", lambda v: f"lr {v:.1e}"),
    ("step_ms", lambda v: f"{v:4.0f} ms/step"),
    ("val_loss", lambda v: f"val {v:.3f}"),
    ("val_bpb", lambda v: f"{v:.3f} bpb"),
]


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """The console line of a logged step's record (see the module docstring)."""
    width = len(str(total_steps))
    cols = [f"step {record['step']:>{width}}/{total_steps}", f"loss {record['loss']:.3f}"]
    cols += [text(record[key]) for key, text in COLUMNS if key in record]
    if "val_loss" in record and "val_bpb" not in record and "val_bits_per_token" in record:
        cols.append(f"{record['val_bits_per_token']:.3f} bits/token")  # token files: their bytes are unknown
    if record.get("skipped_nonfinite"):
        cols.append("SKIPPED (non-finite)")
    return " | ".join(cols)


class ConsoleLog:
    """While open, what this process writes to sys.stdout and sys.stderr also goes to `path`
    (appended: a resumed run continues the file). The progress bar redraws itself with carriage
    returns; the file keeps only what follows a line's last one, i.e. what the terminal shows."""

    def __init__(self, path: Path):
        self.path = path
        self._file: TextIO | None = None
        self._pending = ""
        self._saved: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> ConsoleLog:
        self._file = self.path.open("a", encoding="utf-8", errors="replace")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._saved
        if self._pending.split("\r")[-1].strip():
            self._file.write(self._pending.split("\r")[-1] + "\n")
        self._file.close()

    def feed(self, text: str) -> None:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()  # the unfinished last line
        for line in lines:
            self._file.write(line.split("\r")[-1] + "\n")
        self._file.flush()  # a crash keeps everything printed before it


class _Tee:
    """A text stream that writes to `stream` and feeds `log`; everything else is `stream`'s."""

    def __init__(self, stream: TextIO, log: ConsoleLog):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.feed(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the terminal's stream
        return getattr(self._stream, name)
