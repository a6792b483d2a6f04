"""The two errors of the data builders: one that stops a build, one that skips an input.

`DataError` stops the build: the raw data cannot be built as it is (a malformed metadata CSV, a
release in which no case or image is usable, a segmentation in another label convention). Its
message is one line naming the file, the line where there is one, and the problem, so a command
line can print it as it is (`python -m fedjax_med.data.build` does).

`SkippedInput` is one case or image that fails validation (a file that cannot be read, NaN or
infinite values, an all-zero or constant volume or image, an unexpected shape or dtype). The
builders skip it, log a warning naming its file, and count it under `reason`, a short fixed
phrase, so that the end-of-build summary and the dataset metadata can say how many inputs were
dropped for what.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable


class DataError(ValueError):
    """Raw data that cannot be built: the message names the file, the line and the problem."""


class SkippedInput(ValueError):
    """One case or image that cannot be used: skipped and counted under `reason`.

    `str(e)` is the detail (it names the offending file); `e.reason` the short phrase it is
    counted under, e.g. 'non-finite values'.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """reason -> how many inputs were skipped for it, most frequent first (then by name)."""
    counts = collections.Counter(reasons)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reasons_text(counts: dict[str, int]) -> str:
    """{'unreadable file': 2, 'all-zero case': 1} -> 'unreadable file: 2, all-zero case: 1'."""
    return ', '.join(f'{reason}: {n}' for reason, n in counts.items())
