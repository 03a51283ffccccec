"""benchmarks/converged.py's stopping rule and the stream that applies it (no training, no data)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from converged import HeldOutStream, Patience  # noqa: E402


def stopping_point(scores, patience, min_delta):
    """(index at which the rule stops or None, index of the best score)."""
    rule, best = Patience(patience, min_delta), None
    for i, score in enumerate(scores):
        if rule.update(score):
            best = i
        if rule.stop:
            return i, best
    return None, best


def test_patience_stops_after_patience_scores_without_a_significant_rise():
    # rises of 0.03 (0.09 in all) < min_delta do not reset the count, but the best score moves to them
    scores = [-100.0, -95.0, -94.97, -94.94, -94.91, -90.0]
    assert stopping_point(scores, patience=3, min_delta=0.1) == (4, 4)
    assert stopping_point(scores, patience=4, min_delta=0.1) == (None, 5)
    assert stopping_point(scores, patience=3, min_delta=0.0) == (None, 5)


def test_patience_counts_a_fall_and_a_non_finite_score_as_no_rise():
    assert stopping_point([-100.0, -90.0, -91.0, float("nan")], patience=2, min_delta=0.1) == (3, 1)
    assert stopping_point([-90.0, -90.5, -89.0, -89.5, -89.6], patience=2, min_delta=0.1) == (4, 2)


@pytest.mark.parametrize("patience, min_delta", [(0, 0.1), (2, -0.1), (2, float("nan"))])
def test_patience_refuses_bad_settings(patience, min_delta):
    with pytest.raises(ValueError, match="patience" if patience < 1 else "min_delta"):
        Patience(patience, min_delta)


def test_stream_scores_every_few_iterations_keeps_the_best_state_and_stops():
    module = torch.nn.Linear(1, 1)
    scores = iter([-10.0, -5.0, -6.0, -7.0, -8.0])

    def score():
        with torch.no_grad():  # the "trainer" below writes its update count into the weight
            return next(scores)

    stream = HeldOutStream(torch.rand(250, 4), module, score, every=3, rule=Patience(2, 0.1), seconds=60.0,
                           seed=0, binarize=True)
    served = 0
    for (x,) in stream:
        served += 1
        with torch.no_grad():
            module.weight.fill_(served)  # one "update" per batch
    # scores after 3, 6, 9, 12 updates: the best (-5) after 6, then two without a rise: stop after 12
    assert [e["iteration"] for e in stream.evaluations] == [3, 6, 9, 12]
    assert stream.converged and served == 12
    assert stream.best["held_out"] == -5.0 and stream.best["state"]["weight"].item() == 6.0
    assert stream.snapshots[-1]["iteration"] == 12  # the batch drawn at the stop is not counted


def test_stream_scores_the_final_state_when_the_budget_ends():
    module = torch.nn.Linear(1, 1)
    stream = HeldOutStream(torch.rand(50, 4), module, lambda: 0.0, every=10 ** 9, rule=Patience(1, 0.1),
                           seconds=0.0, seed=0)
    assert list(stream) == []
    assert not stream.converged and [e["iteration"] for e in stream.evaluations] == [0]
