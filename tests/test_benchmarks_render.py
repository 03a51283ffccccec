"""docs/benchmarks.md is exactly what benchmarks/render.py builds from benchmarks/results/*.json."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"


def _load_renderer():
    spec = importlib.util.spec_from_file_location("benchmarks_render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


@pytest.fixture
def results(tmp_path):
    """A copy of the committed results records, to change."""
    folder = tmp_path / "results"
    shutil.copytree(render.RESULTS, folder)
    return folder


def test_page_matches_the_committed_results():
    # regenerate with `python benchmarks/render.py` after changing a results record
    assert PAGE.read_text() == render.render()


def test_a_changed_figure_changes_the_page(results):
    path = results / "per_second_6min_1thread_vae.json"
    record = json.loads(path.read_text())
    final = record["runs"][0]["snapshots"][-1]
    final["test_ll"] -= 1.0  # the headline's VAE: 91.52 nats at 6 minutes becomes 92.52
    path.write_text(json.dumps(record))
    page = render.render(results)
    assert page != PAGE.read_text()
    assert f"| {-final['test_ll']:.2f} ({final['iteration']:,}) |" in page


def test_a_result_no_section_shows_is_refused(results):
    (results / "extra_study.json").write_text(json.dumps({"program": "benchmarks/extra.py"}))
    with pytest.raises(ValueError, match="extra_study.json"):
        render.render(results)


def test_a_missing_result_is_named(results):
    (results / "mnist.json").unlink()
    with pytest.raises(FileNotFoundError, match="mnist.json"):
        render.render(results)


def _shift_k3(results, key, shift, iteration=None):
    """Lower (improve) the K = 3 run's NLL of the per-second pairs by ``shift`` nats: at its last snapshot,
    or at ``iteration``."""
    for budget in ("6min", "30min"):
        for seed in (0, 1):
            path = results / f"per_second_{budget}_1thread_k3pair_seed{seed}_{key}.json"
            record = json.loads(path.read_text())
            snaps = record["runs"][0]["snapshots"]
            for snap in snaps if iteration is not None else snaps[-1:]:
                if iteration is None or snap["iteration"] == iteration:
                    snap["test_ll"] += shift
            path.write_text(json.dumps(record))


def test_the_chains_target_is_judged_from_the_pairs(results):
    page = render.render(results)
    assert "at both budgets, is **missed**" in page
    _shift_k3(results, "k3", 1.7)  # every pair's K = 3 run ends 0.6-0.7 nats ahead of its VAE ...
    assert "at both budgets, is **missed**" in render.render(results)  # ... but persistent chains do not
    for path in results.glob("per_second_*_persistentpair_*_lpc.json"):
        record = json.loads(path.read_text())
        record["runs"][0]["snapshots"][-1]["test_ll"] += 2.6  # now 0.5-1.2 nats ahead of their VAE
        path.write_text(json.dumps(record))
    assert "at both budgets, is **met**" in render.render(results)


def _shift_unlimited(results, shift):
    """Lower (improve) the unlimited K = 3 runs' NLL by ``shift`` nats at every snapshot."""
    for name, _ in render.UNLIMITED:
        path = results / f"{name}.json"
        record = json.loads(path.read_text())
        for snap in record["runs"][0]["snapshots"]:
            snap["test_ll"] += shift
        path.write_text(json.dumps(record))


def test_chains_at_no_cost_are_judged_at_the_vaes_last_iteration(results):
    page = render.render(results)
    assert "pair G (30 min, 201,712 iterations) -0.52" in page
    assert "would still miss the target at 30 min: making the chains faster cannot meet it" in page
    assert "| 0 | 201,712 | 89.31 | 89.83 | -0.52 |" in page
    _shift_unlimited(results, 1.1)  # every lead at a VAE's last iteration becomes at least +0.5
    page = render.render(results)
    assert "would meet the target." in page and "cannot meet it" not in page


def test_an_unlimited_run_without_a_snapshot_at_the_vaes_last_iteration_is_named(results):
    name = render.UNLIMITED[0][0]
    path = results / f"{name}.json"
    record = json.loads(path.read_text())
    record["runs"][0]["snapshots"] = [s for s in record["runs"][0]["snapshots"] if s["iteration"] != 201712]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"{name}.json has no snapshot at 201,712 iterations"):
        render.render(results)


def test_persistent_chains_are_compared_per_iteration_with_fresh_starts(results):
    assert "Per iteration they trail the same setting with fresh starts" in render.render(results)
    for path in results.glob("per_second_*_persistentpair_*_lpc.json"):
        record = json.loads(path.read_text())
        for snap in record["runs"][0]["snapshots"]:
            snap["test_ll"] += 5.0  # 5 nats better: ahead of the fresh starts everywhere
        path.write_text(json.dumps(record))
    assert "Per iteration they lead the same setting with fresh starts" in render.render(results)
