"""The one switch between the compiled and the pure-Python twins: KUMOPY_NO_EXTENSIONS."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["extensions_disabled"]


def extensions_disabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Return whether KUMOPY_NO_EXTENSIONS asks for the pure-Python twins."""
    return environ.get("KUMOPY_NO_EXTENSIONS", "") not in ("", "0")
