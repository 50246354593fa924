"""The captured loss: ``torch.compile`` over the functional loss that every first-order pass takes.

A pass computes ``loss(w, beta; batch)`` through :func:`torch.func.functional_call` and then
``autograd.grad`` of it; compiled, dynamo captures the forward and AOTAutograd the matching
backward (compiled lazily, at the first ``autograd.grad``). A gradient of a gradient (the
``unrolled`` and ``higher`` engines) cannot go through a compiled graph, so those engines refuse
``compile=True`` (:class:`~autolora.config.SearchConfig`).

Every dimension of the batch's tensors is marked dynamic (``maybe_mark_dynamic``) before the
first call, so one graph serves every batch size and sequence length (GLUE and E2E batches vary
in length); the weights' shapes stay static. Each set of inputs that need a gradient (the
weights, the selectors, or both) is its own graph, so the backward computes only what the pass
asks for: ``first_order`` captures two graphs, ``darts`` four (its train pass also takes the
selectors, for the forward difference).

Each :class:`CompiledLoss` has its own dynamo cache (its own code object), so trainers in one
process never share ``torch._dynamo.config.recompile_limit`` (8 graphs per function): a second
model, or a test suite of them, cannot push a search past it and back to eager.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from autolora.errors import ConfigError


class _TimedBackend:
    """A dynamo backend that counts the graphs it compiles, around the named one."""

    def __init__(self, name: str) -> None:
        import torch._dynamo
        from torch._dynamo.exc import InvalidBackend

        try:
            self._inner = torch._dynamo.lookup_backend(name)
        except InvalidBackend:
            known = ", ".join(torch._dynamo.list_backends())
            raise ConfigError(
                f"compile_backend={name!r} is not a torch.compile backend; choose one of {known} "
                "(or 'aot_eager', which traces without generating code)."
            ) from None
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self._inner(gm, example_inputs)


def _loss_at(module: nn.Module, params: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
    return functional_call(module, params, (batch,), strict=False)


def _mark_dynamic(batch: object) -> None:
    """Mark every dimension of the batch's tensors dynamic (a hint: dynamo may still specialise)."""
    import torch._dynamo

    if isinstance(batch, torch.Tensor):
        if batch.dim():
            torch._dynamo.maybe_mark_dynamic(batch, list(range(batch.dim())))
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _mark_dynamic(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _mark_dynamic(value)


# One wrapper per backend name for the whole process (the lookup happens once); each CompiledLoss
# reads the count as a difference around its own passes.
_BACKENDS: dict[str, _TimedBackend] = {}


def _backend(name: str) -> _TimedBackend:
    if name not in _BACKENDS:
        _BACKENDS[name] = _TimedBackend(name)
    return _BACKENDS[name]


class CompiledLoss:
    """``functional_call(module, params, (batch,))``, compiled, with the time spent compiling.

    Args:
        module: The loss module (model and loss function).
        backend: The ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` captures the
            same graphs without generating code).

    Attributes:
        seconds: Wall seconds of the passes that compiled a graph (dynamo's trace, the
            backend's forward and backward compile, and that one pass itself), not yet taken
            by :meth:`take`.
        graphs: Graphs compiled, not yet taken by :meth:`take`.
    """

    def __init__(self, module: nn.Module, backend: str = "inductor") -> None:
        self.module = module
        self._backend = _backend(backend)
        # dynamo caches graphs on the function's code object: a copy of the code is a cache of our own
        own = types.FunctionType(_loss_at.__code__.replace(), _loss_at.__globals__, _loss_at.__name__)
        self._fn = torch.compile(own, backend=self._backend, dynamic=None)
        self.seconds, self.graphs = 0.0, 0

    def __call__(self, params: Mapping[str, torch.Tensor], batch: object) -> torch.Tensor:
        """The loss on ``batch`` with ``params`` (dotted names in ``module``) swapped in."""
        _mark_dynamic(batch)
        return self._fn(self.module, dict(params), batch)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Time the block (a forward and its backward) if it compiled a graph."""
        before, start = self._backend.graphs, time.perf_counter()
        yield
        new = self._backend.graphs - before
        if new:
            self.seconds += time.perf_counter() - start
            self.graphs += new

    def take(self) -> tuple[float, int]:
        """(seconds, graphs) since the last call, and reset them."""
        out, (self.seconds, self.graphs) = (self.seconds, self.graphs), (0.0, 0)
        return out
