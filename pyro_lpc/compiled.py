r"""The local energy of :class:`~pyro_lpc.potential.ModelEnergy` as a plain function.

Inside a chain the model's structure does not change from step to step, yet
evaluating it through Pyro re-runs the Python model under its effect handlers
at every step. :class:`CompiledEnergies` records the per-data-point energy
``U_i(u)`` once per batch *shape* with :func:`torch.jit.trace` and afterwards
evaluates the recorded graph directly. Everything that changes between calls
is an input of the recorded function — the chain positions, the global
latents' values, the batch's tensors, the replayed subsample indices and the
model's parameters (as the param store's unconstrained tensors, which the
optimiser updates in place) — so one recording serves every batch of that shape.

Assumption (as for Pyro's ``JitTrace_ELBO``): the model's control flow depends on
tensor *shapes* only, never on tensor values, and it creates all its
parameters on the first call.

Measured (``benchmarks/step_cost.py``, MNIST MLP, batch 100, 2-core CPU): a
recorded step is 4% faster with 2 threads and 5% slower with 1 than Pyro's
evaluation, and ``fit`` is no faster — the TorchScript interpreter costs about
what Pyro's handlers do at this size. It is kept as an option for settings
dominated by per-operation overhead (small models, GPUs), where it is untested.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import pyro
import torch

from .potential import ModelEnergy, Position


class CompiledEnergies:
    """``energy.local_energy(global_values)`` recorded once per batch shape.

    Example::

        >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine, torch
        >>> from pyro_lpc.potential import ModelEnergy
        >>> def model(x):
        ...     w = pyro.param("w", torch.tensor(2.0))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(w * z, 0.5), obs=x)
        >>> x = torch.randn(5)
        >>> energy = ModelEnergy(model, (x,), {}, poutine.trace(model).get_trace(x))
        >>> compiled = CompiledEnergies()
        >>> u = {"z": torch.randn(5)}
        >>> bool(torch.allclose(compiled(energy, {})(u), energy.local_energy({})(u)))
        True
    """

    def __init__(self):
        self.recorded: Dict[tuple, torch.jit.ScriptFunction] = {}

    def __call__(self, energy: ModelEnergy, global_values: Position):
        """``position -> U_i`` for ``energy``'s batch, recorded on the first batch of its shape."""
        others, param_names = self._inputs(energy, global_values)
        local = list(energy.local)
        key = (tuple(local), tuple(global_values), tuple(param_names),
               tuple(tuple(t.shape) for t in others), repr(energy.shapes))

        def run(position):
            inputs = [position[name] for name in local] + others
            if key not in self.recorded:
                self.recorded[key] = self._record(energy, global_values, param_names, local, inputs)
            return self.recorded[key](*inputs)

        return run

    @staticmethod
    def _inputs(energy: ModelEnergy, global_values: Position) -> "tuple[List[torch.Tensor], List[str]]":
        """The tensors a recording reads besides the positions, and the parameter names."""
        store = pyro.get_param_store()
        param_names = sorted(energy.param_names)
        data = [a for a in energy.args if torch.is_tensor(a)] + \
            [v for _, v in sorted(energy.kwargs.items()) if torch.is_tensor(v)]
        subsample = [energy.replay.nodes[n]["value"] for n in sorted(energy.replay.nodes)]
        params = [store.get_param(name).unconstrained() for name in param_names]
        return list(global_values.values()) + data + subsample + params, param_names

    @staticmethod
    def _record(energy: ModelEnergy, global_values, param_names, local, inputs):
        globals_ = list(global_values)
        tensor_args = [i for i, a in enumerate(energy.args) if torch.is_tensor(a)]
        tensor_kwargs = [k for k, v in sorted(energy.kwargs.items()) if torch.is_tensor(v)]
        subsample = sorted(energy.replay.nodes)

        def function(*flat):
            it = iter(flat)
            position = {name: next(it) for name in local}
            values = {name: next(it) for name in globals_}
            args, kwargs = list(energy.args), dict(energy.kwargs)
            for i in tensor_args:
                args[i] = next(it)
            for k in tensor_kwargs:
                kwargs[k] = next(it)
            replay = energy.replay.copy()
            for name in subsample:
                replay.nodes[name] = dict(replay.nodes[name], value=next(it))
            # the parameters are the remaining inputs: the model reads them from the param
            # store, as these very tensors, so the recording takes them as inputs
            bound = energy.rebind(tuple(args), kwargs, replay)
            return bound.local_energy(values)(position)

        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated", category=FutureWarning)
            return torch.jit.trace(function, tuple(inputs), check_trace=False)
