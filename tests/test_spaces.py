"""prima.spaces: entry points become ZeroGPU functions when the ``spaces`` package exists, and nothing
initialises CUDA at import time."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import types

import pytest

from prima.spaces import GPU_SECONDS, on_gpu


@pytest.mark.skipif(importlib.util.find_spec("spaces") is not None, reason="the spaces package is installed")
def test_without_spaces_the_function_is_unchanged():
    def entry(x):
        return x + 1

    assert on_gpu(entry) is entry


def test_with_spaces_the_function_is_wrapped_by_spaces_gpu(monkeypatch):
    calls = []
    fake = types.ModuleType("spaces")  # stands in for Hugging Face's package, which is not installed here
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)

    def gpu(duration):
        def decorate(function):
            def wrapped(*args, **kwargs):
                calls.append(duration)
                return function(*args, **kwargs)
            return wrapped
        return decorate

    fake.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", fake)
    wrapped = on_gpu(lambda x: x * 2)
    assert wrapped(21) == 42 and calls == [GPU_SECONDS]


def test_importing_the_entry_points_does_not_initialise_cuda():
    code = ("import torch, prima.predict, prima.tokens, prima.release, prima.cli; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
