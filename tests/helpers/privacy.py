"""A DICOM study carrying fake patient identifiers, to prove none of them leaves the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers.studies import zip_folder
from prima.io import write_dicom_series

# Long, distinctive values: a short one ("DOE") also turns up by chance inside base64 image data.
IDENTIFIERS = {"PatientName": "DOEXAMPLE^JANEQUIRK", "PatientBirthDate": "19610203", "AccessionNumber": "ACC7781234",
               "InstitutionName": "Saint Example Hospital", "ReferringPhysicianName": "HOUSEWRIGHT^GREGORIUS"}
PATIENT_ID = "PID99887766"
STUDY_DATE = "20191231"
# Every value that must never appear in a log, an export or a file left behind (name parts included).
SECRETS = (*IDENTIFIERS.values(), "DOEXAMPLE", "JANEQUIRK", "HOUSEWRIGHT", "GREGORIUS", PATIENT_ID, STUDY_DATE)


def write_identified_study(folder: Path, template: np.ndarray, affine: np.ndarray,
                           zip_name: str = "identified.zip") -> Path:
    """A one-series DICOM study (the template at 2 x 2 x 4 mm) with the fake identifiers, zipped as
    ``zip_name`` (exports often name the file after the patient)."""
    grid = affine @ np.diag([2.0, 2.0, 4.0, 1.0])
    write_dicom_series(template[::2, ::2, ::4], grid, folder / "study" / "s1", series_description="AX T2",
                       study_description="MRI BRAIN", patient_id=PATIENT_ID, study_date=STUDY_DATE,
                       uid_seed="identified", extra_tags=IDENTIFIERS)
    return zip_folder(folder / "study", folder / zip_name)
