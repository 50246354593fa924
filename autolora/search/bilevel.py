"""The functional view of an adapted model that the bilevel step works on.

``Bilevel`` names the two levels' parameters, the weights w (every ``lora_A``, ``lora_B`` and
``modules_to_save`` parameter) and the selectors beta, and evaluates the loss at any fast weights
through :func:`torch.func.functional_call`. The model itself is never patched and nothing writes
to ``.data``: fast weights are a mapping passed in for the length of one call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from autolora.errors import DataError
from autolora.search.compiled import CompiledLoss

LossFn = Callable[[nn.Module, object], torch.Tensor]


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    try:
        return forward is not None and "use_cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def default_loss(model: nn.Module, batch: object) -> torch.Tensor:
    """``model(**batch).loss``: the loss a Hugging Face model computes from its labels.

    A decoder whose forward takes ``use_cache`` is called with ``use_cache=False`` (unless the
    batch says otherwise): a loss pass never reads a key/value cache, and building one costs
    memory and, under ``compile``, a graph per layer (the cache is indexed by layer).
    """
    if isinstance(batch, Mapping):
        extra = {"use_cache": False} if "use_cache" not in batch and _takes_use_cache(type(model)) else {}
        out = model(**batch, **extra)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise DataError(
            "the model returned no loss for a batch. Hugging Face models compute one only when the "
            "batch holds labels: add a 'labels' key to each batch, or pass "
            "loss_fn=lambda model, batch: ... returning a scalar."
        )
    return loss


class LossModule(nn.Module):
    """model + loss_fn as one module, so ``functional_call`` can swap weights for a loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: object) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            got = f"a tensor shaped {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            if isinstance(loss, torch.Tensor) and loss.dim() == 0:
                got = f"a {loss.dtype} tensor"
            raise DataError(
                f"loss_fn(model, batch) must return a scalar float tensor with a gradient, got {got}; "
                "reduce it (e.g. .mean()) and return the tensor itself, not .item()."
            )
        return loss


class _GradModule(nn.Module):
    """Loss *and* its gradient in one forward, so both run inside one ``functional_call``.

    Computing the gradient while the fast weights are still in place matters when the model
    recomputes its forward during backward (gradient checkpointing): the recomputation then sees
    the same weights as the forward did.
    """

    def __init__(self, loss_module: LossModule) -> None:
        super().__init__()
        self.inner = loss_module

    def forward(self, batch, inputs, weight: float, create_graph: bool, retain_graph: bool, autocast):
        with autocast():
            loss = self.inner(batch)
        scaled = loss if weight == 1.0 else loss * weight
        return loss, grads_or_zeros(scaled, inputs, create_graph=create_graph, retain_graph=retain_graph)


