"""Every error everloop raises on purpose derives from `EverloopError`.

    EverloopError
    ├── SpecError            the project file is missing or invalid (.path, .problems)
    ├── StoreError           the store cannot be read or written
    │   └── IntegrityError   an artifact's bytes do not match its hash (.digest)
    ├── NotFoundError        a dataset, model version, alias or prediction does not exist
    ├── DataError            a source cannot be read, or fails validation (.report)
    ├── TrainError           training or evaluation cannot run (.column where known)
    ├── GateError            a candidate was refused by the promotion gate (.reasons)
    └── ConflictError        someone else changed what the command read (a concurrent alias move)
        ├── AliasMoved       (registry) the alias no longer points where the caller read it
        └── RolloutActive    (registry) production moves only through the active rollout (.rollout)

Only `serve` maps these to HTTP status codes and only `cli` maps them to exit codes.
"""

from __future__ import annotations

from typing import Any


class EverloopError(Exception):
    """Base of every error everloop raises on purpose."""


class SpecError(EverloopError):
    def __init__(self, message: str, *, path: str | None = None, problems: list[str] | None = None):
        self.path = path
        self.problems = problems or []
        super().__init__(message)


class StoreError(EverloopError):
    pass


class IntegrityError(StoreError):
    def __init__(self, message: str, *, digest: str):
        self.digest = digest
        super().__init__(message)


class NotFoundError(EverloopError):
    pass


class DataError(EverloopError):
    def __init__(self, message: str, *, report: Any = None, path: str | None = None):
        self.report = report
        self.path = path
        super().__init__(message)


class TrainError(EverloopError):
    def __init__(self, message: str, *, column: str | None = None):
        self.column = column
        super().__init__(message)


class GateError(EverloopError):
    def __init__(self, message: str, *, reasons: list[str]):
        self.reasons = reasons
        super().__init__(message)


class ConflictError(EverloopError):
    """The store changed between reading and writing (another process won a race); retrying may work."""
