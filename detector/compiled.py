"""Compiling small numeric kernels with numba, cached on disk where possible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

KERNELS: list[Any] = []  # every kernel compiled() made, for `detector.warm_up`'s checks


def compiled(function: Callable[..., Any]) -> Any:
    """`function` compiled on first use (no GIL held while it runs), and cached on disk (in
    __pycache__, numba's user-wide cache, or NUMBA_CACHE_DIR) when some directory can be
    written: compiling takes seconds, loading a fraction of one. Without one, each
    process compiles it again."""
    try:
        kernel = numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba found no directory to cache in
        kernel = numba.njit(nogil=True)(function)
    KERNELS.append(kernel)
    return kernel
