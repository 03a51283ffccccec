"""Data-parallel fit with torch.distributed: gloo, 2 CPU processes under torchrun.

The jobs run tests/distributed_job.py, whose randomness that differs between
ranks is fixed per data point (see its docstring), so 1 process on a global
batch and 2 ranks on its halves must agree up to float rounding.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from pyro_lpc.distributed import SingleProcess

JOB = os.path.join(os.path.dirname(__file__), "distributed_job.py")
TIMEOUT = 180  # seconds: a hung job fails the test instead of the suite


def run_job(out, *options, ranks=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if ranks == 1:
        command = [sys.executable, JOB, str(out), *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", JOB, str(out), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def load(out, rank=0):
    return torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False)


def ok(completed):
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 16 and 2 ranks with 8 each, 2 epochs, same chain noise;
    with fit's own noise: 2 ranks for 2 epochs, and for 1 epoch then resumed by 2
    ranks and by 1 process."""
    root = tmp_path_factory.mktemp("distributed")
    ok(run_job(root / "one", "--batch-size", "16"))
    ok(run_job(root / "two", "--batch-size", "8", ranks=2))
    ok(run_job(root / "own", "--batch-size", "8", "--own-noise", ranks=2))
    ok(run_job(root / "cut", "--batch-size", "8", "--own-noise", "--epochs", "1", ranks=2))
    for name in ("resumed-two", "resumed-one"):
        (root / name).mkdir()
        (root / name / "checkpoint.pt").write_bytes((root / "cut" / "checkpoint.pt").read_bytes())
    ok(run_job(root / "resumed-two", "--batch-size", "8", "--own-noise", "--resume", ranks=2))
    ok(run_job(root / "resumed-one", "--batch-size", "16", "--own-noise", "--resume"))
    return root


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max())


def test_two_ranks_train_like_one_process_on_the_same_global_batch(runs):
    one, rank0, rank1 = load(runs / "one"), load(runs / "two", 0), load(runs / "two", 1)
    # the ranks hold identical parameters and global chain (rank 1 started from other weights)
    assert_same_params(rank0["params"], rank1["params"], atol=0)
    assert rank0["sampler"]["global_values"]["mu"] == rank1["sampler"]["global_values"]["mu"]
    # ... equal to one process on the global batch up to float32 summation order
    # (2 epochs x 2 Adam steps of lr 1e-3 move the weights by ~4e-3; rounding is ~1e-7)
    assert_same_params(one["params"], rank0["params"], atol=1e-6)
    assert one["sampler"]["global_values"]["mu"].item() == pytest.approx(
        rank0["sampler"]["global_values"]["mu"].item(), abs=1e-5)
    for key in ("log_joint", "guide_loss"):
        assert [r[key] for r in rank0["history"]] == pytest.approx([r[key] for r in one["history"]], rel=1e-5)
    assert len(one["history"]) == len(rank0["history"]) == 4  # 32 points, global batch 16, 2 epochs
    # and the parameters did move: the comparison is not between two untrained models
    torch.manual_seed(0)  # rank 0's initial decoder, as in the job
    initial = torch.nn.Linear(2, 3).weight.detach()
    assert (one["params"]["decoder$$$weight"] - initial).abs().max() > 1e-3


def test_resume_under_the_same_world_size_is_bit_identical(runs):
    uninterrupted, resumed = load(runs / "own"), load(runs / "resumed-two")
    assert_same_params(uninterrupted["params"], resumed["params"], atol=0)
    assert [r["log_joint"] for r in resumed["history"]] == [r["log_joint"] for r in uninterrupted["history"]]
    assert torch.equal(uninterrupted["sampler"]["global_values"]["mu"], resumed["sampler"]["global_values"]["mu"])


def test_resume_under_another_world_size_continues_the_run(runs):
    cut = torch.load(runs / "cut" / "checkpoint.pt", weights_only=False)
    resumed = load(runs / "resumed-one")
    # epoch 1 comes from the 2-rank checkpoint; epoch 2 was trained by 1 process
    assert [r["log_joint"] for r in resumed["history"][:2]] == [r["log_joint"] for r in cut["history"]]
    assert [r["epoch"] for r in resumed["history"]] == [0, 0, 1, 1]
    # the resumed process started from the checkpoint's parameters and trained on from there
    for name, value in cut["params"]["params"].items():
        moved = (resumed["params"][name] - value).abs().max().item()
        assert 0 < moved < 5e-3, (name, moved)  # two Adam steps of lr 1e-3


def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    completed = run_job(tmp_path, "--batch-size", "8", "--fail-at", "1", ranks=2)
    elapsed = time.monotonic() - start
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "rank 1 failed on purpose at iteration 1" in output
    assert "rank      : 1" in output.split("Root Cause")[1]  # torchrun names the failing rank first
    assert elapsed < 120, elapsed  # rank 0, waiting in the all-reduce, was stopped, not left hanging


class FakeRank(SingleProcess):
    """The sharding of rank ``rank`` of ``world_size``, without a process group."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


def test_an_iterable_is_dealt_round_robin_dropping_an_incomplete_round():
    batches = [((torch.tensor([i]),), {}) for i in range(7)]
    dealt = [[int(args[0]) for args, _ in FakeRank(r, 3).shard(iter(batches), batches, 0)] for r in range(3)]
    assert dealt == [[0, 3], [1, 4], [2, 5]]
    assert all(FakeRank(r, 3).num_batches(batches, None) == 2 for r in range(3))


def test_a_tensor_global_batch_is_split_into_contiguous_shards():
    data = torch.arange(10.0)
    global_batches = [((data[:4],), {}), ((data[4:8],), {}), ((data[8:9],), {})]  # the last: 1 row < 2 ranks
    shards = [[args[0].tolist() for args, _ in FakeRank(r, 2).shard(iter(global_batches), data, 0)]
              for r in range(2)]
    assert shards == [[[0.0, 1.0], [4.0, 5.0]], [[2.0, 3.0], [6.0, 7.0]]]
    # num_batches agrees with what is dealt for data of 9 rows and batch size 2 per rank
    assert FakeRank(0, 2).num_batches(data[:9], 2) == 2


def run_cli(*argv, ranks=1, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "pyro_lpc", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=cwd)


def test_the_cli_trains_under_torchrun_and_resumes_in_one_process(tmp_path):
    ok(run_cli("train", "--epochs", "1", "--out", "run", "--quiet", "--eval-samples", "10", ranks=2, cwd=tmp_path))
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "history.jsonl", "metrics.json", "samples.png"):
        assert (run / name).exists(), name
    # digits: 1,500 training images, 750 per rank in batches of 100 -> 8 iterations per epoch
    assert len((run / "history.jsonl").read_text().splitlines()) == 8
    ok(run_cli("train", "--resume", "--epochs", "2", "--out", "run", "--quiet", "--eval-samples", "10", cwd=tmp_path))
    # one process takes batches of 100 of all 1,500 images: 15 more iterations
    assert len((run / "history.jsonl").read_text().splitlines()) == 8 + 15


def test_the_svi_baselines_refuse_torchrun_with_a_clear_error(tmp_path):
    completed = run_cli("train", "--method", "vae", "--epochs", "1", "--out", "run", ranks=2, cwd=tmp_path)
    assert completed.returncode != 0
    assert "--method vae trains in one process; run it without torchrun" in completed.stderr
    assert not (tmp_path / "run").exists()
