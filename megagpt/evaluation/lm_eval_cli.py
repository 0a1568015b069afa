"""lm-eval's own command line with the ``megagpt`` model registered and the bundled tasks found.

``python -m megagpt.evaluation.lm_eval_cli --model megagpt --model_args path=DIR --tasks T``
takes every flag of ``lm_eval`` (0.4.13). lm-eval discovers models only through its registry
(``lm_eval.api.registry.register_model``, run when ``megagpt.evaluation.harness`` is imported);
it has no entry-point discovery, so the plain ``lm_eval`` command does not know ``megagpt``.
Without ``--include_path`` (lm-eval takes one folder) megagpt's bundled task folder is used, so
``--tasks megagpt_zh_mc`` works; with one, the bundled tasks are not on the path.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from megagpt.evaluation.model import require_lm_eval

    harness = require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval takes one --include_path folder: the bundled one unless the user names another.
    if "--include_path" not in args and args and args[0] not in ("-h", "--help"):
        args += ["--include_path", harness.TASKS_DIR]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
