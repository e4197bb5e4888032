"""Only ``threedino_pipe/artifacts/`` reads, writes or indexes the files stages hand to each other.

The check walks the AST of every module of the package outside ``artifacts/`` and fails on

1. a JSON parse or dump (``json.load(s)``, ``json.dump(s)``, ``read_json``, ``write_json``):
   every JSON file the package handles is an artifact with a typed class;
2. a path built from an artifact's file name (``folder / "plans.json"``, ``Path("model.json")``,
   ``f"{case}.json"``, ``path.with_suffix(".json")``): the classes name their files
   (``Plans.in_folder(folder)``, ``CaseProperties.path(folder, case)``);
3. a subscript or ``.get`` (reading, not assigning) by the name of a field of any artifact model
   (``model_json["patch_size"]``, ``properties.get("crop_box")``): fields are read as attributes of
   the typed objects. Keys that name other data too (checkpoint states, table columns, statistics)
   are listed in ``SHARED_KEYS`` with the data they key.

``test_the_check_catches_the_old_patterns`` feeds it the patterns the package used before the
artifacts were typed, so a check that stopped seeing them fails.
"""

from __future__ import annotations

import ast
import types
import typing

import pytest
from conftest import REPO
from pydantic import BaseModel

from threedino_pipe.artifacts import ARTIFACTS

