"""No patient name, ID or accession number from the test studies in any log line, message, CSV or
file name that the DICOM building blocks write; only inside the DICOM result objects themselves."""

from __future__ import annotations

import logging

import numpy as np
import pydicom

from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.rtstruct_writer import write_rtstruct
from threedino_pipe.dicom.seg_writer import ModelIdentity, write_seg
from threedino_pipe.dicom.selection import rules_for_channels, select_series, write_selection_csv
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.runtime.errors import UserError

MODEL = ModelIdentity("finetune__adapter__tiny__pct25", "threedino-pipe 0.1.0", "pretrain_tiny_501", "a1" * 32)


def _secrets(*corpora) -> list[str]:
    out = []
    for _, studies in corpora:
        for study in studies.values():
            identity = study.identity
            out += [p for p in identity.patient_name.split("^") if len(p) > 3]
            out += [identity.patient_id, identity.accession, identity.birth_date]
    return sorted(set(out))


def test_nothing_identifying_outside_the_result_objects(tmp_path, dicom_studies, dicom_broken, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = _secrets(dicom_studies, dicom_broken)
    messages = []
    out = tmp_path / "out"
    for root in (dicom_studies[0], dicom_broken[0]):
        index = index_folder(root, processes=1)
        for channels in ({"0": "T1"}, {"0": "CT"}):
            selections = select_series(index, rules_for_channels(channels))
            write_selection_csv(out / f"{root.name}_{channels['0']}_series_selection.csv", selections)
            messages += [s.error.render() for s in selections if s.error]
            messages += [d.reason for s in selections for d in s.decisions]
            for selection in selections:
                for series in selection.chosen.values():
                    try:
                        volume = read_series(series, display=index.display_path)
                    except UserError as error:
                        messages.append(error.render())
                        continue
                    label = (volume.array() > np.median(volume.array())).astype(np.uint8)
                    name = selection.study_uid[-12:]
                    write_seg(label, {1: "bright"}, volume, MODEL, out / f"{name}_seg.dcm")
                    write_rtstruct(label, {1: "bright"}, volume, MODEL, out / f"{name}_rtstruct.dcm")
    texts = [r.getMessage() for r in caplog.records] + messages
    texts += [p.read_text() for p in out.glob("*.csv")]
    names = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    assert len(list(out.glob("*_seg.dcm"))) == 4
    for secret in secrets:
        assert not any(secret in text for text in texts), secret
        assert not any(secret in name for name in names), secret
    seg = pydicom.dcmread(next(out.glob("*_seg.dcm")))
    assert str(seg.PatientName).startswith("Zebulon^")  # identity lives inside the result object, as required
