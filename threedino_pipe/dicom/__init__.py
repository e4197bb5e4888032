"""DICOM building blocks for clinical batch inference (issue 14).

Modules, each usable on its own (none imports a pipeline stage):

- :mod:`~threedino_pipe.dicom.header` / :mod:`~threedino_pipe.dicom.header_scan`: one file's header
  without its pixels (a byte-level scan for the common case, pydicom for the rest).
- :mod:`~threedino_pipe.dicom.index`: header-only index of any folder tree of DICOM files.
- :mod:`~threedino_pipe.dicom.geometry`: planes sorted along their normal; the grid they form or why not.
- :mod:`~threedino_pipe.dicom.selection`: per study, which series feed which model channel, and why.
- :mod:`~threedino_pipe.dicom.volume`: a chosen series as a SimpleITK image with exact geometry.
- :mod:`~threedino_pipe.dicom.seg_writer` / :mod:`~threedino_pipe.dicom.seg_reader`: DICOM SEG out and back.
- :mod:`~threedino_pipe.dicom.rtstruct_writer` / :mod:`~threedino_pipe.dicom.rtstruct_raster`: RTSTRUCT
  out, and its contours back to a mask by the rule stated there.
- :mod:`~threedino_pipe.dicom.pacs` / :mod:`~threedino_pipe.dicom.dicomweb`: DIMSE (C-ECHO/FIND/GET/MOVE/STORE)
  and DICOMweb (QIDO/WADO/STOW) clients, retried by :mod:`~threedino_pipe.dicom.retry`.
- :mod:`~threedino_pipe.dicom.uids`: deterministic UIDs of results.
- :mod:`~threedino_pipe.demo.dicom_examples`: DICOM studies written from the example scans (tests, benchmarks).

Conventions: arrays are ``X x Y x Z`` in voxel index order (i, j, k) as in
:mod:`threedino_pipe.raw_data.image_io`; i runs along a DICOM row (ImageOrientationPatient's first
vector), j down the columns (its second vector), k along the slice normal (row x column), so a
slice's ``pixel_array`` (rows x columns) is ``array[:, :, k].T``. Positions and spacings are mm.
See ``docs/dicom.md``.
"""
