"""Series selection per study on real DICOM files: the right series, and a clear per-study failure for bad input."""

from __future__ import annotations

import csv
import io

import pytest

from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.selection import (
    SELECTION_COLUMNS,
    channel_modality,
    parse_series_rule,
    rules_for_channels,
    select_series,
    select_study,
    selection_csv_text,
    write_selection_csv,
)
from threedino_pipe.runtime.errors import UserError

T1 = rules_for_channels({"0": "T1"})
CT = rules_for_channels({"0": "CT"})


@pytest.fixture(scope="module")
def good_index(dicom_studies):
    return index_folder(dicom_studies[0], processes=1)


@pytest.fixture(scope="module")
def broken_index(dicom_broken):
    return index_folder(dicom_broken[0], processes=1)


def _by_study(selections):
    return {s.study_uid: s for s in selections}


def test_channel_modalities():
    assert [channel_modality(n) for n in ("CT", "ct_venous", "T1", "t2w", "FLAIR", "ADC", "PET", "noNorm")] == [
        "CT", "CT", "MR", "MR", "MR", "MR", "PT", None]
    with pytest.raises(UserError, match="cannot tell which DICOM modality channel 0"):
        rules_for_channels({"0": "noNorm"})
    assert rules_for_channels({"0": "noNorm"}, modalities={"noNorm": "mr"})[0].modality == "MR"
    with pytest.raises(UserError, match="names channel 'T2'"):
        rules_for_channels({"0": "T1"}, patterns={"T2": "x"})
    assert parse_series_rule("T1:mr=mprage|t1w") == ("T1", "MR", "mprage|t1w")
    with pytest.raises(UserError, match="does not compile"):
        parse_series_rule("T1=(")


def test_right_series_chosen(dicom_studies, good_index):
    _, studies = dicom_studies
    by_study = _by_study(select_series(good_index, T1))
    for name in ("mr", "multiframe", "compressed"):
        selection = by_study[studies[name].identity.study_uid]
        assert selection.ok, selection.error
        assert selection.chosen["0"].series_uid == studies[name].series["axial"]
    mr = by_study[studies["mr"].identity.study_uid]
    decisions = {d.series_uid: d for d in mr.decisions}
    series = studies["mr"].series
    assert (decisions[series["axial"]].status, decisions[series["axial"]].channel) == ("chosen", "T1")
    assert decisions[series["reformat"]].status == "candidate" and decisions[series["reformat"]].rank == 2
    assert decisions[series["localizer"]].reason.startswith("a localizer")
    assert decisions[series["sr"]].reason == "not an image series: SR (Basic Text SR Storage)"
    assert [s.series_uid for s in mr.ranked["0"]] == [series["axial"], series["reformat"]]
    ct = _by_study(select_series(good_index, CT))[studies["ct"].identity.study_uid]
    assert ct.ok and ct.chosen["0"].series_uid == studies["ct"].series["axial"]
    reasons = {d.series_uid: d.reason for d in ct.decisions}
    assert reasons[studies["ct"].series["dose"]] == "modality RTDOSE; the model reads CT"
    assert reasons[studies["ct"].series["localizer"]].startswith("a localizer")


def test_a_study_without_the_modality_fails_alone(dicom_studies, good_index):
    _, studies = dicom_studies
    by_study = _by_study(select_series(good_index, CT))
    failed = by_study[studies["mr"].identity.study_uid]
    assert not failed.ok and failed.chosen == {}
    assert f"study {studies['mr'].identity.study_uid}: no usable CT series for channel CT" in failed.error.problem
    assert studies["mr"].series["axial"] in failed.error.problem
    assert by_study[studies["ct"].identity.study_uid].ok


@pytest.mark.parametrize(("case", "rules", "message"), [
    ("truncated", T1, "1 file(s) of this series are unusable: case_00/"),
    ("missing_slice", T1, "missing slice(s) along the normal"),
    ("mixed_spacing", T1, "mixed pixel spacings"),
    ("three_slices", T1, "3 slice(s), fewer than the minimum of 10"),
    ("multiframe_positions", T1, "uneven slice spacing"),
    ("localizer_only", CT, "a localizer (ImageType ORIGINAL/PRIMARY/LOCALIZER)"),
    ("two_equal", T1, "2 equally good series for channel T1"),
])
def test_each_broken_study_is_a_clear_failure(dicom_broken, broken_index, case, rules, message):
    _, studies = dicom_broken
    selection = _by_study(select_series(broken_index, rules))[studies[case].identity.study_uid]
    assert not selection.ok
    problem = selection.error.problem
    assert problem.startswith(f"study {studies[case].identity.study_uid}: ")
    assert message in problem
    for series_uid in studies[case].series.values():
        assert series_uid in problem  # every series of the study is named
    assert selection.error.fix


def test_truncated_case_names_the_file_and_the_reason(dicom_broken, broken_index):
    _, studies = dicom_broken
    selection = _by_study(select_series(broken_index, T1))[studies["truncated"].identity.study_uid]
    assert "truncated: " in selection.error.problem and "pixel data bytes present" in selection.error.problem


def test_description_pattern_settles_a_tie(dicom_broken, broken_index):
    _, studies = dicom_broken
    study = broken_index.studies[studies["two_equal"].identity.study_uid]
    selection = select_study(study, rules_for_channels({"0": "T1"}, patterns={"T1": r"run 3$"}))
    assert selection.ok and selection.chosen["0"].series_uid == studies["two_equal"].series["second"]
    reasons = {d.series_uid: d.reason for d in selection.decisions}
    assert reasons[studies["two_equal"].series["first"]] == "SeriesDescription does not match 'run 3$' (channel T1)"


def test_two_channels_cannot_share_one_series(dicom_studies, good_index):
    _, studies = dicom_studies
    study = good_index.studies[studies["compressed"].identity.study_uid]
    selection = select_study(study, rules_for_channels({"0": "T1", "1": "T2"}))
    assert not selection.ok and "for channels T1, T2" in selection.error.problem


def test_selection_csv(tmp_path, dicom_studies, dicom_broken, good_index, broken_index):
    selections = select_series(good_index, T1) + select_series(broken_index, T1)
    path = tmp_path / "series_selection.csv"
    write_selection_csv(path, selections)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert tuple(rows[0]) == SELECTION_COLUMNS
    assert len(rows) == sum(len(s.decisions) for s in selections)
    assert path.read_text() == selection_csv_text(selections)
    chosen = [r for r in rows if r["status"] == "chosen"]
    assert {r["series_uid"] for r in chosen} == {dicom_studies[1][n].series["axial"]
                                                 for n in ("mr", "multiframe", "compressed")}
    assert {r["status"] for r in rows} == {"chosen", "candidate", "skipped", "tied"}
