"""The self-configured SSL recipe: the paper's values at the paper's scale, the documented ones at CPU scale."""

from __future__ import annotations

import math

import pytest

from threedino_pipe.ssl.recipe import apply_overrides, configure, paper, recipe_schedules


def test_paper_scale_gives_the_papers_values_exactly():
    for batch, iters in ((512, 125_000), (1024, 200_000)):
        auto = configure(batch, iters, 65_536, 0.002)
        assert auto.options() == {**paper(batch, iters, 65_536, 0.002).options(), "recipe": "auto"}
        assert auto.deviations == {}
    recipe = configure(512, 125_000, 65_536, 0.002)
    assert recipe.peak_lr == pytest.approx(0.002 * math.sqrt(512 / 1024))
    assert (recipe.warmup_iters, recipe.teacher_temp_warmup_iters, recipe.freeze_last_layer_iters) == \
        (12_500, 37_500, 1_250)
    assert (recipe.teacher_temp_start, recipe.teacher_temp_end, recipe.momentum_start) == (0.04, 0.07, 0.992)
    assert (recipe.layerscale_init, recipe.centering, recipe.queue_size, recipe.prototypes) == \
        (1e-5, "sinkhorn", 0, 65_536)
    # adapt-highres at the paper's scale (batch 256, 12,500 iterations after a 125,000-iteration run)
    highres = configure(256, 12_500, 65_536, 0.001, scale_iters=125_000)
    assert highres.options() == {**paper(256, 12_500, 65_536, 0.001).options(), "recipe": "auto"}


def test_cpu_scale_gives_the_documented_short_run_settings():
    recipe = configure(4, 60, 256, 0.002)
    assert recipe.peak_lr == 1e-3 and recipe.momentum_start == pytest.approx(0.9) and recipe.layerscale_init == 1.0
    assert recipe.centering == "sinkhorn" and recipe.queue_size == 0  # the paper's centring at every scale
    assert (recipe.teacher_temp_start, recipe.teacher_temp_end, recipe.warmup_iters) == (0.04, 0.04, 6)
    assert recipe.freeze_last_layer_iters == 60  # the prototypes stay fixed for the whole run
    assert set(recipe.deviations) == {"peak_lr", "momentum_start", "layerscale_init", "freeze_last_layer_iters",
                                      "teacher_temp_end"}
    schedules = recipe_schedules(recipe, 60, 4)
    assert all(schedules["last_layer_lr"][i] == 0.0 for i in range(60)) and schedules["lr"][30] > 0
    assert schedules["teacher_temp"][0] == schedules["teacher_temp"][59] == pytest.approx(0.04)
    for batch, iters in ((255, 125_000), (4, 6_000)):  # below a total batch of 256, whatever the length
        small = configure(batch, iters, 256, 0.002)
        assert (small.freeze_last_layer_iters, small.teacher_temp_end) == (iters, 0.04)
    at_256 = configure(256, 10_000, 256, 0.002)  # the paper's from a total batch of 256
    assert (at_256.freeze_last_layer_iters, at_256.teacher_temp_end) == (100, 0.07)
    assert "0.000125" in recipe.deviations["peak_lr"] and "1 - 6 / 60" in recipe.deviations["momentum_start"]
    assert configure(4, 300, 256, 0.002).momentum_start == pytest.approx(0.98)
    assert configure(4, 750, 256, 0.002).momentum_start == pytest.approx(0.992)
    assert configure(4, 6, 256, 0.002).momentum_start == 0.5  # a smoke test's teacher still averages
    # LayerScale: 1 below a total batch of 256 whatever the length (measured: at batch 4 the gammas stay
    # near 1e-2 after 12,000 iterations), and while AdamW cannot move a gamma by 1 in the first tenth of the run
    for iters in (9_999, 12_000, 125_000):
        assert configure(4, iters, 256, 0.002).layerscale_init == 1.0
    assert "batch of 4" in configure(4, 12_000, 256, 0.002).deviations["layerscale_init"]
    assert configure(255, 125_000, 256, 0.002).layerscale_init == 1.0
    assert configure(256, 9_999, 256, 0.002).layerscale_init == 1.0
    assert configure(256, 10_000, 256, 0.002).layerscale_init == 1e-5
    assert configure(256, 60, 256, 0.002).peak_lr == 1e-3  # the floor: half the base rate
    assert configure(512, 60, 256, 0.002).peak_lr == pytest.approx(0.002 * math.sqrt(0.5))


def test_overrides_are_recorded_and_feed_the_schedules():
    recipe = apply_overrides(configure(4, 100, 256, 0.002), {"peak_lr": 2e-3, "centering": None,
                                                             "momentum_start": 0.95, "teacher_temp_end": 0.04})
    assert recipe.peak_lr == 2e-3 and recipe.centering == "sinkhorn"
    assert all("set by the user" in recipe.deviations[k] for k in ("peak_lr", "momentum_start"))
    schedules = recipe_schedules(recipe, 100, 4)
    assert schedules["lr"][9] == pytest.approx(2e-3) and schedules["momentum"][0] == pytest.approx(0.95)
    assert schedules["teacher_temp"][0] == schedules["teacher_temp"][99] == pytest.approx(0.04)
    queued = apply_overrides(paper(4, 100, 256, 0.002), {"centering": "sinkhorn_queue"})
    assert queued.queue_size == 2048
    with pytest.raises(ValueError, match="unknown centring"):
        apply_overrides(recipe, {"centering": "zscore"})


def test_ibot_centering_is_its_own_override_with_its_own_queue():
    """``--ibot-centering`` changes the iBOT targets only; a queue there gets the default queue length."""
    recipe = apply_overrides(configure(4, 100, 256, 0.002), {"ibot_centering": "sinkhorn_queue"})
    assert (recipe.centering, recipe.ibot_centering, recipe.queue_size) == ("sinkhorn", "sinkhorn_queue", 2048)
    assert "set by the user" in recipe.deviations["ibot_centering"] and "centering" not in recipe.deviations
    with pytest.raises(ValueError, match="unknown centring 'zscore'"):
        apply_overrides(recipe, {"ibot_centering": "zscore"})
