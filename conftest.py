"""Shared test settings.

The test models are tiny: a single intra-op thread is faster for them than
two (and immune to oversubscription when other processes share the cores).
"""
import torch

torch.set_num_threads(1)
