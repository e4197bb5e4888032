"""nnU-Net habits on the `3dino` command line: each nnU-Net option is refused with its 3dino equivalent named."""

from __future__ import annotations

import os

import pytest
from conftest import run_3dino
from typer.testing import CliRunner

from threedino_pipe.cli import app

ENV = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
# (command line, the message); every nnU-Net option the issue lists, the way its users type it
HABITS = [
    (["predict", "-i", "in", "-o", "out", "-m", "run", "-chk", "checkpoint_final.pth"],
     "-chk: did you mean --checkpoint?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "-device", "cpu"], "-device: did you mean --device?"),
    (["finetune", "-d", "501", "-device", "cuda"], "-device: did you mean --device?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "-npp", "3"], "-npp: did you mean --num-workers?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "-nps", "3"], "-nps: did you mean --num-workers?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "-step_size", "0.5"], "-step_size: did you mean --overlap?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "--disable_tta"],
     "--disable_tta is an nnU-Net option that 3dino does not need"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "--save_probabilities"],
     "--save_probabilities: did you mean --save-probabilities?"),
    (["predict", "-i", "in", "-o", "out", "-m", "run", "--continue_prediction"],
     "--continue_prediction: did you mean --continue?"),
    (["finetune", "-d", "501", "-f", "0"], "-f: did you mean --fold?"),
    (["plan", "-d", "501", "--memory_gb", "4"], "--memory_gb: did you mean --memory-gb?"),
    (["finetune", "-d", "501", "-chk", "best"],
     "-chk: `3dino finetune` has no such option; the equivalent --checkpoint belongs to `3dino export` or "
     "`3dino listen` or `3dino predict`"),
]


@pytest.mark.parametrize(("args", "message"), HABITS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in HABITS])
def test_nnunet_option_is_refused_with_the_equivalent(args, message, tmp_path):
    result = CliRunner().invoke(app, args, env=ENV, terminal_width=400)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not list(tmp_path.iterdir())


def test_real_command_exits_2_without_traceback_before_anything_runs(tmp_path):
    result = run_3dino("predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "501", "-f", "0",
                       "1", "-chk", "checkpoint_final.pth", "-step_size", "0.5", env={"COLUMNS": "400"})
    assert result.returncode == 2, result.stderr
    assert "-chk: did you mean --checkpoint?" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_own_options_negative_numbers_and_help_pass_through():
    """Only nnU-Net spellings are caught: the command's own options, values and --help are click's."""
    runner = CliRunner()
    assert runner.invoke(app, ["predict", "--help"], env=ENV).exit_code == 0
    unknown = runner.invoke(app, ["predict", "-i", "a", "-o", "b", "--bogus"], env=ENV, terminal_width=400)
    assert unknown.exit_code == 2 and "No such option: --bogus" in unknown.output
    negative = runner.invoke(app, ["evaluate", "-r", "ref", "--seed", "-1"], env=ENV, terminal_width=400)
    assert "did you mean" not in negative.output
