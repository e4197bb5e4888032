"""Typed, validated readers and writers of every file a stage hands to the next (docs/schemas.md).

One class per file kind; ``read(path)`` validates and raises a ``UserError`` naming the file, the
field and the command to rerun; ``write(path)`` is atomic. No module outside this package parses
these files.
"""

from threedino_pipe.artifacts.base import Artifact, checksum
from threedino_pipe.artifacts.model_card import BackboneRecord, ModelCard
from threedino_pipe.artifacts.plans import FinetuneConfiguration, Plans, PretrainConfiguration
from threedino_pipe.artifacts.run_record import BudgetRecord, RunRecord, open_run_folder

__all__ = ["Artifact", "BackboneRecord", "BudgetRecord", "FinetuneConfiguration", "ModelCard", "Plans",
           "PretrainConfiguration", "RunRecord", "checksum", "open_run_folder"]
