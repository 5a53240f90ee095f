"""The search path's compiled kernels (_topk.c: the top-k merge and the varint decoder), or None.

`pip install` builds them where a C compiler is found; without one the install still succeeds and
merge.py and wire.py take their numpy paths instead (docs/development.md).
"""

from __future__ import annotations

try:
    from mishards.core import _topk as kernels
except ImportError:  # built without a C compiler
    kernels = None  # type: ignore[assignment]

COMPILED_KERNELS = kernels is not None
"""Whether the kernels were built; a proxy without them warns at start."""
