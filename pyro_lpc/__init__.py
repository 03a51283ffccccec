"""pyro-lpc: Langevin Predictive Coding for Pyro models (Zahid, Guo & Fountas, ICML 2024)."""
from .fit import FitResult, NonFiniteError, fit
from .kernel import PCLangevin
from .schedule import AdaptiveSteps
from .warm_start import WarmStart

__all__ = ["PCLangevin", "WarmStart", "fit", "FitResult", "NonFiniteError", "AdaptiveSteps"]
__version__ = "0.1.0"
