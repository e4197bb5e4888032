"""Typed, validated readers and writers of every file a stage hands to the next (docs/schemas.md).

One class per file kind; ``read(path)`` validates and raises a ``UserError`` naming the file, the
field and the command to rerun; ``write(path)`` is atomic. No module outside this package parses
these files or indexes their contents by field name (tests/test_artifact_access.py).
"""

from threedino_pipe.artifacts.backbone_outputs import EmbedRecord, ModelSource, VisualizeRecord
from threedino_pipe.artifacts.base import Artifact, Record, checksum
from threedino_pipe.artifacts.case_properties import (
    CaseProperties,
    ChannelNormalization,
    ImageGeometry,
    PreprocessedCase,
)
from threedino_pipe.artifacts.case_qc import CaseQc, StructureQc
from threedino_pipe.artifacts.dataset_json import DatasetJson, ListedCase
from threedino_pipe.artifacts.demo_records import BundledBackboneRecord, DemoRecord, DemoTimings, StageTime
from threedino_pipe.artifacts.evaluation_summary import EvaluationSummary
from threedino_pipe.artifacts.fingerprint import Fingerprint
from threedino_pipe.artifacts.journal import Journal, JournalLine, JournalOutput, read_journal
from threedino_pipe.artifacts.model_card import CHECKPOINT_FILES, BackboneRecord, BestMetric, ModelCard, VolumeRange
from threedino_pipe.artifacts.plans import (
    CasePreprocessing,
    FinetuneConfiguration,
    Normalization,
    Plans,
    PretrainConfiguration,
    SplitPlan,
)
from threedino_pipe.artifacts.predict_args import ModelIdentity, PredictArgs, PredictOptions
from threedino_pipe.artifacts.predict_log import (
    LoggedOutput,
    LoggedWindows,
    PredictLogLine,
    SentObject,
    SeriesFallback,
)
from threedino_pipe.artifacts.run_record import BudgetRecord, RunRecord, open_run_folder, run_differences
from threedino_pipe.artifacts.splits import Fold, ImportedFold, Splits
from threedino_pipe.artifacts.study import StudyCell, StudyRecord
from threedino_pipe.artifacts.study_keys import StudyKeyEntry, StudyKeys
from threedino_pipe.artifacts.subset import Subset
from threedino_pipe.artifacts.validation import (
    ProbePoint,
    ProbeValidation,
    SegmentationValidation,
    ValidationPoint,
    ValidationScore,
)

ARTIFACTS = (DatasetJson, Fingerprint, Plans, CaseProperties, Splits, RunRecord, Subset, SegmentationValidation,
             ProbeValidation, ModelCard, PredictArgs, EvaluationSummary, EmbedRecord, VisualizeRecord, DemoRecord,
             DemoTimings, BundledBackboneRecord, StudyKeys, JournalLine, CaseQc, PredictLogLine, StudyRecord, StudyCell)

__all__ = ["ARTIFACTS", "CHECKPOINT_FILES", "Artifact", "BackboneRecord", "BestMetric", "BudgetRecord",
           "BundledBackboneRecord", "CasePreprocessing", "CaseProperties", "ChannelNormalization", "DatasetJson",
           "DemoRecord", "DemoTimings",
           "EmbedRecord", "EvaluationSummary", "FinetuneConfiguration", "Fingerprint", "Fold", "ImageGeometry",
           "ImportedFold", "Journal", "JournalLine", "JournalOutput", "SplitPlan",
           "ListedCase", "ModelCard", "ModelIdentity", "ModelSource", "Normalization", "Plans", "PredictArgs",
           "PredictOptions", "PreprocessedCase", "PretrainConfiguration", "ProbePoint", "ProbeValidation", "Record",
           "RunRecord", "SegmentationValidation", "Splits", "StageTime", "StudyKeyEntry", "StudyKeys", "Subset",
           "ValidationPoint", "ValidationScore", "VisualizeRecord", "checksum", "open_run_folder", "read_journal",
           "CaseQc", "StructureQc", "VolumeRange"]
__all__ += ["StudyCell", "StudyRecord", "run_differences"]
__all__ += ["LoggedOutput", "LoggedWindows", "PredictLogLine", "SentObject", "SeriesFallback"]
