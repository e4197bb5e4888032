"""``.study_keys.json``: the private mapping from output names to DICOM studies (docs/predict.md).

``3dino predict`` names the outputs of a DICOM study by its *study key*, the first 16 hex digits
of SHA-256(salt + StudyInstanceUID): export folders and PACS trees are often named after the
patient, so neither they nor the UIDs name an output. The salt is random per output folder and
kept here with each key's StudyInstanceUID, so whoever may read the folder can map a result back
to its study. The file is written with mode 0600 (its owner only) and never logged.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.atomic_files import write_json

KEY_DIGITS = 16
PRIVATE_MODE = 0o600


class StudyKeyEntry(Record):
    """One study named by its key (``name``: the output name instead of the key, ``--keep-patient-names``)."""

    study_uid: str
    name: str | None = None

    OMIT_WHEN_NONE = ("name",)


class StudyKeys(Artifact):
    """The whole ``.study_keys.json``: the salt and, per study key, the study it names."""

    KIND = "study_keys"
    SCHEMA_VERSION = 1
    WRITER = "3dino predict"
    FILE = ".study_keys.json"

    salt: str = Field(min_length=16)
    studies: dict[str, StudyKeyEntry] = {}

    @classmethod
    def new(cls) -> StudyKeys:
        """A mapping with a fresh random salt (128 bits) and no studies."""
        return cls(salt=secrets.token_hex(16))

    @classmethod
    def in_output(cls, folder: str | Path) -> StudyKeys:
        """The mapping of an output folder when it has one (so a rerun keeps its names), else :meth:`new`."""
        path = cls.in_folder(folder)
        return cls.read(path) if path.is_file() else cls.new()

    def key_of(self, study_uid: str, name: str | None = None) -> str:
        """The study key of ``study_uid`` (16 hex digits), recorded in :attr:`studies` with its output
        ``name`` (None: the key names the outputs)."""
        key = self._key(study_uid)
        self.studies[key] = StudyKeyEntry(study_uid=study_uid, name=name)
        return key

    def name_of(self, study_uid: str) -> str:
        """The name of ``study_uid``'s outputs: the name recorded with its key, else the key (not recorded)."""
        key = self._key(study_uid)
        entry = self.studies.get(key)
        return entry.name if entry is not None and entry.name else key

    def _key(self, study_uid: str) -> str:
        return hashlib.sha256((self.salt + study_uid).encode()).hexdigest()[:KEY_DIGITS]

    def write(self, path: str | Path) -> Path:
        """Write atomically with mode 0600: the file is never readable by others, not even for a moment."""
        write_json(path, self.to_data(), mode=PRIVATE_MODE)
        return Path(path)
