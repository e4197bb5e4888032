"""ITK's warnings become threedino-pipe's own, naming the file (real files that make ITK warn, real `3dino`)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from conftest import run_3dino

from threedino_pipe.demo.examples import build_mni_dataset
from threedino_pipe.raw_data import itk_messages
from threedino_pipe.raw_data.image_io import read_image

ITK_LINE = "WARNING: In "  # how ITK's output window starts a warning, followed by a path in ITK's build folder
SFORM = "has unexpected scales in sform"


def sheared_sform(path, like) -> None:
    """Rewrite ``path`` with ``like``'s (a file on the same grid) qform and a sheared sform, so ITK reads the
    qform and warns about the sform."""
    image, reference = nib.load(str(path)), nib.load(str(like))
    affine = reference.get_qform()
    shear = affine.copy()
    shear[:3, 1] += 0.3 * affine[:3, 0]
    data = np.asanyarray(image.dataobj)
    out = nib.Nifti1Image(data, None, header=image.header)
    out.set_qform(affine, code=1)
    out.set_sform(shear, code=2)
    nib.save(out, str(path))


def test_a_warning_is_logged_with_the_file_and_itk_location_dropped(tmp_path, caplog):
    raw = tmp_path / "raw"
    build_mni_dataset(raw, 996, 1, seed=3, max_size=16)
    image = next(raw.glob("Dataset996_*/imagesTr/*.nii.gz"))
    sheared_sform(image, next(raw.glob("Dataset996_*/labelsTr/*.nii.gz")))
    with caplog.at_level(logging.WARNING, logger="threedino_pipe"):
        read_image(image)
    assert [r.getMessage() for r in caplog.records] == [f"warning: {image}: {image.name} {SFORM}"]  # once, not twice
    assert itk_messages.clean("WARNING: In /b/ITK/itkX.cxx, line 7\nImageSeriesReader (0x5a3f): Non uniform  "
                              "sampling\n\n") == "Non uniform sampling"


@pytest.mark.e2e
def test_verify_plan_and_preprocess_report_itk_warnings_as_their_own(tmp_path):
    raw = tmp_path / "raw"
    build_mni_dataset(raw, 996, 4, seed=3, max_size=32)
    dataset = next(raw.glob("Dataset996_*"))
    image = dataset / "imagesTr" / "mni_001_0000.nii.gz"
    sheared_sform(image, dataset / "labelsTr" / "mni_001.nii.gz")
    env = {"THREEDINO_RAW": str(raw), "THREEDINO_PREPROCESSED": str(tmp_path / "pre"),
           "THREEDINO_RESULTS": str(tmp_path / "results")}

    verify = run_3dino("verify", "-d", "996", env=env)
    assert verify.returncode == 0, verify.stderr
    assert ITK_LINE not in verify.stderr + verify.stdout and "Traceback" not in verify.stderr
    report = " ".join(verify.stdout.split())  # the report (a table) is on stdout
    assert "imagesTr/mni_001_0000.nii.gz" in report, verify.stdout
    assert f"the image reader (ITK) warns: mni_001_0000.nii.gz {SFORM}" in report, verify.stdout

    for args in (("plan", "-d", "996"), ("preprocess", "-d", "996", "-np", "2")):  # preprocess: in worker processes
        result = run_3dino(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert ITK_LINE not in result.stderr, result.stderr
        assert f"warning: {image}: mni_001_0000.nii.gz {SFORM}" in result.stderr, result.stderr
