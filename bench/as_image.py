"""`python -m pgwarden ...` with only the image's packages importable (bench/operator_cycle.py's operator).

The benchmarks run the operator from the development venv, which also holds the test tools. One of them
changes the operator's own footprint: import-linter pulls in `rich`, and structlog imports `rich` whenever
it is installed (about 10 MB of RSS). The image's venv has pgwarden's runtime dependencies only, so its
operator never loads it. Marking the module absent (`sys.modules[name] = None`: every `import` of it raises
ImportError, as for a package that is not installed) makes the measured process the one that ships.

    python bench/as_image.py run --namespace NS --standalone
"""

from __future__ import annotations

import runpy
import sys

DEV_ONLY = ("rich",)
"""Installed in the development venv for the test tools, absent from the image, imported when present."""


def main() -> None:
    for name in DEV_ONLY:
        sys.modules[name] = None  # type: ignore[assignment]
    runpy.run_module("pgwarden", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
