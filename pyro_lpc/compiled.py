r"""The local chains' energy and its gradient as one recorded graph.

Inside a chain the model's structure does not change from step to step, yet
evaluating it through Pyro re-runs the Python model under its effect handlers,
and autograd rebuilds its graph, at every step. :class:`CompiledEnergies`
records ``u -> (U_i(u), ∇_u Σ_i U_i(u))`` once per batch *shape* with
:func:`torch.fx.experimental.proxy_tensor.make_fx` — the forward pass *and* the
backward pass, as a flat graph of tensor operations — and afterwards runs that
graph directly. Everything that changes between calls is an input of the
recording: the chain positions, the global latents' values, the batch's tensors,
the replayed subsample indices and the model's parameters (the param store's
unconstrained tensors, which the optimiser updates in place). So one recording
serves every batch of that shape.

Optionally the recording is compiled with :func:`torch.compile` (``options``,
e.g. ``{}`` for Inductor's defaults, which fuses the elementwise work of the
likelihood, the prior and the backward pass into a few vectorised loops, or
``{"mode": "reduce-overhead"}`` to replay it as a CUDA graph on a GPU).

Assumptions (as for Pyro's ``JitTrace_ELBO``): the model's control flow depends
on tensor *shapes* only, never on tensor values; it creates all its parameters
on the first call; tensors it holds other than its parameters (buffers,
constants) are read as they were when recorded.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .potential import ModelEnergy, Position


class CompiledEnergies:
    """``energy``'s local value-and-gradient function, recorded once per batch shape.

    ``CompiledEnergies(options)(energy, global_values)`` is a drop-in for
    ``langevin.value_and_grad(energy.local_energy(global_values))``.

    :param options: ``None`` to run the recording as is, or keyword arguments of
        :func:`torch.compile` to compile it (once per batch shape).

    Example::

        >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine, torch
        >>> from pyro_lpc import langevin
        >>> from pyro_lpc.potential import ModelEnergy
        >>> def model(x):
        ...     w = pyro.param("w", torch.tensor(2.0))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(w * z, 0.5), obs=x)
        >>> x = torch.randn(5)
        >>> energy = ModelEnergy(model, (x,), {}, poutine.trace(model).get_trace(x))
        >>> recorded = CompiledEnergies()(energy, {})
        >>> u = {"z": torch.randn(5)}
        >>> (value, grad), (ref_value, ref_grad) = recorded(u), langevin.value_and_grad(energy.local_energy({}))(u)
        >>> bool(torch.allclose(value, ref_value) and torch.allclose(grad["z"], ref_grad["z"]))
        True
    """

    def __init__(self, options: Optional[dict] = None):
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"torch.compile options must be a dict or None, got {type(options).__name__}.")
        self.options = options
        self.recorded: Dict[tuple, torch.nn.Module] = {}

    def __call__(self, energy: ModelEnergy, global_values: Position):
        """``position -> (U_i, {site: ∇U})`` for ``energy``'s batch (recorded on first use)."""
        others, param_names = self._inputs(energy, global_values)
        local = list(energy.local)
        key = (tuple(local), tuple(global_values), tuple(param_names), repr(energy.shapes),
               tuple((tuple(t.shape), t.dtype, t.device) for t in others))

        def value_and_grad(position: Position):
            inputs = [position[name].detach() for name in local] + others
            if key not in self.recorded:
                self.recorded[key] = self._record(energy, global_values, local, inputs)
            with torch.no_grad():
                value, *grads = self.recorded[key](*[t.detach() for t in inputs])
                if self.options is not None:  # a CUDA graph's next replay overwrites its outputs
                    value, grads = value.clone(), [g.clone() for g in grads]
            return value, dict(zip(local, grads))

        return value_and_grad

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

    def _record(self, energy: ModelEnergy, global_values, local, inputs):
        globals_ = list(global_values)
        tensor_args = [i for i, a in enumerate(energy.args) if torch.is_tensor(a)]
        tensor_kwargs = [k for k, v in sorted(energy.kwargs.items()) if torch.is_tensor(v)]
        subsample = sorted(energy.replay.nodes)

        def function(*flat):
            it = iter(flat)
            position = {name: next(it).requires_grad_(True) for name in local}
            values = {name: next(it) for name in globals_}
            args, kwargs = list(energy.args), dict(energy.kwargs)
            for i in tensor_args:
                args[i] = next(it)
            for k in tensor_kwargs:
                kwargs[k] = next(it)
            replay = energy.replay.copy()
            for name in subsample:
                replay.nodes[name] = dict(replay.nodes[name], value=next(it))
            with torch.enable_grad():
                value = energy.rebind(tuple(args), kwargs, replay).local_energy(values)(position)
                grads = torch.autograd.grad(value.sum(), [position[name] for name in local])
            return (value.detach(), *grads)

        # The model reads its parameters (and the batch) as these very tensors; recording with them
        # as the inputs makes them placeholders of the graph rather than constants.
        with pyro.validation_enabled(False), torch.no_grad():
            recorded = make_fx(function)(*inputs)
        if self.options is not None:
            recorded = torch.compile(recorded, dynamic=False, **self.options)
        return recorded
