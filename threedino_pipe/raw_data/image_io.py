"""Image reading and writing through SimpleITK, in voxel index order (i, j, k).

Arrays returned here are ``X x Y x Z`` (i, j, k): SimpleITK's numpy array with its axes
reversed, which is the order the released 3DINO weights expect (docs/method.md, Data). Geometry is kept
in SimpleITK's convention: ``spacing`` (mm) and ``origin`` (mm) per index axis (i, j, k) and
``direction`` as 9 numbers, row-major, whose columns are the index axes' directions.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from threedino_pipe.raw_data import itk_messages
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

NIFTI_ENDINGS = (".nii.gz", ".nii")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff")  # longest first


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D image.

    Attributes:
        size: voxels per index axis (i, j, k).
        spacing: mm per index axis (i, j, k).
        origin: physical position (mm) of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major (9 floats).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(size=tuple(int(v) for v in image.GetSize()), spacing=tuple(image.GetSpacing()),
                   origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction on ``image`` (its size must match)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def file_ending(path: str | Path) -> str:
    """The full ending of an image path (``.nii.gz``, ``.nrrd``; ``""`` for a DICOM folder)."""
    path = Path(path)
    if path.is_dir():
        return ""
    name = path.name.lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return path.name[-len(ending):]
    return path.suffix


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


def _dicom_reader(folder: Path) -> sitk.ImageSeriesReader:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UserError("no DICOM series found in this folder", file=folder,
                        fix="a DICOM case is a folder holding the slices of exactly one series")
    if len(series) > 1:
        raise UserError(f"the folder holds {len(series)} DICOM series; a case must hold exactly one",
                        file=folder, fix="move each series into its own folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader


def nifti_is_truncated(path: str | Path) -> bool:
    """True when a NIfTI file holds fewer voxel bytes than its header declares.

    SimpleITK reads such a file without an error and fills the missing voxels with zeros. For
    ``.nii`` the file size is compared with the header's offset + data size; for ``.nii.gz`` the
    gzip trailer's uncompressed size (ISIZE, mod 2^32), which a cut-off file does not hold. Only
    the header and the last 4 bytes are read.
    """
    import gzip
    import struct

    import nibabel as nib
    path = Path(path)
    try:
        header = nib.load(str(path)).header
    except Exception:  # unreadable header: SimpleITK will report it
        return False
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * \
        header.get_data_dtype().itemsize
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size < expected
    with path.open("rb") as fh:
        fh.seek(-4, 2)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == expected % 2**32:
        return False
    try:  # trailer mismatch: a multi-member gzip is legal; decompress to be sure
        with gzip.open(path, "rb") as fh:
            total = 0
            while chunk := fh.read(1 << 24):
                total += len(chunk)
        return total < expected
    except (EOFError, OSError):
        return True


def read_sitk(path: str | Path) -> sitk.Image:
    """Read an image file, or a folder holding one DICOM series, as a SimpleITK image.

    Raises:
        UserError: for a missing, unreadable or truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", file=path)
    if is_nifti(path) and path.is_file() and nifti_is_truncated(path):
        raise UserError("the file is truncated: it holds fewer voxels than its header declares", file=path,
                        fix="re-export or copy the file again")
    try:
        with warnings.catch_warnings(), itk_messages.warnings_of(path):
            warnings.simplefilter("ignore")
            if path.is_dir():
                return _dicom_reader(path).Execute()
            return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((ln for ln in reason if "Exception" not in ln and ln.strip()), "unreadable")
        raise UserError(f"cannot read the image (unreadable or truncated file: {detail.strip()[:160]})",
                        file=path, fix="re-export or replace the file") from None


def to_array(image: sitk.Image) -> np.ndarray:
    """Voxels of a 3D SimpleITK image as an ``X x Y x Z`` (i, j, k) array (a transposed view of a copy)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from an ``X x Y x Z`` array placed by ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    if tuple(image.GetSize()) != tuple(geometry.size):
        raise ValueError(f"array shape {array.shape} does not match geometry size {geometry.size}")
    return geometry.apply(image)


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image as an ``X x Y x Z`` array and its geometry.

    Raises:
        UserError: unreadable, not 3D, or multi-component.
    """
    image = read_sitk(path)
    if image.GetDimension() != 3:
        raise UserError(f"image is {image.GetDimension()}D, expected 3D", file=path,
                        fix="split 4D series into one 3D file per channel/time point ({case}_0000, _0001, ...)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel", file=path,
                        fix="store each component as its own channel file")
    return to_array(image), Geometry.of(image)


def read_image_with_nonfinite(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Like :func:`read_image`, but NaN/Inf voxels of NIfTI files come back as NaN/Inf.

    SimpleITK silently turns them into 0; preprocessing must see them to replace them by the
    volume mean (docs/method.md, Data).
    """
    array, geometry = read_image(path)
    if is_nifti(path) and np.issubdtype(array.dtype, np.floating):
        import nibabel as nib
        data = np.asanyarray(nib.load(str(path)).dataobj)
        if data.shape == array.shape:
            bad = ~np.isfinite(data)
            if bad.any():
                array = array.copy()
                array[bad] = data[bad]
    return array, geometry


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, compress: bool = True,
                notes: str | None = None) -> None:
    """Write an ``X x Y x Z`` array with ``geometry`` to ``path`` atomically (format from the ending).

    ``notes``: a line of text for the file's header (NIfTI: ``descrip``, at most 79 characters kept).
    """
    image = from_array(array, geometry)
    if notes:
        image.SetMetaData("ITK_FileNotes", notes[:79])  # ITK's NIfTI writer puts it into descrip
    with atomic_path(path) as tmp, itk_messages.warnings_of(path):
        sitk.WriteImage(image, str(tmp), useCompression=compress)
