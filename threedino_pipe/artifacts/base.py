"""The base of every typed artifact: read with validation, write atomically, checksums.

An artifact is a JSON file a stage hands to the next. Each kind is one pydantic model below this
package with class attributes ``KIND`` (the file's ``kind`` field), ``SCHEMA_VERSION`` and
``WRITER`` (the command that writes it, named in errors). :meth:`Artifact.read` checks the kind,
the schema version and every field's presence and type, and turns any problem into a
:class:`~threedino_pipe.runtime.errors.UserError` that names the file, the field and the command
to rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer, model_validator

from threedino_pipe import __version__
from threedino_pipe.runtime.atomic_files import read_json, write_json
from threedino_pipe.runtime.errors import UserError


class Record(BaseModel):
    """A part of an artifact: unknown fields are errors (a typo never passes silently).

    Fields named in ``OMIT_WHEN_NONE`` are left out of the written file while they are None (optional
    parts that only some files have).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_optional_parts(self, handler):
        data = handler(self)
        for key in self.OMIT_WHEN_NONE:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Artifact(Record):
    """A whole JSON artifact file (``kind``, ``schema_version``, ``version`` + the kind's fields)."""

    KIND: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1
    WRITER: ClassVar[str] = ""
    FILE: ClassVar[str] = ""  # the file's usual name, where it has one
    PATTERN: ClassVar[str] = ""  # how the files are named where the name varies (``<case>.json``)

    @classmethod
    def in_folder(cls, folder: str | Path) -> Path:
        """The path of this kind's file in ``folder`` (``folder / FILE``)."""
        return Path(folder) / cls.FILE

    # filled in from KIND and SCHEMA_VERSION; a file with other values is refused by :meth:`from_data`
    kind: str = ""
    schema_version: int = 0
    version: str = __version__

    @model_validator(mode="before")
    @classmethod
    def _header(cls, data: Any) -> Any:
        """``kind`` and ``schema_version`` of this class when a constructor leaves them out."""
        if isinstance(data, dict):
            data = {"kind": cls.KIND, "schema_version": cls.SCHEMA_VERSION, **data}
        return data

    @model_validator(mode="after")
    def _own_header(self) -> Artifact:
        if (self.kind, self.schema_version) != (self.KIND, self.SCHEMA_VERSION):
            raise ValueError(f"kind {self.kind!r}, schema_version {self.schema_version} is not {self.KIND!r}, "
                             f"{self.SCHEMA_VERSION}")
        return self

    @classmethod
    def read(cls, path: str | Path, *, rerun: str | None = None):
        """Read and validate ``path``; ``rerun`` (default ``WRITER``) is the command named in errors.

        Raises:
            UserError: missing file, not JSON, another kind, another schema version, or a field that
                is missing, unexpected or of the wrong type (named with its dotted path).
        """
        path = Path(path)
        rerun = rerun or cls.WRITER
        data = read_json(path)
        return cls.from_data(data, path, rerun=rerun)

    @classmethod
    def from_data(cls, data: Any, path: str | Path, *, rerun: str | None = None):
        """Validate already-parsed JSON ``data`` that came from ``path`` (e.g. a member of a zip)."""
        rerun = rerun or cls.WRITER
        if not isinstance(data, dict) or data.get("kind") != cls.KIND:
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"not a {cls.KIND} file (kind {found!r})", file=path, fix=f"rerun `{rerun}`")
        version = data.get("schema_version")
        if version != cls.SCHEMA_VERSION:
            newer = isinstance(version, int) and version > cls.SCHEMA_VERSION
            raise UserError(
                f"{cls.KIND} schema_version {version!r} is not the supported version {cls.SCHEMA_VERSION}"
                + (" (written by a newer threedino-pipe)" if newer else ""), file=path,
                fix=("update threedino-pipe, or " if newer else "") + f"rerun `{rerun}` with this version")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc, path, rerun) from None

    def to_data(self) -> dict[str, Any]:
        """The JSON-ready dict of this artifact (field order as declared, fields under their JSON names)."""
        return self.model_dump(mode="json", by_alias=True)

    def same_as_file(self, path: str | Path) -> bool:
        """True when ``path`` holds exactly this artifact's data (False for a missing or unreadable file)."""
        try:
            return read_json(path) == json.loads(json.dumps(self.to_data(), allow_nan=True))
        except UserError:
            return False

    def write(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename); returns ``path``."""
        write_json(path, self.to_data())
        return Path(path)


_UNION_TAG = re.compile(r"^(int|float|str|bool|none|[\w-]+\[.*\])$")


def field_path(loc: tuple) -> str:
    """The dotted field name of a pydantic error location, without its union-branch tags (``int``, ``list[int]``)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or "(top level)"


def validation_error(exc: ValidationError, path: str | Path, rerun: str) -> UserError:
    """A UserError naming the first invalid fields of ``exc`` (``configurations.finetune.patch_size``)."""
    problems = []
    for error in exc.errors()[:3]:
        where = field_path(error["loc"])
        kind = error["type"]
        given = repr(error.get("input"))
        given = given if len(given) <= 60 else given[:57] + "..."
        what = "is missing" if kind == "missing" else (
            "is not a field of this file" if kind == "extra_forbidden" else f"is invalid ({given}): {error['msg']}")
        problems.append(f"field `{where}` {what}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return UserError("; ".join(problems) + more, file=path, fix=f"rerun `{rerun}` to write it again")


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats turned into None (strict JSON ``null``) and numpy scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def checksum(data: Any) -> str:
    """sha256 (16 hex digits) of canonical JSON (sorted keys): the one checksum of what a consumer depends on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def without_reasons(data: Any) -> Any:
    """``data`` with every ``reasons`` / ``decisions`` entry removed (explanations, not inputs of a stage)."""
    if isinstance(data, dict):
        return {k: without_reasons(v) for k, v in data.items() if k not in ("reasons", "decisions")}
    if isinstance(data, list):
        return [without_reasons(v) for v in data]
    return data
