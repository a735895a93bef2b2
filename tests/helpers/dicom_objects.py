"""Reading back the per-frame geometry of a multi-frame DICOM object (parametric map, segmentation)."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset


def frame_geometry(obj: Dataset) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame of a multi-frame object: (referenced source SOPInstanceUID, position, orientation, spacing)."""
    shared = obj.SharedFunctionalGroupsSequence[0]
    out = []
    for item in obj.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        groups = item if "PlaneOrientationSequence" in item else shared
        orientation = np.array([float(v) for v in groups.PlaneOrientationSequence[0].ImageOrientationPatient])
        measures = item if "PixelMeasuresSequence" in item else shared
        spacing = np.array([float(v) for v in measures.PixelMeasuresSequence[0].PixelSpacing])
        out.append((str(uid), position, orientation, spacing))
    return out
