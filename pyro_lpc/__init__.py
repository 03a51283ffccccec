"""pyro-lpc: Langevin Predictive Coding for Pyro models (Zahid, Guo & Fountas, ICML 2024)."""
from .fit import fit
from .kernel import PCLangevin
from .lpc import LPC, NonFiniteError
from .posterior import infer_posterior
from .schedule import AdaptiveSteps
from .training import FitResult
from .vectorized import VectorizedMCMC
from .warm_start import WarmStart

__all__ = ["PCLangevin", "WarmStart", "LPC", "fit", "infer_posterior", "FitResult", "NonFiniteError",
           "AdaptiveSteps", "VectorizedMCMC"]
__version__ = "0.1.0"
