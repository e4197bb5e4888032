"""The cells of ``3dino study`` (issue 17): entries with heads, run order, shares, and list options that take
several values after one flag."""

from __future__ import annotations

import pytest
from typer.main import get_command

from threedino_pipe.cli import app
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.study.cells import make_cells, parse_entries, parse_share, share


def test_entries_name_their_backbone_and_head(tmp_path):
    run = tmp_path / "pretrain__big"
    run.mkdir()
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"x")
    entries = parse_entries([str(run), f"{run}:unetr", str(weights), "none:linear", "none"])
    assert [e.label for e in entries] == ["pretrain__big", "pretrain__big:unetr", "teacher", "none:linear", "none"]
    assert [e.head for e in entries] == [None, "unetr", None, "linear", None]
    assert entries[1].backbone == str(run) and entries[3].backbone == "none"
    with pytest.raises(UserError, match="two entries are both named none"):
        parse_entries(["none", "none"])
    with pytest.raises(UserError, match="no such backbone"):
        parse_entries([str(tmp_path / "missing.pt")])
    with pytest.raises(UserError, match="unknown head 'decoder'"):
        parse_entries(["none:decoder"])


def test_cells_run_in_order_and_shares_cover_them_once():
    cells = make_cells(parse_entries(["none", "none:linear"]), [10.0, 100.0], [0, 1], [0])
    assert [c.cell for c in cells[:3]] == ["none__pct10__fold0__seed0", "none-linear__pct10__fold0__seed0",
                                          "none__pct10__fold0__seed1"]
    parts = [share(cells, k, 3) for k in (1, 2, 3)]
    assert sorted(c.cell for part in parts for c in part) == sorted(c.cell for c in cells)
    assert [len(p) for p in parts] == [3, 3, 2]
    assert parse_share(" 2/3 ") == (2, 3)
    for bad in ("0/3", "4/3", "1-3", "a/b"):
        with pytest.raises(UserError, match="K/N"):
            parse_share(bad)


def test_list_options_take_several_values_after_one_flag():
    command = get_command(app).commands["study"]
    ctx = command.make_context("study", ["-d", "990", "--backbones", "a", "none", "--pct=10", "25", "100",
                                         "--seeds", "0", "1", "--name", "x", "--folds", "0"])
    assert ctx.params["backbones"] == ["a", "none"] and ctx.params["pct"] == [10.0, 25.0, 100.0]
    assert ctx.params["seeds"] == [0, 1] and ctx.params["folds"] == [0] and ctx.params["name"] == "x"
