"""benchmarks/cifar10_chains.py (the chains' figures on random images, no data needed) and its page section."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from test_benchmarks_render import render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from cifar10_chains import SETTINGS, diagnose  # noqa: E402

CHAIN_FIGURES = {"energy_drop", "late_energy_drop", "step_size", "noise_rms", "late_spread"}


def _images(n=12):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).mul(2).sub(1)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_reports_its_figures_at_the_probe_iterations_and_repeats_with_its_seed(name):
    run = dict(iterations=3, every=2, batch_size=4, lr=1e-3, seed=0)
    first, again = diagnose(name, _images(), **run), diagnose(name, _images(), **run)
    assert [row["iteration"] for row in first["rows"]] == [1, 3]  # every 2nd, and the last
    chains = SETTINGS[name].family == "lpc"
    for row in first["rows"]:
        assert (CHAIN_FIGURES <= row.keys()) == chains
        figures = {k: v for k, v in row.items() if k != "seconds"}
        assert all(math.isfinite(v) for v in figures.values())
        assert row["second_moment"] > 0 and 0 <= row["saturated"] <= 1
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in first["rows"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in again["rows"]]


def test_the_figures_follow_the_settings():
    run = dict(iterations=2, every=1, batch_size=4, lr=1e-3, seed=0)
    defaults = diagnose("LPC, fit's defaults", _images(), **run)["rows"][-1]
    adapted = diagnose("LPC K=5, η adapted", _images(), **run)["rows"][-1]
    assert defaults["step_size"] == 0.01  # fit's default η, fixed
    assert adapted["step_size"] != 0.01  # adapted after every iteration


def _row(iteration, second_moment, saturated, chains=True):
    row = {"iteration": iteration, "seconds": 1.0, "objective": -2e4, "guide_sigma": 0.05,
           "second_moment": second_moment, "saturated": saturated}
    if chains:
        row |= {"energy_drop": 12345.6, "late_energy_drop": 987.4, "step_size": 0.01, "noise_rms": 0.0035,
                "late_spread": 0.0071}
    return row


def test_the_page_section_shows_first_and_last_probes_and_the_aggregate_drift(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(render.RESULTS, folder)
    defaults = [_row(i, 1.0 - i / 250, i / 500) for i in (1, 21, 41, 61, 81, 101, 121, 141, 161, 181, 200)]
    vae = [_row(i, 0.9, 0.0, chains=False) for i in (1, 101, 200)]
    record = {"program": "benchmarks/cifar10_chains.py", "command": "python benchmarks/cifar10_chains.py",
              "date": "2026-12-02", "machine": "test", "iterations": 200, "every": 20, "train_images": 20000,
              "batch_size": 100, "threads": 2, "seed": 0, "probe_images": 100,
              "runs": [{"label": "LPC, fit's defaults", "rows": defaults}, {"label": "VAE", "rows": vae}]}
    (folder / "cifar10_chains.json").write_text(json.dumps(record))
    page = render.render(folder)
    section = page[page.index("### CIFAR-10: what the chains do"):]
    section = section[: section.index("\n### ")]
    assert "| LPC, fit's defaults | 1 | 12346 | 987 | 0.010 | 0.0035 | 0.050 | 0.0071 | 1.00 | 0.2 % |" in section
    assert "| LPC, fit's defaults | 200 |" in section and "| LPC, fit's defaults | 21 |" not in section
    assert "| VAE | 101 | — | — | — | — | 0.050 | — | 0.90 | 0.0 % |" in section
    assert "LPC, fit's defaults 1.00 → 0.20 (40.0 % saturated); VAE 0.90 → 0.90 (0.0 % saturated)" in section
    assert "2 torch threads" in section
