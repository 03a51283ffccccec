"""benchmarks/common.py's TimedStream: its iteration cap (per-iteration comparisons with time unlimited)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import BATCH, TimedStream  # noqa: E402


IMAGES = torch.rand(3 * BATCH, 4)


def stream(**kwargs):
    return TimedStream(IMAGES, torch.nn.Linear(4, 1), seed=0, **kwargs)


def test_max_iterations_ends_the_stream_with_a_snapshot_at_that_iteration():
    capped = stream(seconds=1e9, max_iterations=7, iterations=(3, 50))
    batches = list(capped)
    assert len(batches) == 7
    assert [s["iteration"] for s in capped.snapshots] == [3, 7]  # the snapshot at 50 is never due


def test_the_cap_does_not_change_the_batches_served():
    capped, timed = stream(seconds=1e9, max_iterations=5), stream(seconds=1e9)
    served = [(a, b) for (a,), (b,) in zip(capped, timed)]
    assert len(served) == 5 and all(torch.equal(a, b) for a, b in served)


def test_the_time_budget_still_ends_a_capped_stream():
    assert list(stream(seconds=0.0, max_iterations=5)) == []


@pytest.mark.parametrize("cap", [0, -3])
def test_a_cap_below_one_batch_is_refused(cap):
    with pytest.raises(ValueError, match=f"max_iterations .* got {cap}"):
        stream(seconds=1.0, max_iterations=cap)
