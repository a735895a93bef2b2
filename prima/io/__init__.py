"""Loading clinical MRI studies (DICOM folders, zip archives, NIfTI files) into oriented 3D series."""

from prima.io.archive import ArchiveLimits, extracted_zip
from prima.io.dicom import read_dicom
from prima.io.dicom_writer import write_dicom_series
from prima.io.limits import StudyLimits
from prima.io.nifti import read_nifti
from prima.io.study import Series, SkippedSeries, Study, load_study

__all__ = [
    "ArchiveLimits",
    "Series",
    "SkippedSeries",
    "Study",
    "StudyLimits",
    "extracted_zip",
    "load_study",
    "read_dicom",
    "read_nifti",
    "write_dicom_series",
]
