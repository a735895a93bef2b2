"""End to end in a real browser: upload a study, press Load, read the series table."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def nifti_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upload")
    template = load_mni152_template(resolution=2)
    path = folder / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine), path)
    return path


def upload(page, path) -> None:
    """Upload one file and wait until the component lists it.

    On a cold, busy machine the file input can exist before Gradio's script has attached its
    handlers, so a selection made that early is lost; select again rather than wait forever.
    """
    for attempt in range(3):
        page.locator("#study-upload input[type=file]").set_input_files(str(path))
        try:
            page.get_by_text(path.name).first.wait_for(timeout=30_000)
            return
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise


def test_upload_shows_series_table(app_url, browser, nifti_study, tmp_path):
    page = browser.new_page()
    page.goto(app_url)
    upload(page, nifti_study)
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
