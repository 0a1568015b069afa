"""megagpt.lazy: package names imported on first use resolve to the exported object, every time."""

from __future__ import annotations

import subprocess
import sys


def test_an_export_named_like_its_submodule_stays_the_export():
    # megagpt.evaluation exports the function perplexity from the submodule perplexity: the
    # import of the submodule sets the package attribute to the module, after the first access.
    code = (
        "import megagpt.evaluation as e, megagpt.serving as s, megagpt.inference as i, sys\n"
        "assert 'torch' not in sys.modules  # nothing heavy before first use\n"
        "first, second = e.perplexity, e.perplexity\n"
        "assert callable(first) and first is second, (first, second)\n"
        "assert s.SlotCache.__name__ == 'SlotCache' and i.sample.__name__ == 'sample'\n"
        "try:\n    i.missing\nexcept AttributeError as x:\n    assert 'missing' in str(x)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
