"""The ``pyro-lpc`` command end to end on the embedded digits, with tiny budgets."""
import argparse
import json
import os
import re
import subprocess
import sys

import pyro
import pytest
import torch

from pyro_lpc.images.cli import build_parser, main
from pyro_lpc.images.runs import eval_images, eval_log_likelihood, load_run

TINY = ["--epochs", "1", "--num-steps", "3", "--eval-samples", "10", "--quiet"]
RUN_FILES = {"config.json", "checkpoint.pt", "history.jsonl", "metrics.json", "samples.png",
             "reconstructions.png", "curves.png"}


def history(run):
    with open(os.path.join(run, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def lpc_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("runs") / "lpc")
    assert main(["train", "--out", run] + TINY) == 0
    return run


def test_train_writes_every_file(lpc_run, capsys):
    assert RUN_FILES <= set(os.listdir(lpc_run))
    with open(os.path.join(lpc_run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["test_log_likelihood"] < 0
    assert {"frechet_distance", "density", "coverage"} <= set(metrics)
    rows = history(lpc_run)
    assert len(rows) == 15 and {"log_joint", "guide_loss", "time"} <= set(rows[0])


def test_load_run_gives_the_trained_model(lpc_run):
    with open(os.path.join(lpc_run, "metrics.json")) as f:
        metrics = json.load(f)
    pyro.clear_param_store()
    run = load_run(lpc_run, device="cpu")
    assert run.params is pyro.get_param_store() and len(run.params.keys()) > 0
    assert (run.model, run.guide) == (run.dlgm.model, run.dlgm.guide)
    # the figure metrics.json holds, recomputed with the CLI's own evaluation (same images, seed and k:
    # k as the last evaluation of this run wrote it): equal only if the loaded weights are the trained ones
    k = int(metrics["test_log_likelihood_bound"].split("k=")[1])
    config = dict(run.config, eval_samples=k)
    lml = eval_log_likelihood(config, run.dlgm, eval_images(config, "cpu"))
    assert lml.mean().item() == metrics["test_log_likelihood"]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(os.path.dirname(lpc_run))


def test_evaluate_and_sample_work_on_a_run(lpc_run, capsys):
    os.remove(os.path.join(lpc_run, "metrics.json"))
    assert main(["evaluate", lpc_run, "--eval-samples", "5", "--quiet"]) == 0
    assert os.path.exists(os.path.join(lpc_run, "metrics.json"))
    out = os.path.join(lpc_run, "extra.png")
    assert main(["sample", lpc_run, "-n", "16", "--output", out]) == 0
    assert os.path.getsize(out) > 0
    assert "wrote 16 samples" in capsys.readouterr().out


def test_resume_continues_a_run(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run] + TINY) == 0
    assert main(["train", "--out", run, "--resume", "--epochs", "2", "--quiet"]) == 0
    rows = history(run)
    assert len(rows) == 30 and rows[-1]["epoch"] == 1
    assert rows[15]["time"] >= rows[14]["time"]


@pytest.mark.parametrize("method", ["vae", "iwae"])
def test_svi_baselines_train_the_same_model(tmp_path, method):
    run = str(tmp_path / method)
    assert main(["train", "--method", method, "--out", run] + TINY) == 0
    assert RUN_FILES <= set(os.listdir(run))
    assert "elbo" in history(run)[0]


def test_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "imagenet"])
    err = capsys.readouterr().err
    assert "invalid choice: 'imagenet'" in err and "'digits'" in err and "'cifar10'" in err
    with pytest.raises(SystemExit):
        main(["train", "--method", "gan"])
    assert "'lpc', 'vae', 'iwae'" in capsys.readouterr().err


def test_help_lists_choices_and_defaults(capsys):
    main(["train", "--help"])  # argparse's SystemExit(0), which torch's @record turns into a return
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for choices in ("{digits,mnist,fashion-mnist,cifar10,svhn,celeba}", "{lpc,vae,iwae}", "{mlp,conv}",
                    "{None,diagonal,rmsprop,adam}", "{forward,reverse,jeffreys,none}",
                    "{off,record,inductor,cuda-graphs}", "{cpu,cuda,cuda:N}"):
        assert choices in out
    for default in ("(default: digits)", "(default: lpc)", "(default: 20)", "(default: 0.01)", "(default: diagonal)",
                    "(default: jeffreys)", "(default: last)", "(default: cpu)", "(default: 1)"):
        assert default in out
    assert "(default: None)" not in out and "(default: False)" not in out
    main(["--help"])
    assert "`" not in capsys.readouterr().out  # the description is plain text, not Markdown
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in subcommands.choices.items():
        for action in command._actions:
            assert action.help, f"pyro-lpc {name} {action.option_strings or action.dest} has no help"


