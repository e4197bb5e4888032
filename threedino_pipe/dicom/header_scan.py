"""A byte-level scan of a DICOM file's top-level header: the fast path of the index.

It handles the common case only and declines (returns None) everything else, for
:func:`threedino_pipe.dicom.header.read_with_pydicom` to read: a DICOM Part 10 file (preamble and
``DICM``) whose file meta is followed by an implicit VR little endian, explicit VR little endian or
encapsulated (compressed, explicit VR little endian) dataset, whose header up to the pixel data lies
in its first 64 KiB, without functional groups (multi-frame objects go to pydicom), with a character
set of ASCII, ISO_IR 100 or ISO_IR 192, and whose wanted elements have the VR the standard gives
them. Elements it does not want are skipped by their length; sequences of undefined length are
walked item by item. The values are handed to :func:`threedino_pipe.dicom.header.build_header` as
pydicom would give them (strings, lists of strings for several values, integers for US).
"""

from __future__ import annotations

import os
import struct

from threedino_pipe.dicom.header import (
    DICOMDIR_SOP_CLASS,
    LONG_VRS,
    PIXEL_TAGS,
    InstanceHeader,
    SkippedFile,
    build_header,
    pixel_data_state,
)

SCAN_BYTES = 65536
IMPLICIT_LE, EXPLICIT_LE, RLE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"
ENCAPSULATED_PREFIX = "1.2.840.10008.1.2.4."  # JPEG, JPEG-LS, JPEG 2000, MPEG, ...: explicit VR little endian
WANTED = {  # tag -> (keyword, VR); the VR is needed for implicit VR datasets
    0x00080005: ("SpecificCharacterSet", "CS"), 0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"), 0x00080018: ("SOPInstanceUID", "UI"), 0x00080060: ("Modality", "CS"),
    0x0008103E: ("SeriesDescription", "LO"), 0x00180050: ("SliceThickness", "DS"),
    0x0020000D: ("StudyInstanceUID", "UI"), 0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200011: ("SeriesNumber", "IS"), 0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"), 0x00200037: ("ImageOrientationPatient", "DS"),
    0x00200052: ("FrameOfReferenceUID", "UI"), 0x00280002: ("SamplesPerPixel", "US"),
    0x00280008: ("NumberOfFrames", "IS"), 0x00280010: ("Rows", "US"), 0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
}
FUNCTIONAL_GROUPS = {0x52009229, 0x52009230}
CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Decline(Exception):
    """The scan does not handle this file."""


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, position of the value) of the element header at ``pos``."""
    if pos + 8 > len(buf):
        raise _Decline
    group, element = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # item and delimiter tags carry no VR
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4:pos + 6])
    if vr in LONG_VRS:
        if pos + 12 > len(buf):
            raise _Decline
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip(buf: bytes, value_pos: int, length: int, implicit: bool) -> int:
    """The position after a value: its length, or for an undefined length the end of its items."""
    if length != 0xFFFFFFFF:
        return value_pos + length
    pos = value_pos
    while True:
        tag, _, item_length, pos = _element(buf, pos, True)
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Decline
        if item_length != 0xFFFFFFFF:
            pos += item_length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, _, inner_length, inner_pos = _element(buf, pos, implicit)
            if tag == ITEM_END:
                pos = inner_pos
                break
            pos = _skip(buf, inner_pos, inner_length, implicit)


def _decode(vr: str, data: bytes, codec: str):
    if vr == "US":
        if len(data) < 2:
            raise _Decline
        return struct.unpack_from("<H", data)[0]
    parts = [p.strip() for p in data.decode(codec if vr == "LO" else "ascii").rstrip("\0 ").split("\\")]
    return parts[0] if len(parts) == 1 else parts


def _scan(buf: bytes, size: int) -> tuple[dict, str, int | None, bool]:
    """(values by keyword, transfer syntax, position of the pixel data element or None, implicit VR)."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Decline
    pos, meta = 132, {}
    while pos + 8 <= len(buf) and struct.unpack_from("<H", buf, pos)[0] == 0x0002:
        tag, _, length, value_pos = _element(buf, pos, False)
        if length == 0xFFFFFFFF or value_pos + length > len(buf):
            raise _Decline
        meta[tag] = bytes(buf[value_pos:value_pos + length])
        pos = value_pos + length
    syntax = meta.get(0x00020010, b"").decode("ascii").rstrip("\0 ")
    if meta.get(0x00020002, b"").decode("ascii").rstrip("\0 ") == DICOMDIR_SOP_CLASS:
        raise _Decline
    if syntax == IMPLICIT_LE:
        implicit = True
    elif syntax in (EXPLICIT_LE, RLE) or syntax.startswith(ENCAPSULATED_PREFIX):
        implicit = False
    else:
        raise _Decline
    raw: dict[str, tuple[str, bytes]] = {}
    pixel_pos = None
    while True:
        if pos == len(buf) == size:
            break  # the file ends after a whole element: no pixel data
        if pos + 8 > len(buf):
            raise _Decline  # cut inside the header, or a header longer than the scan window
        if struct.unpack_from("<HH", buf, pos) in PIXEL_TAGS:
            pixel_pos = pos
            break
        tag, vr, length, value_pos = _element(buf, pos, implicit)
        if tag in FUNCTIONAL_GROUPS:
            raise _Decline
        if tag in WANTED:
            keyword, expected = WANTED[tag]
            if length == 0xFFFFFFFF or value_pos + length > len(buf) or (vr is not None and vr != expected.encode()):
                raise _Decline
            raw[keyword] = (expected, bytes(buf[value_pos:value_pos + length]))
            pos = value_pos + length
        else:
            pos = _skip(buf, value_pos, length, implicit)
    charset = _decode("CS", raw.pop("SpecificCharacterSet", ("CS", b""))[1], "ascii")
    if not isinstance(charset, str) or charset not in CODECS:
        raise _Decline
    values = {keyword: _decode(vr, data, CODECS[charset]) for keyword, (vr, data) in raw.items()}
    return values, syntax, pixel_pos, implicit


def scan_header(path: str) -> InstanceHeader | SkippedFile | None:
    """The index entry of the file at ``path`` from a byte-level scan, or None when the scan declines.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        buf = fp.read(SCAN_BYTES)
        try:
            values, syntax, pixel_pos, implicit = _scan(buf, size)
        except (_Decline, struct.error, UnicodeDecodeError):
            return None
        has_pixels, truncated = False, ""
        if pixel_pos is not None:
            fp.seek(pixel_pos)
            has_pixels, truncated = pixel_data_state(fp, size, implicit, True)
    return build_header(path, values.get, syntax, has_pixels, truncated, pixel_pos is None)
