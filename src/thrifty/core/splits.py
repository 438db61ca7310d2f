"""Split hygiene shared by recipes: every read of a validation or test split names its purpose and is logged.

A recipe wraps its held-out data in :class:`Guarded`; reading it requires a purpose allowed for that split
(validation: selection, thresholds …; test: the final evaluation and figures) and appends
``{index, split, purpose, unit}`` to an :class:`AccessLog` (``access_log.jsonl`` in the run directory). Tests
then prove from the log that no test example influenced model selection, calibration or thresholds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class AccessLog:
    """Append-only record of which split was read, for what, by which unit. Indices continue across the
    sessions of one run directory (a rerun that resumes appends after the earlier reads)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._offset = 0
        if path is not None and path.exists():
            self._offset = sum(1 for line in path.read_text().splitlines() if line.strip())

    def record(self, split: str, purpose: str, unit: str) -> None:
        entry = {"index": self._offset + len(self.entries), "split": split, "purpose": purpose, "unit": unit}
        self.entries.append(entry)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


class Guarded(Generic[T]):
    """Held-out data that can only be read by naming a purpose in ``allowed``; every read is logged."""

    def __init__(self, split: str, data: T, access: AccessLog, *, allowed: Sequence[str]) -> None:
        self.split, self._data, self._access = split, data, access
        self.allowed = tuple(allowed)

    def get(self, purpose: str, unit: str) -> T:
        if purpose not in self.allowed:
            raise PermissionError(f"the {self.split} split may not be used for {purpose!r} (allowed: {self.allowed})")
        self._access.record(self.split, purpose, unit)
        return self._data

    def __len__(self) -> int:
        return len(self._data)  # type: ignore[arg-type]
