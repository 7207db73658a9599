"""Choose the compiled or the pure-Python twin of selection, queue bookkeeping and DATA encoding."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from typing import TYPE_CHECKING

from kumopy._fast._switch import extensions_disabled

__all__ = [
    "IMPLEMENTATION",
    "DueQueue",
    "Ledger",
    "SmoothSelector",
    "SourceMask",
    "encode_data",
    "long_line_at",
]

IMPLEMENTATION: str
"""Which twin is in use: "c" (Cython) or "py" (pure Python)."""

_COMPILED = ("_queue_c", "_select_c", "_wire_c")
_REMEDY = (
    "rebuild the extensions (pip install -e . or python setup.py build_ext --inplace), "
    "or set KUMOPY_NO_EXTENSIONS=1 to use the pure-Python twins knowingly"
)


def _built() -> list[str]:
    """Return the compiled modules that have an extension file this interpreter could load."""
    try:
        names = os.listdir(os.path.dirname(__file__))
    except OSError:
        return []
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [
        m for m in _COMPILED if any(n.startswith(f"{m}.") and n.endswith(suffixes) for n in names)
    ]


def _compiled_importable() -> bool:
    """Import the compiled twins; return False only when none of them is built at all."""
    for module in _COMPILED:
        qualified = f"{__name__}.{module}"
        try:
            importlib.import_module(qualified)
        except ImportError as exc:
            built = _built()
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == qualified
            if missing and not built:
                return False
            # Present but broken, or only partly built: running on a silent fallback would
            # hide a bad install and cost the speed the build was for.
            verb = "is" if len(built) == 1 else "are"
            reason = f"not built, but {', '.join(built)} {verb}" if missing else str(exc)
            raise ImportError(
                f"kumopy._fast: cannot import the compiled module {qualified} ({reason}); "
                + _REMEDY,
                name=qualified,
            ) from exc
    return True


if TYPE_CHECKING:
    from kumopy._fast._queue_py import DueQueue, Ledger
    from kumopy._fast._select_py import SmoothSelector, SourceMask
    from kumopy._fast._wire_py import encode_data, long_line_at
elif extensions_disabled() or not _compiled_importable():
    from kumopy._fast._queue_py import DueQueue, Ledger
    from kumopy._fast._select_py import SmoothSelector, SourceMask
    from kumopy._fast._wire_py import encode_data, long_line_at

    IMPLEMENTATION = "py"
else:
    # All three compiled modules or none: a C mask cannot feed a Python selector.
    from kumopy._fast._queue_c import DueQueue, Ledger
    from kumopy._fast._select_c import SmoothSelector, SourceMask
    from kumopy._fast._wire_c import encode_data, long_line_at

    IMPLEMENTATION = "c"
