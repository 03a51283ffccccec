"""The benchmarks page's CIFAR-10 section for ``benchmarks/cifar10.py``'s side-by-side record, with the
first (sequential, 90-second) record moved to the changelog."""
import json
import shutil
import sys

import pytest

from test_benchmarks_render import render


def _quality(frechet):
    return {"frechet_distance": frechet, "precision": 0.9, "recall": 0.4, "density": 1.1, "coverage": 0.6}


def _run(label, lr, iterations, frechet_by_snapshot, core):
    snapshots = [{"iteration": iterations * (i + 1) // 3, "seconds": s, "quality": _quality(f)}
                 for i, (s, f) in enumerate(zip((300.2, 900.1, 1800.4), frechet_by_snapshot))]
    return {"label": label, "lr": lr, "iterations": iterations, "seconds": 1800.4,
            "ms_per_iteration": 1800.4e3 / iterations, "diverged_at": None, "snapshots": snapshots,
            "core": core, "quality": snapshots[-1]["quality"]}


@pytest.fixture
def results(tmp_path):
    """The committed records with a side-by-side ``cifar10.json`` and the first one as ``cifar10_90s.json``."""
    folder = tmp_path / "results"
    shutil.copytree(render.RESULTS, folder)
    first = folder / ("cifar10_90s.json" if (folder / "cifar10_90s.json").exists() else "cifar10.json")
    first = json.loads(first.read_text()) | {"superseded": "by the 30-minute side-by-side run (issue 17)"}
    (folder / "cifar10_90s.json").write_text(json.dumps(first))
    record = {"program": "benchmarks/cifar10.py", "command": "python benchmarks/cifar10.py", "date": "2026-12-03",
              "machine": "AMD EPYC; os.cpu_count()=2", "budget_name": "30min",
              "budget": {"cifar_seconds": 1800, "quality_images": 1000, "feature_epochs": 5, "train_images": 50000,
                         "snapshot_fractions": [1 / 6, 0.5, 1.0]},
              "seed": 0, "side_by_side": True, "threads_per_run": 1, "evaluation_threads": 2,
              "lpc_settings": {"num_steps": 20, "step_size": 0.01, "keep": "last", "precondition": "diagonal"},
              "feature_accuracy": 0.604, "num_test": 1000, "load_before": "load average 0.10 0.20 0.30",
              "load_after": "load average 2.01 2.00 1.97", "reference_quality": _quality(0.94),
              "runs": [_run("LPC (Jeffreys)", 0.003, 1234, (61.5, 40.25, 31.125), 0),
                       _run("VAE", 0.001, 25000, (30.5, 22.75, 20.375), 1)]}
    (folder / "cifar10.json").write_text(json.dumps(record))
    return folder


def test_the_side_by_side_record_shows_every_snapshot_and_the_first_record_goes_to_the_changelog(results):
    page = render.render(results)  # raises if a record is shown by no section
    studies, changelog = page.split("## Changelog")
    section = studies[studies.index("### CIFAR-10"):]
    section = section[: section.index("\n### ")]
    assert "**30 min of training each, the methods side by side**" in section
    assert "1 torch thread each" in section and "load average 2.01 2.00 1.97 after" in section
    assert "scored at\n5 min, 15 min, 30 min of training" in section
    assert "| LPC (Jeffreys) | 0.003 | 1,234 | 1459.0 | 0 |" in section
    assert "| LPC (Jeffreys) | 300 s | 411 | 61.50 | 1.10 | 0.60 | 0.90 | 0.40 |" in section
    assert "| VAE | 1,800 s | 25,000 | 20.38 | 1.10 | 0.60 | 0.90 | 0.40 |" in section
    assert "| *real training images* |  |  | 0.94 |" in section
    first = changelog[changelog.index("#### `cifar10_90s.json`"):]
    assert "Superseded by the 30-minute side-by-side run (issue 17)." in first
    assert "90 s of training each, one method after the other with 2 torch threads" in first
    assert "| LPC (Jeffreys) | 0.003 | 40 | 90.2 | 2255.1 | **69.94** |" in first


def test_another_lpc_setting_gets_its_own_tables_under_the_defaults(results):
    record = json.loads((results / "cifar10.json").read_text())
    record |= {"command": "python benchmarks/cifar10.py --lpc k5-adapted", "lpc": "k5-adapted",
               "lpc_options": {"warm_start": "jeffreys", "num_steps": 5, "target_accept_prob": 0.57},
               "samples_image": "cifar10_k5-adapted_samples.png"}
    record["runs"][0] = _run("LPC K=5, η adapted", 0.003, 4321, (50.5, 35.25, 27.5), 0)
    (results / "cifar10_k5_adapted.json").write_text(json.dumps(record))
    page = render.render(results)  # raises if the record is shown by no section
    studies = page.split("## Changelog")[0]
    section = studies[studies.index("### CIFAR-10: sample"):]
    section = section[: section.index("\n### ")]
    variant = section[section.index("#### Another LPC setting"):]
    assert variant.startswith("#### Another LPC setting: `warm_start='jeffreys'`, `num_steps=5`, "
                              "`target_accept_prob=0.57`")
    assert "`python benchmarks/cifar10.py --lpc k5-adapted`" in variant
    assert "| LPC K=5, η adapted | 1,800 s | 4,321 | 27.50 |" in variant
    assert "(img/cifar10_k5-adapted_samples.png)" in variant
    assert "| LPC (Jeffreys) | 300 s | 411 | 61.50 |" in section.split("#### Another")[0]


def test_a_learned_likelihood_scale_is_named_in_the_variant_heading(results):
    record = json.loads((results / "cifar10.json").read_text())
    record |= {"lpc": "k5-adapted", "lpc_options": {"num_steps": 5}, "learned_scale_init": 1.0,
               "samples_image": "cifar10_k5-adapted_learned_sigma_samples.png"}
    (results / "cifar10_k5_adapted_learned_sigma.json").write_text(json.dumps(record))
    page = render.render(results)
    assert ("#### Another LPC setting: `num_steps=5`; both methods learn the likelihood's σ (from 1, instead of "
            "σ = 0.1 fixed)") in page
    assert "(img/cifar10_k5-adapted_learned_sigma_samples.png)" in page


def test_the_learned_scale_model_starts_at_its_initial_sigma_and_the_default_keeps_sigma_fixed():
    import pyro
    import torch
    sys.path.insert(0, str(render.REPO / "benchmarks"))
    from cifar10 import LEARNED_SCALE_INIT, new_model, samples_image
    x = torch.zeros(2, 3, 32, 32)
    new_model(0, learn_scale=True).model(x)
    assert torch.allclose(pyro.param("dlgm.likelihood.log_scale").exp(), torch.tensor(LEARNED_SCALE_INIT))
    pyro.clear_param_store()
    new_model(0).model(x)
    assert "dlgm.likelihood.log_scale" not in pyro.get_param_store()
    assert samples_image("defaults") == "cifar10_samples.png"
    assert samples_image("k5-adapted", True) == "cifar10_k5-adapted_learned_sigma_samples.png"
