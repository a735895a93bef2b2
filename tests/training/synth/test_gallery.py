"""The diagnosis gallery: panels show the lesion, are named by what they show, and the PNG is written."""

from __future__ import annotations

import numpy as np
import pytest

from training.synth.gallery import gallery_plane, gallery_spec, make_gallery, render_diagnosis
from training.synth.protocols import SERIES_KINDS

PLANE_WORDS = {"axial": ("ax", "tra"), "sagittal": ("sag",), "coronal": ("cor",)}


@pytest.mark.parametrize("sequence", sorted({seq for seq, _ in SERIES_KINDS.values()}))
@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_panel_name_never_contradicts_its_plane(sequence, plane):
    name = gallery_spec(np.random.default_rng(0), sequence, plane).name.lower()
    other_planes = [w for p, words in PLANE_WORDS.items() if p != plane for w in words]
    assert not any(name.startswith(w) or f" {w}" in name or f"_{w}" in name for w in other_planes), name


def test_sagittal_diagnosis_panel_shows_its_mask():
    assert gallery_plane("spine_syrinx") == "sagittal"
    panels = render_diagnosis("spine_syrinx", seed=0, index=0, spacing=3.0)
    assert panels
    for name, image, mask, _ in panels:
        assert image.shape == mask.shape
        assert mask.any(), name


def test_gallery_png_is_written(tmp_path):
    out = make_gallery(tmp_path / "g.png", spacing=3.0, keys=["tumor_adult_meningioma"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown diagnosis"):
        make_gallery(tmp_path / "g.png", keys=["not_a_diagnosis"])
