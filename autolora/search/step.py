"""One bilevel step over a :class:`Search`: gradients at w_t, the guard, then the updates.

A :class:`Search` is everything a step reads and updates: the functional problem (weights and
selectors), its two optimisers, the engine, the counters and the non-finite guard. The trainer
builds one at setup and again whenever the set of parameters changes (pruning, retraining,
joining a process group); checkpoints capture and restore it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autolora.config import SearchConfig
from autolora.data import to_device
from autolora.errors import NonFiniteError
from autolora.gates import sparsity_penalty
from autolora.layers import GatedLoRALinear
from autolora.search.bilevel import Bilevel, LossFn, LossModule
from autolora.search.compiled import CompiledLoss
from autolora.search.guard import Guard
from autolora.search.hypergrad import Engine, MetaGrads, get_engine, meta_gradients
from autolora.state import TrainerState

Reducer = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(eq=False)
class Search:
    """The state of a bilevel search.

    Attributes:
        problem: The weights w and selectors beta of the adapted model, and its loss.
        adapters: {module: gated adapter}, aligned with ``problem.selector_names``.
        config: The search's settings.
        engine: The hypergradient engine of ``config.hypergrad``.
        state: The counters (step, epoch, data position, skips, loss scale).
        guard: The non-finite check of every loss and gradient.
        weight_optimizer: AdamW over the weights (``None`` when nothing is left to train).
        selector_optimizer: Adam over the selectors (``None`` after pruning to rank 0 everywhere).
        defer: Whether bad steps are skipped on the device (fused optimisers, no float16) and the
            host reads the verdict a step later.
    """

    problem: Bilevel
    adapters: dict[str, GatedLoRALinear]
    config: SearchConfig
    engine: Engine
    state: TrainerState
    guard: Guard
    weight_optimizer: torch.optim.Optimizer | None
    selector_optimizer: torch.optim.Optimizer | None
    defer: bool

    @property
    def device(self) -> torch.device:
        return adapters_device(self.adapters)


def adapters_device(adapters: Mapping[str, GatedLoRALinear]) -> torch.device:
    """Where the adapters live (CPU when none is left)."""
    return next(iter(adapters.values())).lora_A.device if adapters else torch.device("cpu")


def optimiser(cls: type[torch.optim.Optimizer], params, fused: bool | None = None, **kwargs) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)``, with the fused kernel when every parameter is on a CUDA device
    and it supports them (one launch per step, and ``found_inf`` skips a step on the device).
    ``fused=True`` asks for the fused kernel wherever it exists (also on CPU), ``False`` never."""
    params = list(params)
    if fused is not None:
        return cls(params, fused=True, **kwargs) if fused else cls(params, **kwargs)
    if params and all(p.device.type == "cuda" for p in params):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a dtype or device the fused kernel does not cover
            pass
    return cls(params, **kwargs)


