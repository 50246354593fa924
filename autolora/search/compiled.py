"""The captured loss: ``torch.compile`` over the functional loss that every first-order pass takes.

A pass computes ``loss(w, beta; batch)`` through :func:`torch.func.functional_call` and then
``autograd.grad`` of it; compiled, dynamo captures the forward and AOTAutograd the matching
backward (compiled lazily, at the first ``autograd.grad``). A gradient of a gradient (the
``unrolled`` and ``higher`` engines) cannot go through a compiled graph, so those engines refuse
``compile=True`` (:class:`~autolora.config.SearchConfig`).

Two scopes (``compile_scope``):

- ``"blocks"`` (the default), regional compilation: the model's repeated blocks (the transformer
  layers: the largest ``nn.ModuleList`` of modules of one class, found by :func:`repeated_blocks`)
  are compiled, and everything around them (embeddings, head, loss) runs eagerly. The blocks share
  one code object, and their weights are graph inputs, so one graph serves every layer: a
  12-layer model compiles one layer's graph, not twelve layers' worth, which is what makes the
  compile time small. The compiled call is installed on the blocks only for the pass
  (``Module._compiled_call_impl``, the attribute ``nn.Module.compile`` sets) and removed after it,
  so the user's model is left as it was.
- ``"model"``: the whole loss, one graph per pass kind (fewer kernels between layers, but a
  compile time that grows with the depth). A model without repeated blocks is compiled whole.

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


def _block_at(block: nn.Module, *args: object, **kwargs: object) -> object:
    return block._call_impl(*args, **kwargs)  # the block's forward with its hooks, as Module.__call__ runs it


def _own(fn: Callable) -> Callable:
    """A copy of ``fn`` with a code object of its own (dynamo caches graphs per code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: of the ``nn.ModuleList`` s whose (two or more) entries are all
    of one class, the one holding the most parameters; ``[]`` if there is none."""
    best: list[nn.Module] = []
    best_size = 0
    for child in module.modules():
        if not isinstance(child, nn.ModuleList) or len(child) < 2:
            continue
        if len({type(m) for m in child}) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if size > best_size:
            best, best_size = list(child), size
    return best


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


# The blocks' graphs: one per pass kind (which inputs need a gradient) and per kind of block
# input (the first layer's input needs no gradient, the others' do), so 8 for darts's four pass
# kinds, 10 or more with the retrain's fixed gates, however deep the model. Dynamo's default
# limit per function (8) would send the ninth to eager without an error; this one is ours alone.
BLOCK_GRAPHS = 64


def _recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit))


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
        scope: ``"blocks"`` (compile the repeated blocks) or ``"model"`` (the whole loss).

    Attributes:
        scope: The scope in use: ``"model"`` where ``"blocks"`` was asked for and the model
            has no repeated blocks.
        blocks: The compiled blocks (empty for ``"model"``).
        seconds: Wall seconds of the passes that compiled a graph (dynamo's trace, the
            backend's forward and backward compile, and that one pass itself), not yet taken
            by :meth:`take`.
        graphs: Graphs compiled, not yet taken by :meth:`take`.
    """

    def __init__(self, module: nn.Module, backend: str = "inductor", scope: str = "blocks") -> None:
        self.module = module
        self._backend = _backend(backend)
        self.blocks = repeated_blocks(module) if scope == "blocks" else []
        self.scope = "blocks" if self.blocks else "model"
        # dynamo caches graphs on the function's code object: a copy of the code is a cache of our own
        own = _own(_block_at if self.blocks else _loss_at)
        self._fn = torch.compile(own, backend=self._backend, dynamic=None)
        self._calls = [self._block_call(b) for b in self.blocks]
        self.seconds, self.graphs = 0.0, 0

    def __call__(self, params: Mapping[str, torch.Tensor], batch: object) -> torch.Tensor:
        """The loss on ``batch`` with ``params`` (dotted names in ``module``) swapped in."""
        if not self.blocks:
            _mark_dynamic(batch)
            return self._fn(self.module, dict(params), batch)
        with self._installed():
            return functional_call(self.module, dict(params), (batch,), strict=False)

    def _block_call(self, block: nn.Module) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            _mark_dynamic(args)  # batch and sequence length vary: one graph for every shape
            _mark_dynamic(kwargs)
            return self._fn(block, *args, **kwargs)

        return call

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The compiled call on every block, and our recompile limit, for one forward (dynamo
        compiles a block's graph there; AOTAutograd's backward later needs neither)."""
        before = [b._compiled_call_impl for b in self.blocks]
        for b, call in zip(self.blocks, self._calls):
            b._compiled_call_impl = call
        try:
            with _recompile_limit(BLOCK_GRAPHS):
                yield
        finally:
            for b, impl in zip(self.blocks, before):
                b._compiled_call_impl = impl

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
