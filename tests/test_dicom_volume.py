"""A chosen series read back equals its source volume: geometry and voxels (classic, CT in HU,
multi-frame, compressed), equals SimpleITK's own reading, and bad series are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from threedino_pipe.demo.dicom_examples import Identity, right_handed, series_datasets, write_datasets
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.uids import derive_uid
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.raw_data.image_io import Geometry, to_array
from threedino_pipe.runtime.errors import UserError


@pytest.fixture(scope="module")
def good_index(dicom_studies):
    return index_folder(dicom_studies[0], processes=1)


def assert_same_geometry(a: Geometry, b: Geometry) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-6)  # DS values keep 16 characters
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-6)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-9)


@pytest.mark.parametrize("name", ["mr", "ct", "multiframe", "compressed"])
def test_volume_equals_source(dicom_studies, good_index, name):
    study = dicom_studies[1][name]
    volume = read_series(good_index.studies[study.identity.study_uid].series[study.series["axial"]])
    assert_same_geometry(volume.geometry, Geometry.of(study.image))
    assert volume.array().dtype == np.float32
    np.testing.assert_array_equal(volume.array(), to_array(study.image))  # CT: HU after RescaleIntercept
    assert volume.units == ("HU" if name == "ct" else "rescaled stored value")
    assert len(volume.frames) == study.image.GetSize()[2]
    assert volume.is_multiframe == (name == "multiframe")


def test_volume_equals_simpleitk_reading(dicom_studies, good_index):
    study = dicom_studies[1]["ct"]
    series = good_index.studies[study.identity.study_uid].series[study.series["axial"]]
    ours = read_series(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([f.path for f in ours.frames])  # GDCM sorts again; the order is not given away
    theirs = reader.Execute()
    assert_same_geometry(ours.geometry, Geometry.of(theirs))
    np.testing.assert_array_equal(ours.array(), to_array(theirs).astype(np.float32))


def test_left_handed_source_is_the_same_physical_volume(tmp_path, dicom_studies):
    image = dicom_studies[1]["mr"].image
    flipped = sitk.Flip(image, [False, False, True])  # same voxels, left-handed direction matrix
    flipped_direction = np.asarray(flipped.GetDirection()).reshape(3, 3)
    if np.linalg.det(flipped_direction) > 0:  # sitk.Flip keeps the direction: make it left-handed by hand
        flipped_direction[:, 2] *= -1
        flipped.SetDirection(flipped_direction.flatten().tolist())
        flipped.SetOrigin(image.TransformIndexToPhysicalPoint([0, 0, image.GetSize()[2] - 1]))
    assert np.linalg.det(np.asarray(flipped.GetDirection()).reshape(3, 3)) < 0
    identity = Identity(study_uid=derive_uid("left-handed"))
    series_uid = derive_uid("left-handed", "series")
    write_datasets(series_datasets(right_handed(flipped), identity, series_uid=series_uid, series_number=1),
                   tmp_path / "s")
    volume = read_series(index_folder(tmp_path, processes=1).studies[identity.study_uid].series[series_uid])
    assert_same_geometry(volume.geometry, Geometry.of(image))
    np.testing.assert_array_equal(volume.array(), to_array(image))
    for index in ([0, 0, 0], [5, 7, 11], [40, 3, 30]):  # every voxel at the same physical point
        point = flipped.TransformIndexToPhysicalPoint(index)
        assert volume.image.GetPixel(volume.image.TransformPhysicalPointToIndex(point)) == flipped.GetPixel(index)


@pytest.mark.parametrize(("case", "message"), [
    ("missing_slice", "missing slice(s) along the normal"),
    ("mixed_spacing", "mixed pixel spacings"),
    ("multiframe_positions", "uneven slice spacing"),
    ("truncated", "1 file(s) of the series are unusable (truncated:"),
])
def test_bad_series_refused_by_name(dicom_broken, case, message):
    root, studies = dicom_broken
    index = index_folder(root, processes=1)
    study = studies[case]
    series = index.studies[study.identity.study_uid].series[study.series["axial"]]
    with pytest.raises(UserError) as caught:
        read_series(series, display=index.display_path)
    error = caught.value
    assert error.problem.startswith(f"study {study.identity.study_uid}, series {study.series['axial']}: ")
    assert message in error.problem
    assert error.file and error.file.startswith("case_") and error.fix