def weight_parameters(
    model: nn.Module, adapters: Mapping[str, GatedLoRALinear], modules_to_save: Sequence[str]
) -> dict[str, nn.Parameter]:
    """The weights w, by dotted name: every lora_A, lora_B and modules_to_save parameter."""
    wanted = {id(a.lora_A) for a in adapters.values()} | {id(a.lora_B) for a in adapters.values()}
    for name in modules_to_save:
        wanted |= {id(p) for p in model.get_submodule(name).parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def autocast_context(kind: str | None, device: Callable[[], torch.device]):
    """A factory of the forward passes' autocast context (``None``: no mixed precision)."""

    def context() -> contextlib.AbstractContextManager:
        if kind is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        return torch.autocast(device_type=device().type, dtype=dtype)

    return context


def build_search(
    model: nn.Module,
    adapters: dict[str, GatedLoRALinear],
    modules_to_save: Sequence[str],
    loss_fn: LossFn,
    config: SearchConfig,
    *,
    state: TrainerState,
    guard: Guard,
    reducer: Reducer | None = None,
    fused: bool | None = None,
) -> Search:
    """A :class:`Search` over the current adapters, with fresh optimisers; ``state`` and
    ``guard`` carry over from the search it replaces. ``fused``: see :func:`optimiser` (fused
    optimisers defer the non-finite verdict to the next step)."""
    weights = weight_parameters(model, adapters, modules_to_save)
    module = LossModule(model, loss_fn)
    problem = Bilevel(
        module,
        tuple(weights),
        tuple(weights.values()),
        tuple(adapters),
        tuple(a.selector for a in adapters.values()),
        reducer=reducer,
        autocast=autocast_context(config.autocast, lambda: adapters_device(adapters)),
        compiled=CompiledLoss(module, config.compile_backend, config.compile_scope) if config.compile else None,
    )
    # after pruning every module to rank 0 nothing may be left to optimise
    weight_opt = (
        optimiser(torch.optim.AdamW, problem.weights, fused, lr=config.lr, weight_decay=config.weight_decay)
        if problem.weights
        else None
    )
    selector_opt = (
        optimiser(torch.optim.Adam, problem.selectors, fused, lr=config.selector_lr, betas=config.selector_betas)
        if problem.selectors
        else None
    )
    # bad steps are skipped on the device (fused optimisers take found_inf) and the host reads
    # the verdict a step later; float16 needs its loss scale at once, so it settles every step
    optimisers = [o for o in (weight_opt, selector_opt) if o is not None]
    defer = bool(optimisers) and all(o.defaults.get("fused") for o in optimisers) and config.autocast != "fp16"
    engine = get_engine(config.hypergrad, darts_difference=config.darts_difference)
    return Search(problem, adapters, config, engine, state, guard, weight_opt, selector_opt, defer)


def gradients(search: Search, train_batches: list, val_batches: list | None, engine: Engine | None) -> MetaGrads:
    """Gradients at the current weights over micro-batches; ``engine=None`` (or no validation
    batches) computes the weight gradient only."""
    s, device = search.config, search.device
    search.problem.loss_scale = search.state.loss_scale
    train = [to_device(b, device) for b in train_batches]
    val = [to_device(b, device) for b in val_batches] if val_batches is not None else None
    meta = meta_gradients(
        search.problem, engine if val is not None else None, train, val, xi=s.xi, fd_epsilon=s.fd_epsilon
    )
    if search.problem.compiled is not None:
        seconds, graphs = search.problem.compiled.take()
        search.state.compile_seconds += seconds
        search.state.compiled_graphs += graphs
    return meta


def apply(
    optimizer: torch.optim.Optimizer,
    params,
    grads,
    max_norm: float | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One optimiser step with the given gradients (never accumulated into ``.grad``),
    clipped to the total 2-norm ``max_norm`` first if given. A fused optimiser given
    ``found_inf`` (a device scalar) leaves parameters and state unchanged where it is
    nonzero: the ``GradScaler`` protocol, without a scaler (``grad_scale`` None)."""
    for p, g in zip(params, grads):
        p.grad = g
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if found_inf is None:
        optimizer.step()
    else:
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)


def settle(search: Search, *, counts_as_step: bool = True) -> bool:
    """Settle the pending step (see :class:`~autolora.search.guard.Guard`); returns whether it
    was skipped. A failed search step does not count as taken."""
    try:
        return search.guard.settle(search.state)
    except NonFiniteError as e:
        if counts_as_step:
            search.state.step = e.step - 1
        raise


def check(search: Search, meta: MetaGrads, step: int, *, counts_as_step: bool = True):
    """Check step ``step``: (skip it now, ``found_inf`` for the optimisers). Deferred, the host
    skips nothing and the device does."""
    settle(search, counts_as_step=counts_as_step)
    found_inf = search.guard.check(meta, step, defer=search.defer)
    if found_inf is not None:
        return False, found_inf
    return settle(search, counts_as_step=counts_as_step), None


def selector_due(search: Search) -> bool:
    """Whether the next step takes a selector step too (every ``selector_every`` steps)."""
    return (search.state.step + 1) % search.config.selector_every == 0


def sparsity_gradients(selectors: Sequence[torch.Tensor], kinds: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The gradient of the summed sparsity regulariser for each selector.

    Selectors of one gate kind and shape are stacked and penalised as one (n, r) tensor (the
    penalty sums its rows), so the regulariser costs a few kernels per group instead of a few
    per module: a step is usually launch-bound, and a model may have hundreds of adapters.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b, kind in zip(selectors, kinds):
        groups.setdefault((kind, b.shape, b.dtype, b.device), []).append(b)
    penalty = sum(sparsity_penalty(torch.stack(group), key[0]) for key, group in groups.items())
    return torch.autograd.grad(penalty, list(selectors))


def take_step(search: Search, train_batches: list, val_batches: list | None) -> dict[str, torch.Tensor]:
    """One step on micro-batches; returns its losses as device scalars (empty for a skipped
    step), so that nothing but the guard waits for the device.

    The train loss and its weight gradient are computed once at w_t; with ``val_batches`` the
    selector hypergradient is computed at w_t reusing that gradient; every loss and gradient is
    checked; then AdamW updates w and Adam updates the selectors.
    """
    s, problem = search.config, search.problem
    step = search.state.step + 1
    meta = gradients(search, train_batches, val_batches, search.engine)
    skip, found_inf = check(search, meta, step)
    if skip:
        search.state.step = step
        return {}
    selector_grads = None
    if meta.hyper is not None:
        selector_grads = list(meta.hyper.selector_grads)
        if s.sparsity > 0:
            reg = sparsity_gradients(problem.selectors, [a.gate for a in search.adapters.values()])
            selector_grads = torch._foreach_add(selector_grads, reg, alpha=s.sparsity)
    apply(search.weight_optimizer, problem.weights, meta.weight_grads, s.max_grad_norm, found_inf)
    if selector_grads is not None:
        apply(search.selector_optimizer, problem.selectors, selector_grads, found_inf=found_inf)
    search.state.step = step
    losses = {"loss/train": meta.train_loss}
    if meta.hyper is not None:
        losses["loss/val"] = meta.hyper.val_loss
    return losses


def hypergradient(search: Search, train_batch: object, val_batch: object, engine: Engine) -> dict[str, torch.Tensor]:
    """``engine``'s selector hypergradient at the current weights, with no side effect: no
    parameter, ``.grad``, optimiser state, step counter or global RNG state changes (with
    ``compile``, the compile time it spends is counted)."""
    device = search.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        meta = gradients(search, [train_batch], [val_batch], engine)
    return {n: g.detach().clone() for n, g in zip(search.problem.selector_names, meta.hyper.selector_grads)}
