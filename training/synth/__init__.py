"""Synthetic brain-MRI study engine (docs/design.md §6): anatomy, pathology, sequences, protocols, writers.

Training-only code; the ``prima`` library never imports it. Entry points:
``python -m training.synth`` (data set) and ``python -m training.synth.gallery`` (one image per diagnosis).
"""
