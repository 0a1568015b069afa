"""User-facing errors of the data pipeline.

Every problem a user can fix (a bad input line, a missing file, a split too small for the
requested samples) is raised as :class:`DataError`. The CLI prints its message and exits with
status 2, without a traceback, so the message itself must say what was wrong, where
(file:line, split name, sizes) and what to do.
"""

from __future__ import annotations

from megagpt.errors import MegagptError


class DataError(MegagptError):
    """An actionable error in user data or data configuration."""


class BadRecordError(DataError):
    """One input record (a line, a CSV row, a paragraph) is unusable.

    ``reason`` is a short stable key used to count skipped records
    (``malformed-json``, ``invalid-utf8``, ``missing-key``, ``not-a-string``, ``empty-document``).
    """

    def __init__(self, path: str, line: int, reason: str, detail: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"{path}:{line}: {detail} [{reason}]; fix the input, or pass --skip-bad-lines "
            "to skip and count such records"
        )

    def __reduce__(self):
        # Workers send these to the main process; rebuild from the fields, not the message.
        return (type(self), (self.path, self.line, self.reason, self.detail))
