"""Header-only DICOM indexing on real files: any nesting, non-image objects, broken files recorded."""

from __future__ import annotations

import numpy as np
import pytest

from threedino_pipe.dicom.geometry import Plane, analyse_stack
from threedino_pipe.dicom.index import SkippedFile, index_folder, read_instance_header
from threedino_pipe.runtime.errors import UserError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _planes(offsets, orientation=AXIAL, spacing=(0.8, 0.7), drift=None):
    planes = []
    for n, z in enumerate(offsets):
        x = 0.0 if drift is None or n != drift[0] else drift[1]
        planes.append(Plane((x, 0.0, float(z)), orientation, spacing, 64, 48))
    return planes


def test_stack_geometry_sorted_and_exact():
    planes = _planes([6.0, 0.0, 3.0, 9.0])
    stack = analyse_stack(planes)
    assert stack.ok and stack.order == (1, 2, 0, 3)
    assert stack.geometry.size == (48, 64, 4)
    assert stack.geometry.spacing == (0.7, 0.8, 3.0)  # column spacing along i, row spacing along j
    assert stack.geometry.origin == (0.0, 0.0, 0.0)
    assert stack.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize(("planes", "code"), [
    (_planes([0, 3, 9, 12]), "missing_slices"),
    (_planes([0, 3, 4.5, 9, 12]), "uneven_spacing"),
    (_planes([0, 3, 3, 6]), "duplicate_positions"),
    (_planes([0, 3, 6, 9], drift=(2, 4.0)), "not_stacked"),
    (_planes([0, 3])[:1] + _planes([3, 6], spacing=(0.9, 0.7)), "mixed_pixel_spacing"),
    (_planes([0, 3]) + _planes([6], orientation=(1.0, 0.0, 0.0, 0.0, 0.9, 0.43589)), "mixed_orientation"),
])
def test_stack_problems(planes, code):
    stack = analyse_stack(planes)
    assert code in [p.code for p in stack.problems]
    assert stack.geometry is None


def test_missing_slice_is_named_with_positions():
    stack = analyse_stack(_planes([0, 2.5, 5, 10, 12.5]))
    assert stack.describe() == "missing slice(s) along the normal (step 2.5 mm): 1 between 5 and 10 mm"


def test_index_good_studies(dicom_studies):
    root, studies = dicom_studies
    index = index_folder(root, processes=1)
    assert set(index.studies) == {s.identity.study_uid for s in studies.values()}
    mr = index.studies[studies["mr"].identity.study_uid]
    axial = mr.series[studies["mr"].series["axial"]]
    assert (axial.modality, axial.image_type, axial.series_description) == ("MR", ("ORIGINAL", "PRIMARY", "AXIAL"),
                                                                             "T1 MPRAGE AX")
    assert len(axial.instances) == axial.number_of_frames == studies["mr"].image.GetSize()[2]
    assert axial.stack.ok and axial.orientation_label == "AXIAL"
    np.testing.assert_allclose(axial.stack.slice_spacing_mm, studies["mr"].image.GetSpacing()[2], atol=1e-6)
    assert mr.series[studies["mr"].series["sr"]].is_image is False
    localizer = mr.series[studies["mr"].series["localizer"]]
    assert {p.code for p in localizer.stack.problems} >= {"mixed_orientation"}
    multiframe = index.studies[studies["multiframe"].identity.study_uid].series[studies["multiframe"].series["axial"]]
    assert len(multiframe.instances) == 1 and multiframe.number_of_frames == studies["multiframe"].image.GetSize()[2]
    assert multiframe.stack.ok and multiframe.instances[0].enhanced
    compressed = index.studies[studies["compressed"].identity.study_uid].series[studies["compressed"].series["axial"]]
    assert compressed.transfer_syntaxes == (
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")
    dose = index.studies[studies["ct"].identity.study_uid].series[studies["ct"].series["dose"]]
    assert dose.modality == "RTDOSE" and dose.geometry_problems
    assert [(s.path.endswith("README.txt"), s.reason) for s in index.skipped] == [
        (True, "not a DICOM file (no DICM marker)")]


def test_index_in_worker_processes_matches(dicom_studies, monkeypatch):
    root, _ = dicom_studies
    import threedino_pipe.dicom.index as index_module
    monkeypatch.setattr(index_module, "IN_PROCESS_BELOW", 0)
    parallel = index_folder(root, processes=2, chunk_size=40)
    serial = index_folder(root, processes=1)
    assert [s.summary() for s in parallel.iter_series()] == [s.summary() for s in serial.iter_series()]
    assert parallel.skipped == serial.skipped


def test_broken_files_are_recorded_not_fatal(dicom_broken):
    root, studies = dicom_broken
    index = index_folder(root, processes=1)
    reasons = {index.display_path(s.path): s.reason for s in index.skipped}
    assert reasons["notes.txt"] == "not a DICOM file (no DICM marker)"
    assert "truncated" in reasons["cut_in_header.dcm"]
    truncated = [s for s in index.skipped if s.series_uid == studies["truncated"].series["axial"]]
    assert len(truncated) == 1 and truncated[0].reason.startswith("truncated:")
    series = index.studies[studies["truncated"].identity.study_uid].series[studies["truncated"].series["axial"]]
    assert series.skipped == truncated  # kept with its series so that selection can name it
    assert len(index.studies) == len(studies)


def test_read_instance_header_of_a_folder_and_missing_root(tmp_path):
    assert isinstance(read_instance_header(tmp_path), SkippedFile)
    with pytest.raises(UserError, match="does not exist"):
        index_folder(tmp_path / "nothing")


def test_fast_scan_agrees_with_pydicom_on_every_file(dicom_studies, dicom_broken):
    from threedino_pipe.dicom.header import read_with_pydicom
    from threedino_pipe.dicom.header_scan import scan_header
    from threedino_pipe.dicom.index import list_files
    scanned = declined = 0
    for root in (dicom_studies[0], dicom_broken[0]):
        for path in list_files(root):
            fast = scan_header(path)
            if fast is None:
                declined += 1
                continue
            scanned += 1
            assert fast == read_with_pydicom(path), path
    assert scanned > 300 and declined < 20  # classic files take the fast path; multi-frame and odd ones do not
