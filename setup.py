"""Build the Cython extensions of kumopy._fast; all metadata lives in pyproject.toml."""

import os
import sys

from setuptools import setup

ext_modules = []
if os.environ.get("KUMOPY_NO_EXTENSIONS", "") not in ("", "0"):
    print("kumopy: KUMOPY_NO_EXTENSIONS set, building the pure-Python twins only", file=sys.stderr)
else:
    try:
        from Cython.Build import cythonize
    except ImportError:  # pragma: no cover - the build requirements name Cython
        sys.exit(
            "kumopy: Cython is required to build kumopy._fast "
            "(pip install cython, or set KUMOPY_NO_EXTENSIONS=1 for the pure-Python twins)"
        )
    ext_modules = cythonize(
        "kumopy/_fast/*.pyx",
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
