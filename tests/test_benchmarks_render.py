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
