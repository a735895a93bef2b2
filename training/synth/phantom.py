"""The digital phantom every synthetic study is simulated from: tissue labels plus the physical
properties that sequence simulation turns into contrast. Anatomy builds it, pathology edits it,
sequences image it. All maps share one grid and one affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Tissue classes of the label map (values stored in ``Phantom.labels``)."""

    BACKGROUND = 0  # air outside the head
    CSF = 1  # sulcal and cisternal CSF outside the ventricles
    CORTICAL_GM = 2  # cerebral cortex
    WM = 3  # cerebral white matter
    DEEP_GM = 4  # basal ganglia and thalami
    VENTRICLE = 5  # lateral, third and fourth ventricles
    BRAINSTEM = 6  # midbrain, pons, medulla
    CEREBELLUM = 7  # cerebellar hemispheres and vermis
    SKULL = 8  # calvarium and skull base (cortical bone)
    SCALP = 9  # scalp soft tissue and fat
    PITUITARY = 10  # pituitary gland in the sella turcica
    VESSEL = 11  # large arteries and venous sinuses (flow voids)


@dataclass
class Finding:
    """One positive diagnosis placed in a phantom, as the report writer needs it."""

    key: str  # diagnosis key from prima/data/labels.json
    location: str  # anatomical description, e.g. "left frontal lobe", "right cerebral convexity"
    size_mm: float  # largest diameter (or thickness for extra-axial collections), mm
    attributes: dict = field(default_factory=dict)  # e.g. {"enhancement": "ring"}, {"shift_mm": 6.0}


@dataclass
class Phantom:
    """Physical property maps of one subject's head on a common voxel grid (arrays are float32)."""

    affine: np.ndarray  # 4x4 voxel -> RAS+ world mm, shared by every map below
    labels: np.ndarray  # int16 Tissue label per voxel
    pd: np.ndarray  # proton density, 0..1 (water = 1)
    t1: np.ndarray  # longitudinal relaxation time, ms (at 1.5-3 T)
    t2: np.ndarray  # transverse relaxation time, ms
    t2star: np.ndarray  # effective transverse relaxation (susceptibility included), ms
    adc: np.ndarray  # apparent diffusion coefficient, 1e-3 mm^2/s
    enhancement: np.ndarray  # gadolinium uptake: fractional T1 shortening after contrast, 0 = none
    lesion_masks: dict[str, np.ndarray] = field(default_factory=dict)  # diagnosis key -> bool mask
    findings: list[Finding] = field(default_factory=list)  # positive diagnoses placed in this phantom
    # Added by the engine core: named anatomical points in this subject's world mm (e.g. "sella",
    # "pineal", "foramen_magnum", "iac_left"; see anatomy.TEMPLATE_LANDMARKS) for placing lesions.
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    # Added by the engine core: the subject's random draws (age, sex, rotation, atrophy ...), JSON-able.
    subject: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def property_maps(self) -> dict[str, np.ndarray]:
        """The maps a spatial transform must move together (labels excluded: warp them nearest-neighbour)."""
        return {name: getattr(self, name) for name in ("pd", "t1", "t2", "t2star", "adc", "enhancement")}
