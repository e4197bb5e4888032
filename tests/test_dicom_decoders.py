"""Compressed transfer syntaxes of classic and enhanced multi-frame CT are read back exactly (issue 14).

Each lossless syntax a PACS archive holds (RLE; JPEG-LS; JPEG 2000; JPEG Lossless SV1, the usual CT
archive syntax) is written for a classic single-frame series and for one legacy-converted enhanced
multi-frame object, indexed and read by ``read_series``: voxels equal to the source in HU. A syntax
whose decoder (or encoder, to write the test file) is not installed is skipped with what to install:
pydicom decodes RLE itself, JPEG-LS through pyjpegls (or GDCM), JPEG 2000 through pylibjpeg-openjpeg
(or GDCM, Pillow), JPEG Lossless through GDCM (python-gdcm; pylibjpeg-libjpeg would too, but it is
GPL-3.0 and not a dependency).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from threedino_pipe.demo.dicom_examples import (
    Identity,
    compress,
    gdcm_jpeg_lossless,
    legacy_multiframe,
    series_datasets,
    synthetic_ct_volume,
    write_datasets,
)
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.uids import derive_uid
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.raw_data.image_io import to_array

SYNTAXES = {"rle": RLELossless, "jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless,
            "jpeg-lossless-sv1": JPEGLosslessSV1}
PACKAGES = {"rle": "pydicom", "jpeg-ls": "pyjpegls", "jpeg2000": "pylibjpeg-openjpeg",
            "jpeg-lossless-sv1": "python-gdcm"}


@pytest.fixture(scope="module")
def ct_image():
    image, _ = synthetic_ct_volume((48, 40, 12), (0.9, 0.9, 2.0), labels=2, seed=3)  # J2K: >= 32
    return image


def _needs_codecs(name: str) -> None:
    """Skip, saying what to install, when the decoder of ``SYNTAXES[name]`` (or the encoder the test writes
    with) is missing."""
    syntax = UID(SYNTAXES[name])
    if not get_decoder(syntax).is_available:
        pytest.skip(f"no decoder for {syntax.name} installed (pip install {PACKAGES[name]})")
    encodable = importlib.util.find_spec("gdcm") is not None if name == "jpeg-lossless-sv1" else \
        get_encoder(syntax).is_available
    if not encodable:
        pytest.skip(f"no encoder for {syntax.name} to write the test file (pip install {PACKAGES[name]})")


def _write(datasets, folder, name: str) -> None:
    paths = write_datasets([d if name == "jpeg-lossless-sv1" else compress(d, SYNTAXES[name]) for d in datasets],
                           folder)
    if name == "jpeg-lossless-sv1":
        for path in paths:
            gdcm_jpeg_lossless(path)


@pytest.mark.parametrize("layout", ["classic", "enhanced"])
@pytest.mark.parametrize("name", list(SYNTAXES))
def test_compressed_ct_reads_back_exactly(tmp_path, ct_image, name, layout):
    _needs_codecs(name)
    identity = Identity(study_uid=derive_uid("decoders", name, layout))
    series_uid = derive_uid("decoders", name, layout, "series")
    datasets = series_datasets(ct_image, identity, series_uid=series_uid, series_number=1, modality="CT",
                               description="CT 2mm")
    if layout == "enhanced":
        datasets = [legacy_multiframe(datasets, series_uid=series_uid, modality="CT")]
    _write(datasets, tmp_path / "series", name)
    index = index_folder(tmp_path, processes=1)
    series = index.studies[identity.study_uid].series[series_uid]
    assert series.transfer_syntaxes == (SYNTAXES[name],)
    volume = read_series(series)
    assert volume.is_multiframe == (layout == "enhanced") and volume.units == "HU"
    assert volume.geometry.size == ct_image.GetSize()
    np.testing.assert_array_equal(volume.array(), np.rint(to_array(ct_image)).astype(np.float32))
