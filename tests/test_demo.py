"""``3dino demo`` refuses folders it did not make or made with other options (before any work).

The demo itself runs end to end in CI (``.ci/run``: ``3dino demo --quick``); its report is checked
in a browser by ``tests/test_report_browser.py``.
"""

from __future__ import annotations

import json

from conftest import run_3dino


def test_demo_refuses_a_folder_made_with_other_options(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"kind": "demo", "schema_version": 1, "options": {"quick": True}}))
    result = run_3dino("demo", "--out", str(tmp_path), "--no-progress")
    assert result.returncode != 0
    assert "demo.json" in result.stderr and "other options" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]  # nothing written


def test_demo_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_3dino("demo", "--quick", "--out", str(tmp_path), "--no-progress")
    assert result.returncode != 0
    assert "not a demo folder" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
