r"""The chains' energy and its gradient, and θ's log-joint gradient, as recorded graphs.

Inside a chain the model's structure does not change from step to step, yet
evaluating it through Pyro re-runs the Python model under its effect handlers,
and autograd rebuilds its graph, at every step. [`CompiledEnergies`][pyro_lpc.compiled.CompiledEnergies]
records `u -> (U_i(u), ∇_u Σ_i U_i(u))` once per batch *shape* with
`torch.fx.experimental.proxy_tensor.make_fx` — the forward pass *and* the
backward pass, as a flat graph of tensor operations — and afterwards runs that
graph directly. Everything that changes between calls is an input of the
recording: the chain positions, the global latents' values, the batch's tensors,
the replayed subsample indices and the model's parameters (the param store's
unconstrained tensors, which the optimiser updates in place). So one recording
serves every batch of that shape. So are the sample sites' scales, as traced on
the batch: a scale read from Python state (an annealed β-VAE weight) changes the
recording's result, not the recording. θ's gradient at the kept samples,
`∇θ log p_θ(x, z_k)`, is recorded the same way
([`CompiledEnergies.theta_loss_and_grad`][pyro_lpc.compiled.CompiledEnergies.theta_loss_and_grad]).

Optionally the recording is compiled with `torch.compile` (`options`,
e.g. `{}` for Inductor's defaults, which fuses the elementwise work of the
likelihood, the prior and the backward pass into a few vectorised loops, or
`{"mode": "reduce-overhead"}` to replay it as a CUDA graph on a GPU).

Assumptions (as for Pyro's `JitTrace_ELBO`): the model's control flow depends
on tensor *shapes* only, never on tensor values; it creates all its parameters
on the first call; tensors it holds other than its parameters (buffers,
constants) are read as they were when recorded.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import langevin
from .potential import Position, PyroEvaluation, SplitEnergy, param_grads


#: recordings after which a warning says that something keeps changing between batches
MANY_RECORDINGS = 8


class CompiledEnergies(PyroEvaluation):
    """A [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] evaluated by recordings: the same two methods
    as [`PyroEvaluation`][pyro_lpc.potential.PyroEvaluation] (the backend through Pyro), with the local
    chains' value-and-gradient and θ's gradient recorded once per batch shape. While global
    latents move with the local chains their joint evaluation goes through Pyro.

    Args:
        options: `None` to run the recording as is, or keyword arguments of
            `torch.compile` to compile it (once per batch shape).

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine, torch
        >>> from pyro_lpc import langevin
        >>> from pyro_lpc.potential import SplitEnergy
        >>> def model(x):
        ...     w = pyro.param("w", torch.tensor(2.0))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(w * z, 0.5), obs=x)
        >>> x = torch.randn(5)
        >>> energy = SplitEnergy(model, (x,), {}, poutine.trace(model).get_trace(x))
        >>> recorded = CompiledEnergies().evaluation(energy, {}, move_globals=False)
        >>> u = {"z": torch.randn(5)}
        >>> (value, grad), _ = recorded(u, {})
        >>> ref_value, ref_grad = langevin.value_and_grad(energy.local_energy({}))(u)
        >>> bool(torch.allclose(value, ref_value) and torch.allclose(grad["z"], ref_grad["z"]))
        True

        ```
    """

    traces_every_call = False  # the sites' scales are inputs, read from each batch's prototype trace

    def __init__(self, options: Optional[dict] = None):
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"jit_options must be a dict of torch.compile options or None, got {options!r}.")
        self.options = options
        # a recording per key; for θ's gradient with which parameters it differentiates
        self.recorded: Dict[tuple, Union[Callable, Tuple[Callable, List[bool]]]] = {}

    def evaluation(self, energy: SplitEnergy, global_values: Position, move_globals: bool):
        """As [`PyroEvaluation.evaluation`][pyro_lpc.potential.PyroEvaluation.evaluation]; the local energies
        recorded (on first use)."""
        if move_globals and energy.globals:
            return super().evaluation(energy, global_values, move_globals)
        local, globals_ = list(energy.local), list(global_values)
        others, param_names = _inputs(energy, [global_values[name] for name in globals_])

        key = ("local", tuple(local), tuple(globals_), tuple(param_names), tuple(sorted(energy.scales)),
               repr(energy.shapes), _signature(others))

        def function(*flat):
            it = iter(flat)
            position = {name: next(it) for name in local}
            values = {name: next(it) for name in globals_}
            value, grads = langevin.value_and_grad(_bind(energy, it).local_energy(values))(position)
            return (value, *[grads[name] for name in local])

        def evaluate(position: Position, global_: Position):
            positions = [position[name].detach() for name in local]  # recording marks them as needing grad
            if key not in self.recorded:
                self.recorded[key] = self._record(function, positions + others)
            value, *grads = self._run(self.recorded[key], positions + others)
            return (value, dict(zip(local, grads))), (None, {})

        return evaluate

    def theta_loss_and_grad(self, energy: SplitEnergy, values: Position, num_samples: int = 1):
        """As [`PyroEvaluation.theta_loss_and_grad`][pyro_lpc.potential.PyroEvaluation.theta_loss_and_grad]:
        `(log_p, params, grads, None)`, the scaled `log p_θ(x, z)` at constrained `values`, the param
        store's unconstrained tensors by name and the gradients of `-log p_θ(x, z) / num_samples`
        (`None` for a parameter the log-joint does not use), `∇θ log p` recorded once per batch shape;
        no trace."""
        sites = sorted(values)
        others, param_names = _inputs(energy, [values[name] for name in sites])
        key = ("theta", tuple(sites), tuple(param_names), tuple(sorted(energy.scales)), repr(energy.shapes),
               _signature(others))
        if key not in self.recorded:
            used = []  # which parameters the log-joint reaches (found while recording)

            def function(*flat):
                it = iter(flat)
                site_values = {name: next(it) for name in sites}
                bound = _bind(energy, it)
                params = list(it)  # the param store's own tensors while recording: leaves needing grad
                with torch.enable_grad():
                    log_p = bound.log_joint(site_values)[0]
                    grads = param_grads(log_p, params)
                used[:] = [g is not None for g in grads]
                return (log_p.detach(), *[g for g in grads if g is not None])

            self.recorded[key] = (self._record(function, others), used)
        recorded, used = self.recorded[key]
        log_p, *found = self._run(recorded, others)
        found = iter(found)
        params = others[len(others) - len(param_names):]
        grads = [-next(found) / num_samples if u else None for u in used]
        return log_p, dict(zip(param_names, params)), grads, None

    def _record(self, function, inputs: List[torch.Tensor]):
        """`function` (forward and backward) as one graph; its inputs — the batch and the
        parameters as these very tensors — become placeholders rather than constants."""
        if len(self.recorded) == MANY_RECORDINGS:
            warnings.warn(
                f"jit_compile has recorded {MANY_RECORDINGS} graphs: batches keep changing shape, or a "
                "non-tensor argument of the model (a float, say) keeps changing value, and each new one is "
                "recorded (and compiled) afresh. Pass such a value as a tensor, or use jit_compile=False.",
                RuntimeWarning)
        with pyro.validation_enabled(False), torch.no_grad():
            recorded = make_fx(function)(*inputs)
        if self.options is not None:
            recorded = torch.compile(recorded, dynamic=False, **self.options)
        return recorded

    def _run(self, recorded, inputs: List[torch.Tensor]):
        with torch.no_grad():
            outputs = recorded(*[t.detach() for t in inputs])
            if self.options is not None:  # a CUDA graph's next replay overwrites its outputs
                outputs = [t.clone() for t in outputs]
        return outputs


def _inputs(energy: SplitEnergy, leading: List[torch.Tensor]) -> "tuple[List[torch.Tensor], List[str]]":
    """The tensors a recording reads after `leading`: the batch's tensors (also those inside
    lists, tuples and dicts), the replayed subsample indices, the sample sites' scales and the
    parameters (unconstrained, as the optimiser updates them); and the parameters' names."""
    store = pyro.get_param_store()
    param_names = sorted(energy.param_names)
    data = [v for v in tree_flatten((list(energy.args), dict(energy.kwargs)))[0] if torch.is_tensor(v)]
    subsample = [energy.replay.nodes[n]["value"] for n in sorted(energy.replay.nodes)]
    floats = [t for t in list(leading) + data if t.is_floating_point()]  # the batch's device and precision
    like = dict(device=floats[0].device, dtype=floats[0].dtype) if floats else {}
    scales = [torch.as_tensor(energy.scales[n], **like) for n in sorted(energy.scales)]
    params = [store.get_param(name).unconstrained() for name in param_names]
    return list(leading) + data + subsample + scales + params, param_names


class _Scales(Messenger):
    """Sets each named sample site's scale to the given tensor (a recording's input)."""

    def __init__(self, scales: Dict[str, torch.Tensor]):
        super().__init__()
        self.scales = scales

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.scales:
            msg["scale"] = self.scales[msg["name"]]


def _bind(energy: SplitEnergy, inputs) -> SplitEnergy:
    """`energy` on the batch tensors, subsample indices and scales taken, in `_inputs`'
    order, from the iterator `inputs` (the parameters that follow are read by the model
    itself). The scales replace those the model's handlers set: the wrapper is outermost, so
    it processes each site last."""
    leaves, spec = tree_flatten((list(energy.args), dict(energy.kwargs)))
    args, kwargs = tree_unflatten([next(inputs) if torch.is_tensor(v) else v for v in leaves], spec)
    replay = energy.replay.copy()
    for name in sorted(replay.nodes):
        replay.nodes[name] = dict(replay.nodes[name], value=next(inputs))
    bound = energy.rebind(tuple(args), kwargs, replay)
    bound.model = _Scales({name: next(inputs) for name in sorted(energy.scales)})(energy.model)
    return bound


def _signature(tensors: List[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
