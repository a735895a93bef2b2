"""End to end in a real browser: upload a study, press Load, read the series table."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def nifti_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upload")
    template = load_mni152_template(resolution=2)
    path = folder / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine), path)
    return path


def test_upload_shows_series_table(app_url, browser, nifti_study, tmp_path):
    page = browser.new_page()
    page.goto(app_url)
    page.locator("#study-upload input[type=file]").set_input_files(str(nifti_study))
    # The upload finishes when the file name is listed in the component.
    page.get_by_text("AX_T1.nii.gz").first.wait_for(timeout=60_000)
    page.locator("#load-study").click()
    page.locator("#study-summary").get_by_text("1 series loaded").wait_for(timeout=60_000)
    text = page.locator("#series-table").inner_text()
    assert "AX_T1" in text
    assert "axial" in text
    page.screenshot(path=str(tmp_path / "series_table.png"), full_page=True)
    page.close()


def test_page_reports_missing_upload(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.locator("#load-study").click()
    page.get_by_text("Upload a study first").first.wait_for(timeout=30_000)
    page.close()