def test_device_that_is_not_there_is_refused_before_any_data(tmp_path, monkeypatch, capsys, lpc_run):
    from pyro_lpc.images import cli

    monkeypatch.setattr(cli, "run_data", lambda *args, **kwargs: pytest.fail("data were loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SystemExit):
            main(["train", "--device", device, "--out", str(tmp_path / "run")])
        assert f"argument --device: device '{device}': CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda:1"])
    assert "has 1 CUDA device(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--device", "tpu"])
    assert "expected cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        load_run(lpc_run, device="cuda:3")


def test_device_and_threads_reach_torch(lpc_run, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = str(tmp_path / "cpu.png")
        assert main(["sample", lpc_run, "-n", "4", "--output", out, "--device", "cpu", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2 and os.path.getsize(out) > 0
        assert all(p.device.type == "cpu" for p in pyro.get_param_store().values())
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        main(["sample", lpc_run, "--threads", "0"])
    assert "argument --threads: expected a positive integer, got '0'" in capsys.readouterr().err


def test_missing_data_root_says_where_files_go(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run")] + TINY)
    assert code == 2
    err = capsys.readouterr().err
    assert "MNIST/raw/train-images-idx3-ubyte" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_corrupted_checkpoint_is_refused_and_the_run_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + TINY) == 0
    (run / "checkpoint.pt").write_bytes(b"garbage")
    before = {p: (run / p).read_bytes() for p in os.listdir(run)}
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert {p: (run / p).read_bytes() for p in os.listdir(run)} == before
    assert main(["evaluate", str(run), "--quiet"]) == 2


def test_existing_run_is_not_overwritten(lpc_run, capsys):
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--out", lpc_run] + TINY)


def test_default_run_directories_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"] + TINY) == 0
    assert main(["train"] + TINY) == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["digits-lpc", "digits-lpc-2"]
    assert main(["train", "--resume", "--epochs", "2", "--quiet"]) == 0
    assert len(history(str(tmp_path / "runs" / "digits-lpc-2"))) == 30


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "pyro_lpc", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_adaptive_inference_options_reach_fit(tmp_path):
    run = str(tmp_path / "auto")
    assert main(["train", "--out", run, "--num-steps", "auto", "--keep", "every:2", "--target-accept", "0.6"]
                + TINY[:2] + TINY[4:]) == 0
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert (config["num_steps"], config["keep"], config["target_accept"]) == ("auto", "every:2", 0.6)
    rows = history(run)
    assert rows[0]["num_steps"] == 20 and "accept_rate" in rows[0]  # "auto" starts at its maximum
    assert len({row["step_size"] for row in rows}) > 1  # η adapted


def test_bad_adaptive_inference_options_are_named(capsys):
    for option, value in (("--num-steps", "many"), ("--keep", "every:0"), ("--keep", "first")):
        with pytest.raises(SystemExit):
            main(["train", option, value])
        assert f"argument {option}" in capsys.readouterr().err


def test_compile_option_reaches_fit_and_trains_alike(tmp_path, monkeypatch, lpc_run):
    from pyro_lpc.images import cli

    seen = []
    real_fit = cli.fit
    monkeypatch.setattr(cli, "fit", lambda *args, **kwargs: seen.append((kwargs["jit_compile"], kwargs["jit_options"]))
                        or real_fit(*args, **kwargs))
    run = str(tmp_path / "recorded")
    assert main(["train", "--out", run, "--compile", "record"] + TINY) == 0
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["compile"] == "record"
    assert seen == [(True, None)]
    # the recorded energy and gradient give the same chains as Pyro's evaluation, to float rounding
    assert [r["log_joint"] for r in history(run)] == pytest.approx([r["log_joint"] for r in history(lpc_run)],
                                                                    rel=1e-4)
    with pytest.raises(SystemExit):
        main(["train", "--compile", "jit"])


@pytest.mark.parametrize("pattern", ["bottom-half", "random"])
def test_impute_fills_in_missing_pixels_of_test_images(lpc_run, tmp_path, capsys, pattern):
    import numpy as np
    from PIL import Image

    from pyro_lpc.images.cli import missing_pixels

    out = str(tmp_path / "imputed.png")
    assert main(["impute", lpc_run, "--mask", pattern, "-n", "4", "--num-samples", "10", "--warmup-steps", "10",
                 "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "32 of 64 pixels missing" in printed and f"wrote {out}" in printed
    figures = [float(v) for v in re.findall(r"(-?\d+\.\d+) nats", printed)]   # chains, encoder alone
    assert len(figures) == 2 and all(f < 0 for f in figures)                  # log-probabilities of 32 pixels
    assert 0.0 < float(re.search(r"MALA acceptance (\d\.\d+)", printed).group(1)) <= 1.0
    # three rows (observed / imputed / true) of 4 images, each 8x8 enlarged to 24x24, 2-pixel padding
    picture = torch.from_numpy(np.asarray(Image.open(out))[..., 0].copy()).float() / 255
    assert picture.shape == (3 * 26 + 2, 4 * 26 + 2)
    rows = picture[2:, 2:].reshape(3, 26, 4, 26)[:, :24:3, :, :24:3].permute(0, 2, 1, 3)  # (row, image, 8, 8)
    pyro.set_rng_seed(0)                                      # the command's default --seed, as it draws the mask
    observed = missing_pixels((4, 1, 8, 8), pattern)[:, 0]
    assert (~observed).sum().item() == 4 * 32
    if pattern == "bottom-half":
        assert observed[:, :4].all() and not observed[:, 4:].any()
    true = rows[2]
    assert set(true.unique().tolist()) <= {0.0, 1.0}          # statically binarised test digits
    assert torch.equal(rows[0], torch.where(observed, true, torch.tensor(128 / 255)))  # missing pixels grey
    assert torch.equal(rows[1][observed], true[observed])     # observed pixels kept
    assert not torch.equal(rows[1], true)                     # missing ones filled in with predictive means


@pytest.mark.parametrize("method", ["ula", "encoder", "pseudo-gibbs", "metropolis-within-gibbs"])
def test_impute_runs_every_method(lpc_run, capsys, method):
    assert main(["impute", lpc_run, "--method", method, "-n", "4", "--num-samples", "10", "--warmup-steps", "10"]) == 0
    printed = capsys.readouterr().out
    figures = re.findall(rf"{method} (-?\d+\.\d+) nats, encoder alone (-?\d+\.\d+) nats", printed)
    assert len(figures) == 1 and all(float(f) < 0 for f in figures[0])
    assert os.path.exists(os.path.join(lpc_run, f"imputations-bottom-half-{method}.png"))


def test_impute_refuses_bad_options(lpc_run, capsys):
    for option, value in (("--mask", "left-half"), ("--fraction", "1.5"), ("-n", "0")):
        with pytest.raises(SystemExit):
            main(["impute", lpc_run, option, value])
        assert f"argument {option}" in capsys.readouterr().err
    assert main(["impute", lpc_run, "-n", "100000"]) == 2
    assert "-n 100000: the test set holds only" in capsys.readouterr().err


def test_persistent_chains_option_is_recorded_and_keeps_every_image(tmp_path):
    run = str(tmp_path / "persistent")
    assert main(["train", "--out", run, "--persistent-chains"] + TINY) == 0
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["persistent_chains"] is True
    store = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["sampler"]["chain_store"]
    assert bool(store["seen"].all()) and store["positions"]["z"].shape[1:] == (16,)  # every image, z of 16
    assert main(["train", "--out", run, "--resume", "--epochs", "2", "--quiet"]) == 0  # resumes with its store


def test_persistent_chains_need_lpc(tmp_path, capsys):
    assert main(["train", "--method", "vae", "--persistent-chains", "--out", str(tmp_path / "vae")] + TINY) == 2
    assert "--persistent-chains keeps LPC's chains" in capsys.readouterr().err
