"""Choose the compiled or the pure-Python twin of selection, queue bookkeeping and DATA encoding."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = ["IMPLEMENTATION", "DueQueue", "Ledger", "SmoothSelector", "SourceMask", "encode_data"]

IMPLEMENTATION: str
"""Which twin is in use: "c" (Cython) or "py" (pure Python)."""

if TYPE_CHECKING:
    from kumopy._fast._queue_py import DueQueue, Ledger
    from kumopy._fast._select_py import SmoothSelector, SourceMask
    from kumopy._fast._wire_py import encode_data
elif os.environ.get("KUMOPY_NO_EXTENSIONS", "") not in ("", "0"):
    from kumopy._fast._queue_py import DueQueue, Ledger
    from kumopy._fast._select_py import SmoothSelector, SourceMask
    from kumopy._fast._wire_py import encode_data

    IMPLEMENTATION = "py"
else:
    try:
        # Both compiled modules or neither: a C mask cannot feed a Python selector.
        from kumopy._fast._queue_c import DueQueue, Ledger
        from kumopy._fast._select_c import SmoothSelector, SourceMask
        from kumopy._fast._wire_c import encode_data

        IMPLEMENTATION = "c"
    except ImportError:
        from kumopy._fast._queue_py import DueQueue, Ledger
        from kumopy._fast._select_py import SmoothSelector, SourceMask
        from kumopy._fast._wire_py import encode_data

        IMPLEMENTATION = "py"