@dataclass
class Bilevel:
    """The two levels of an adapted model.

    Attributes:
        module: ``model`` and ``loss_fn`` as one module.
        weight_names: Dotted parameter names (in ``model``) of the weights w.
        weights: The weight parameters, aligned with ``weight_names``.
        selector_names: Dotted names of the adapted modules, one per selector.
        selectors: The selector parameters, aligned with ``selector_names``.
    """

    module: LossModule
    weight_names: tuple[str, ...]
    weights: tuple[nn.Parameter, ...]
    selector_names: tuple[str, ...]
    selectors: tuple[nn.Parameter, ...]
    loss_scale: float = 1.0
    reducer: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compiled: CompiledLoss | None = None

    def __post_init__(self) -> None:
        self._keys = tuple("model." + n for n in self.weight_names)
        self._grad_module = _GradModule(self.module)
        self._grad_keys = tuple("inner." + k for k in self._keys)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._selector_keys = tuple("model." + names[id(b)] for b in self.selectors)

    @property
    def model(self) -> nn.Module:
        return self.module.model

    def loss(self, batch: object, weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The loss on ``batch`` at the model's weights, or at fast ``weights`` (same order)."""
        with self.autocast():
            if weights is None:
                return self.module(batch)
            return functional_call(self.module, dict(zip(self._keys, weights)), (batch,), strict=False)

    def value_and_grad(
        self,
        batches: Sequence[object],
        inputs: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor] | None = None,
        *,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Mean loss over micro-batches and its gradient with respect to ``inputs``.

        Every gradient of the bilevel step goes through here, so three concerns live in one
        place: gradient accumulation (one backward per micro-batch, summed with weight 1/k),
        loss scaling (the backward runs on ``loss * loss_scale`` and the result is divided back,
        as a float16 ``GradScaler`` does), and data parallelism (``reducer`` averages the
        gradients and the loss across processes, so every engine sees the gradient of the union
        of the shards). Losses are returned detached unless ``create_graph``.

        With ``compiled`` each first-order pass runs its compiled loss (a gradient of a gradient,
        ``create_graph``, stays eager: a compiled graph has no double backward).
        """
        k = len(batches)
        scale = float(self.loss_scale)
        factor = scale / k  # skipped when 1: a step is usually launch-bound, so no needless kernels
        total: torch.Tensor | None = None
        summed: list[torch.Tensor] | None = None
        # fast weights that carry a graph (the unrolled step) are shared by every micro-batch
        shared_graph = weights is not None and any(w.grad_fn is not None for w in weights)
        for i, batch in enumerate(batches):
            retain = create_graph or (shared_graph and i + 1 < k)
            if self.compiled is not None and not create_graph:
                loss, grads = self._compiled_pass(batch, inputs, weights, factor, retain)
            elif weights is None:
                with self.autocast():  # mixed precision for the forward only; backward follows its dtypes
                    loss = self.module(batch)
                scaled = loss if factor == 1.0 else loss * factor
                grads = grads_or_zeros(scaled, inputs, create_graph=create_graph, retain_graph=retain)
            else:
                params = dict(zip(self._grad_keys, weights))
                loss, grads = functional_call(
                    self._grad_module,
                    params,
                    (batch, list(inputs), factor, create_graph, retain, self.autocast),
                    strict=False,
                )
            loss = loss if create_graph else loss.detach()
            share = loss if k == 1 else loss / k
            total = share if total is None else total + share
            summed = list(grads) if summed is None else [a + g for a, g in zip(summed, grads)]
        if total is None or summed is None:
            raise DataError("a bilevel step got no batches; give at least one batch.")
        if scale != 1.0:
            summed = [g / scale for g in summed]
        if self.reducer is not None:
            *summed, total = self.reducer([*summed, total])
        return total, tuple(summed)

    def _compiled_pass(self, batch, inputs, weights, factor: float, retain: bool):
        """One micro-batch's loss and gradient through ``compiled``.

        Every weight and selector goes in as a graph input, detached unless the pass asks for
        its gradient, so the captured backward computes only the gradients in ``inputs``.
        """
        assert self.compiled is not None
        wanted = {id(x) for x in inputs}
        tensors = [*(self.weights if weights is None else weights), *self.selectors]
        keys = (*self._keys, *self._selector_keys)
        params = {k: t if id(t) in wanted else t.detach() for k, t in zip(keys, tensors)}
        with self.compiled.timing():
            with self.autocast():
                loss = self.compiled(params, batch)
            scaled = loss if factor == 1.0 else loss * factor
            grads = grads_or_zeros(scaled, inputs, retain_graph=retain)
        return loss, grads


def grads_or_zeros(
    outputs: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` with zeros (not None) for inputs the output does not depend on."""
    grads = torch.autograd.grad(
        outputs, list(inputs), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def math_attention() -> contextlib.AbstractContextManager:
    """Run scaled-dot-product attention on the math path, which has a double backward.

    The fused kernels (flash / memory-efficient / cuDNN, and the CPU flash kernel) have no
    derivative of their backward, so exact second-order engines must run inside this context.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class RngSnapshot:
    """The RNG state at one moment, to replay it (e.g. the same dropout masks) later.

    ``replay()`` runs its block with the saved state and restores the outer state afterwards,
    so replaying consumes no randomness from the caller's point of view.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self._cpu = torch.get_rng_state()
        self._gpu = [torch.cuda.get_rng_state(i) for i in self._cuda]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._cuda):
            torch.set_rng_state(self._cpu)
            for i, state in zip(self._cuda, self._gpu):
                torch.cuda.set_rng_state(state, i)
            yield
