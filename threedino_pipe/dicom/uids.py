"""Deterministic UIDs for result objects (SEG, RTSTRUCT).

A result's UIDs are name-based UUIDs (RFC 4122 version 5, SHA-1) under the ``2.25`` arc
(ISO/IEC 9834-8: ``2.25.<the UUID as one decimal integer>``, at most 44 characters). The name
hashed is the object kind, its role (series, instance or dimension organization) and the inputs
that define the result: the source study UID, the source series UIDs, a digest of the source
SOP instance UIDs (so a series that gained or lost images gives a new result) and the model's
weights checksum. The same inputs therefore give the same SeriesInstanceUID and SOPInstanceUID,
so a result sent twice to a PACS is the same object, not a duplicate; a different model or source
gives different UIDs.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

# The namespace of every threedino-pipe UID: a fixed name-based UUID (so it is reproducible here).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/threedino-pipe/uids")


def derive_uid(*parts: str) -> str:
    """A DICOM UID derived from ``parts`` only (same parts -> same UID).

    Args:
        parts: strings naming what the UID identifies, e.g. ``("SEG", "instance", study_uid,
            series_uid, checksum)``. Their order matters; none may contain the unit separator
            ``\\x1f``.
    """
    for part in parts:
        if "\x1f" in part:
            raise ValueError("a UID part may not contain the unit separator")
    return f"2.25.{uuid.uuid5(NAMESPACE, chr(0x1F).join(parts)).int}"


def result_uids(kind: str, study_uid: str, source_series_uids: Iterable[str], model_checksum: str,
                source_instance_uids: Iterable[str] = ()) -> dict[str, str]:
    """SeriesInstanceUID and SOPInstanceUID of a result object.

    Args:
        kind: ``"SEG"`` or ``"RTSTRUCT"`` (each kind gets its own UIDs).
        study_uid: StudyInstanceUID of the source study.
        source_series_uids: the series the result was computed from (order ignored).
        model_checksum: the model weights' checksum (hex).
        source_instance_uids: the source images' SOPInstanceUIDs (order and repeats ignored).

    Returns:
        ``{"series": ..., "instance": ..., "dimension_organization": ...}`` (the last for
        multi-frame objects, whose DimensionOrganizationUID would otherwise be random).
    """
    series = sorted(set(source_series_uids))
    instances = hashlib.sha256("\n".join(sorted(set(source_instance_uids))).encode()).hexdigest()
    base = (kind, study_uid, *series, instances, model_checksum)
    return {role: derive_uid(*base, role) for role in ("series", "instance", "dimension_organization")}
