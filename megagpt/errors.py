"""The one base class of every error a user can act on.

``megagpt <command>`` catches :class:`MegagptError` (config, data, checkpoint, training faults
such as a run of non-finite steps), prints one line ``megagpt: error: ...`` and exits non-zero,
without a traceback. Subclasses live with the module that raises them (``ConfigError`` in
``config/loader.py``, ``DataError`` in ``data/errors.py``, ``CheckpointError`` in
``checkpoint/canonical.py``); this module imports nothing, so any of them can derive from it.
"""

from __future__ import annotations


class MegagptError(Exception):
    """An error whose message says what was wrong, where, and what to do."""


class TrainingError(MegagptError):
    """Training cannot go on safely (e.g. ``train.max_bad_steps`` consecutive non-finite
    steps); the message names the steps and the last good checkpoint."""
