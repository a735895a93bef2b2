"""Builder of Enhanced MR Image Storage objects (one multi-frame file holding a whole volume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_enhanced_mr(volume: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray, path: Path,
                      orientation: tuple[float, ...] = AXIAL, frame_content: bool = True) -> None:
    """Write an Enhanced MR Image Storage object (frames listed in shuffled order) with pydicom.

    ``volume`` is (frames, rows, columns) stored uint16 values, ``spacing`` (between frames, between
    rows, between columns) mm, ``origin`` the LPS position of frame 0's first pixel; frame k sits at
    ``origin + k * spacing[0] * normal`` with the normal of ``orientation`` (row then column cosines).
    Rescale: value = 0.5 * stored - 10, in the shared functional groups. With ``frame_content`` (as the
    Enhanced MR IOD requires) each frame gets a FrameContentSequence (stack 1, InStackPositionNumber
    k + 1) described by a DimensionIndexSequence; without it the object is non-conformant, as some
    exports are, and readers must order frames by ImagePositionPatient alone.
    """
    n_frames = volume.shape[0]
    order = np.random.default_rng(0).permutation(n_frames)
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesDescription, ds.StudyDescription = "MR", "ENH AX T2", "ENHANCED TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    ds.NumberOfFrames = n_frames
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = pydicom.Dataset()
    measures = pydicom.Dataset()
    measures.PixelSpacing = [spacing[1], spacing[2]]
    measures.SliceThickness = spacing[0]
    plane = pydicom.Dataset()
    plane.ImageOrientationPatient = [float(v) for v in orientation]
    transform = pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 0.5, -10, "US"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = [float(v) for v in np.asarray(origin, dtype=float) + k * spacing[0] * normal]
        item.PlanePositionSequence = Sequence([position])
        if frame_content:
            content = pydicom.Dataset()
            content.StackID, content.InStackPositionNumber = "1", int(k) + 1
            content.DimensionIndexValues = [1, int(k) + 1]
            item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    if frame_content:
        stack, in_stack = pydicom.Dataset(), pydicom.Dataset()
        stack.DimensionIndexPointer = Tag("StackID")
        in_stack.DimensionIndexPointer = Tag("InStackPositionNumber")
        for index in (stack, in_stack):
            index.FunctionalGroupPointer = Tag("FrameContentSequence")
        ds.DimensionIndexSequence = Sequence([stack, in_stack])
    ds.PixelData = volume[order].astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
