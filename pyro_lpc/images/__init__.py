"""The image application: deep latent Gaussian models of images learned with LPC or Pyro's SVI.

[`data`][pyro_lpc.images.data] (image datasets, the embedded 8×8 digits by default),
[`models`][pyro_lpc.images.models] (reference MLP and convolutional decoders/encoders and
their likelihoods), [`sample_quality`][pyro_lpc.images.sample_quality] (Fréchet distance,
density/coverage, feature extractors), and the `pyro-lpc` command
(`cli`, writing run directories through
`runs` and pictures through `plots`), and the baselines for filling in missing pixels
([`imputation`][pyro_lpc.images.imputation]: `encoder_draws`, `pseudo_gibbs`,
`metropolis_within_gibbs`). `load_run(run_dir)` returns a trained run's model, guide
and learned parameters:

```python
from pyro_lpc.images import load_run
run = load_run("runs/digits-lpc")  # after `pyro-lpc train`; Pyro's param store now holds the run's parameters
images = run.dlgm.sample(16)       # or run.model / run.guide with any Pyro inference
```

It needs the `images` extra (matplotlib, scikit-learn, torchmetrics, prdc) on top of the
core's dependencies: `pip install "pyro-lpc[images]"`. The core (`PCLangevin`, `fit`,
the marginal-likelihood estimators) never imports this subpackage.
"""
import importlib.util

#: The ``images`` extra's packages: import name -> distribution name.
EXTRA = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "prdc": "prdc"}

_missing = [package for name, package in EXTRA.items() if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"pyro_lpc.images needs the 'images' extra, which is not installed (missing: "
                      f"{', '.join(_missing)}): pip install \"pyro-lpc[images]\"")


def __getattr__(name):
    """`load_run` and `Run` from `runs`, and the imputation baselines, imported on first use (`runs`
    imports the whole application)."""
    if name in ("load_run", "Run"):
        from . import runs

        return getattr(runs, name)
    if name in ("encoder_draws", "pseudo_gibbs", "metropolis_within_gibbs", "ImputationDraws"):
        from . import imputation

        return getattr(imputation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
