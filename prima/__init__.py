"""Prima: a brain-MRI vision-language model (load studies, tokenize, encode, predict, explain).

The model API is imported lazily so that ``import prima`` (and ``prima inspect``) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_model": "prima.factory",
    "create_volume_tokenizer": "prima.factory",
    "create_heads": "prima.factory",
    "list_models": "prima.factory",
    "get_model_config": "prima.factory",
    "load_release": "prima.release",
    "save_release": "prima.release",
    "load_volume_tokenizer": "prima.release",
    "load_study": "prima.io",
    "preprocess_series": "prima.preprocess",
    "read_manifest": "prima.manifest",
    "tokenize_series": "prima.tokens",
    "tokenize_study": "prima.tokens",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prima' has no attribute {name!r}")