PACKAGE = REPO / "threedino_pipe"
JSON_CALLS = {"json.load", "json.loads", "json.dump", "json.dumps", "read_json", "write_json", "read_artifact"}
PATH_CALLS = {"Path", "open", "joinpath", "with_name", "PurePath", "PurePosixPath"}
# keys of non-artifact data that an artifact field shares, and the data they key in the package
SHARED_KEYS = {
    "model": "checkpoint files ({'model': state_dict})",
    "iteration": "checkpoint states and log.csv rows of the training loops",
    "history": "checkpoint_latest.pt of a finetune run (its validation history)",
    "best": "checkpoint_latest.pt of a finetune run (its best validation)",
    "lr": "torch optimiser param groups and schedule values",
    "preset": "backbone checkpoint metadata (models/weight_files.py)",
    "method": "backbone checkpoint metadata and the pretraining configs (SSLRunConfig, SimMIMRunConfig options)",
    "backbone": "backbone checkpoint files ({'backbone': state_dict})",
    "embed_dim": "backbone dims dicts (models/presets.py)",
    "kind": "the header of torch files (feature cache)",
    "schema_version": "the header of torch files (feature cache)",
    "case_id": "columns of per_case.csv and predictions.csv tables (pandas)",
    "label": "columns of per_case.csv and labelsTr.csv tables (pandas, csv)",
    "label_values": "a column of per_case.csv (pandas)",
    "mean": "bootstrap statistics (evaluation/statistics.py)",
    "value": "classification metric entries (evaluation/summary.py)",
    "runs": "per-run values of a comparison entry (evaluation/compare.py)",
    "test": "the statistical test a comparison entry names (evaluation/compare.py)",
    "mode": "the checkpoint state of the teacher centring (ssl/centering.py)",
    "orientation": "a DICOM series summary (dicom/selection.py)",
    "pct": "a column of the study's per_case.csv and summary tables (pandas, evaluation/label_efficiency.py)",
    "metric": "a column of the study's summary and test tables (pandas, evaluation/label_efficiency.py)",
    "entry": "a column of the study's tables: the backbone entry (pandas, evaluation/label_efficiency.py)",
    "reference": "a column of evaluate's classification per_case.csv: each case's reference class (pandas, "
                 "evaluation/label_efficiency_classification.py)",
}
# Modules of the runtime layer, below artifacts/ (they cannot import it), that handle JSON themselves
BELOW_ARTIFACTS = {
    "threedino_pipe/runtime/atomic_files.py": "defines read_json and write_json, which the artifacts use",
    "threedino_pipe/runtime/locks.py": "the lock holder's description (host, pid, start, command) beside a locked "
                                       "folder: state of the lock, read by no stage",
}
def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field annotation (``list[Fold]``, ``X | None``, ``dict[str, Y]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or args:
        return [m for arg in args for m in _models(arg)]
    return []


def field_names(models) -> set[str]:
    """Every field name (and JSON alias) of ``models`` and the models nested in them."""
    names, seen, todo = set(), set(), list(models)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
            todo.extend(_models(info.annotation))
    return names


FIELDS = field_names(ARTIFACTS) - set(SHARED_KEYS)
FILE_NAMES = {cls.FILE for cls in ARTIFACTS if cls.FILE}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_file_name(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in FILE_NAMES
    if isinstance(node, ast.JoinedStr) and node.values:  # f"{case}.json"
        last = node.values[-1]
        return isinstance(last, ast.Constant) and str(last.value).endswith(".json")
    return False


def _key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def violations(source: str, where: str = "<snippet>") -> list[str]:
    """Every line of ``source`` that parses, writes, locates or indexes an artifact itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            short = name.rsplit(".", 1)[-1]
            if name in JSON_CALLS or short in ("read_json", "write_json", "read_artifact"):
                found.append(f"{line}: {name}() parses or writes JSON")
            if short in PATH_CALLS and any(_is_file_name(a) for a in node.args):
                found.append(f"{line}: {name}() names an artifact file")
            if short == "with_suffix" and node.args and _key(node.args[0]) == ".json":
                found.append(f"{line}: with_suffix('.json') names an artifact file")
            if short == "get" and isinstance(node.func, ast.Attribute) and node.args and _key(node.args[0]) in FIELDS:
                found.append(f"{line}: .get({_key(node.args[0])!r}) reads an artifact field by name")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_file_name(node.right):
            found.append(f"{line}: / {ast.unparse(node.right)} builds an artifact file's path")
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _key(node.slice) in FIELDS:
            found.append(f"{line}: [{_key(node.slice)!r}] reads an artifact field by name")
    return found


def test_no_module_outside_artifacts_parses_locates_or_indexes_an_artifact():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "artifacts" in path.relative_to(PACKAGE).parts:
            continue
        where = path.relative_to(REPO).as_posix()
        if where in BELOW_ARTIFACTS:
            continue
        found += violations(path.read_text(), where)
    assert not found, "\n".join(found)


OLD_PATTERNS = [  # each was in the package before the artifacts were typed
    'patch = model_json["patch_size"]',
    'record = {"dataset": mj.get("dataset"), "head": mj.get("head")}',
    'box = properties["crop_box"]',
    'val_ids = list(splits["folds"][fold]["val"])',
    'label = read_json(path).get("class_label")',
    'config = plans["configurations"][configuration]',
    'done = int(record.get("iterations_done", 0))',
    'data = json.loads(path.read_text())',
    'write_json(folder / "subset.json", record)',
    'path = folder / "validation.json"',
    'meta_path = array_path.with_suffix(".json")',
    'path = finetune_dir / f"{case}.json"',
    'locations = meta.get("class_locations")',
    'names = summary["sides"]',
    'if config["reasons"]["batch_size"].startswith("does"): pass',
    'channels = fingerprint["channels"]',
    'outputs = int(models[0].model_json["num_outputs"])',
    'transpose = plans.get("transpose", [0, 1, 2])',
    'old.get("options", {}).get(key) != args["models"]',
    'spec.raw["dataset"].items()',
]


@pytest.mark.parametrize("snippet", OLD_PATTERNS)
def test_the_check_catches_the_old_patterns(snippet):
    assert violations(snippet), snippet


def test_the_check_leaves_typed_access_and_other_dicts_alone():
    typed = ("patch = card.patch_size\nbox = properties.crop_box\nval = splits.fold(0).val\n"
             "path = Plans.in_folder(folder)\nstate = torch.load(p)\nnet.load_state_dict(state['model'])\n"
             "row = {'loss': 1.0}\nloss = row['loss']\n")
    assert violations(typed) == []
