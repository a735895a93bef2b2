"""Hugging Face Spaces: the GPU entry points run under ZeroGPU when the ``spaces`` package is there.

On a ZeroGPU Space a GPU is attached only while a function decorated with ``spaces.GPU`` runs, and the
process must not initialise CUDA before that (nor return CUDA tensors from it). ``prima``'s entry points
(``predict``, ``explain``, ...) are wrapped with :func:`on_gpu`: with the ``spaces`` package importable
they become ``spaces.GPU`` functions; without it (a laptop, a plain CUDA machine, CI) they are returned
unchanged. They pick their device when called (``device="auto"``) and return CPU data only, and no
module of ``prima`` touches CUDA at import time.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

GPU_SECONDS = 60  # the ZeroGPU time slot a call asks for; LIME on a GPU takes seconds, not minutes


def on_gpu(function: F, duration: int = GPU_SECONDS) -> F:
    """``spaces.GPU(duration=...)(function)`` when the ``spaces`` package is importable, else ``function``."""
    if importlib.util.find_spec("spaces") is None:
        return function
    import spaces

    return spaces.GPU(duration=duration)(function)
