"""pyro-lpc: Langevin Predictive Coding for Pyro models (Zahid, Guo & Fountas, ICML 2024)."""
from .kernel import PCLangevin

__all__ = ["PCLangevin"]
__version__ = "0.1.0"
