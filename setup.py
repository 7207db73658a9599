"""Build the Cython extensions of kumopy._fast; all metadata lives in pyproject.toml."""

import importlib.util
import os
import sys

from setuptools import setup

# The switch is read from its one home, loaded by path: importing the kumopy package here
# would need its runtime dependencies at build time.
_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kumopy", "_fast", "_switch.py")
_spec = importlib.util.spec_from_file_location("_kumopy_switch", _path)
assert _spec is not None and _spec.loader is not None
_switch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_switch)

ext_modules = []
if _switch.extensions_disabled():
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
