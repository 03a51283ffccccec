"""Shared test settings.

The test models are tiny: a single intra-op thread is faster for them than
two (and immune to oversubscription when other processes share the cores).
Every test and doctest starts with an empty Pyro param store.
"""
import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _empty_param_store():
    pyro.clear_param_store()
    yield
