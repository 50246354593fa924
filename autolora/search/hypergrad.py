"""Selector hypergradient engines, one signature, chosen by name.

Every engine targets the one-step unrolled hypergradient

    h = d/dbeta L_val(w - xi * grad_w L_train(w, beta), beta)

at the current weights w, with xi the step of a plain SGD virtual step (no weight decay,
clipping or regulariser). They differ in how exactly they compute it:

- ``first_order``: grad_beta L_val(w, beta), the xi -> 0 limit (1 extra pass).
- ``darts``: finite differences (DARTS), w' = w - xi g, v = grad_w L_val(w'), eps = c / ||v||,
  h = grad_beta L_val(w') - xi * D, where D differences f(t) = grad_beta L_tr(w + t v), whose
  slope f'(0) is the mixed product grad^2_{beta,w} L_tr(w) v. Forward (the default), with f(0)
  from the train step's own backward: D = [f(eps) - f(0)] / eps = f'(0) + eps f''(0) / 2 +
  O(eps^2) (2 extra passes). Central (the paper's code): D = [f(eps) - f(-eps)] / (2 eps) =
  f'(0) + eps^2 f^(3)(0) / 6 + O(eps^4) (3 extra passes). As ||eps v|| = c, the errors relative
  to the mixed product are O(c) and O(c^2). The paper's code omits the factor xi; it is
  included here.
- ``unrolled``: exact, by double backward through the step's own train gradient (built with
  ``create_graph=True``) and ``torch.func.functional_call`` over fast weights.
- ``higher``: exact, through the ``higher`` library's differentiable SGD; an independent
  cross-check of ``unrolled`` that users know.

Each engine gets the train gradient g = grad_w L_train(w, beta) the weight step already computed
(and, if it asks, grad_beta L_train(w, beta) from the same backward), and returns the selector
gradients plus the validation loss it saw.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from autolora.config import ENGINE_NAMES, SECOND_ORDER_ENGINES, DartsDifference
from autolora.errors import ConfigError
from autolora.search.bilevel import Bilevel, RngSnapshot, grads_or_zeros, math_attention


@dataclass(frozen=True)
class Hypergrad:
    """An engine's result: one gradient per selector, and the validation loss it evaluated."""

    selector_grads: tuple[torch.Tensor, ...]
    val_loss: torch.Tensor


@runtime_checkable
class Engine(Protocol):
    """A hypergradient engine: a function of the bilevel problem plus what it needs of the step.

    Attributes:
        second_order: Differentiates through a gradient (double backward); the train forward it
            differentiates twice runs with math attention. Such engines cannot run under data
            parallelism or gradient checkpointing (:func:`check_capabilities`).
        graph_train_grads: Needs the step's train gradient built with ``create_graph=True``.
        replays_train_pass: Re-runs the train forward and needs its RNG state (dropout masks).
        wants_train_selector_grads: Needs grad_beta L_train(w) too, which the step's train
            backward then computes alongside g (only on selector steps) and passes as
            ``train_selector_grads``.
    """

    second_order: bool
    graph_train_grads: bool
    replays_train_pass: bool
    wants_train_selector_grads: bool

    def __call__(
        self,
        problem: Bilevel,
        train_batches: Sequence[object],
        val_batches: Sequence[object],
        train_grads: Sequence[torch.Tensor],
        *,
        xi: float,
        fd_epsilon: float,
        train_rng: RngSnapshot | None,
        train_selector_grads: Sequence[torch.Tensor] | None,
    ) -> Hypergrad: ...


@dataclass(frozen=True)
class FunctionEngine:
    """An :class:`Engine` made of a plain function and its capability flags."""

    fn: Callable[..., Hypergrad]
    second_order: bool
    graph_train_grads: bool
    replays_train_pass: bool = False
    wants_train_selector_grads: bool = False

    def __call__(self, problem, train_batches, val_batches, train_grads, **kwargs) -> Hypergrad:
        return self.fn(problem, train_batches, val_batches, train_grads, **kwargs)


def _first_order(problem: Bilevel, train_batches, val_batches, train_grads, **_) -> Hypergrad:
    val_loss, grads = problem.value_and_grad(val_batches, problem.selectors)
    return Hypergrad(grads, val_loss)


def _virtual_validation(problem: Bilevel, val_batches, train_grads, xi: float):
    """The validation pass at the virtual weights w' = w - xi g, detached from g.

    Returns:
        (validation loss, v = grad_w' L_val(w'), grad_beta L_val(w')).
    """
    n = len(problem.weights)
    with torch.no_grad():
        w_virtual = [
            x.requires_grad_() for x in torch._foreach_add(list(problem.weights), list(train_grads), alpha=-xi)
        ]
    val_loss, grads = problem.value_and_grad(val_batches, [*w_virtual, *problem.selectors], w_virtual)
    return val_loss, list(grads[:n]), grads[n:]


def _darts(
    problem: Bilevel,
    train_batches,
    val_batches,
    train_grads,
    *,
    xi: float,
    fd_epsilon: float,
    train_rng: RngSnapshot,
    train_selector_grads: Sequence[torch.Tensor] | None,
    **_,
) -> Hypergrad:
    # the forward difference from the step's f(0) = grad_beta L_tr(w) when given, else central
    val_loss, v, direct = _virtual_validation(problem, val_batches, train_grads, xi)
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)).double()))  # the one sync
    if xi == 0 or not math.isfinite(norm) or norm == 0:
        return Hypergrad(direct, val_loss)
    eps = fd_epsilon / norm

    w = [p.detach() for p in problem.weights]

    def train_selector_grads_at(sign: float) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            w_shift = torch._foreach_add(w, v, alpha=sign * eps)
        with train_rng.replay():  # the same dropout masks as the train step's gradient
            return problem.value_and_grad(train_batches, problem.selectors, w_shift)[1]

    plus = train_selector_grads_at(+1.0)
    if train_selector_grads is None:
        base, span = train_selector_grads_at(-1.0), 2 * eps
    else:
        base, span = tuple(train_selector_grads), eps
    scale = xi / span
    hyper = tuple(d - scale * (p - m) for d, p, m in zip(direct, plus, base))
    return Hypergrad(hyper, val_loss)


def _unrolled(problem: Bilevel, train_batches, val_batches, train_grads, *, xi: float, **_) -> Hypergrad:
    # train_grads g carry their graph (create_graph=True). By the chain rule, with w' = w - xi g
    # and v = grad_w' L_val(w'),
    #     h = d/dbeta L_val(w', beta) = grad_beta L_val(w') - xi * grad_beta <g(w, beta), v>.
    # The validation pass runs at a *detached* w' (a plain first-order pass, fused attention
    # allowed) and its graph is freed before the double backward through the train graph runs,
    # so the two never share the memory peak. The result is exact, the same as differentiating
    # through w' directly.
    val_loss, v, direct = _virtual_validation(problem, val_batches, train_grads, xi)
    if xi == 0:
        return Hypergrad(direct, val_loss)
    scale = float(problem.loss_scale)  # float16: keep the double backward above underflow too
    dot = torch.stack([(g * u).sum() for g, u in zip(train_grads, v)]).sum()
    mixed = grads_or_zeros(dot * (scale * xi), problem.selectors)
    return Hypergrad(tuple(d - m / scale for d, m in zip(direct, mixed)), val_loss)


def _higher(
    problem: Bilevel, train_batches, val_batches, train_grads, *, xi: float, train_rng: RngSnapshot, **_
) -> Hypergrad:
    try:
        import higher
    except ImportError as e:
        raise ConfigError(
            f"hypergrad='higher' needs the 'higher' package, which failed to import ({e}); "
            "pip install higher, or use hypergrad='unrolled' (the same quantity via torch.func)."
        ) from None
    if len(train_batches) != 1 or len(val_batches) != 1 or problem.loss_scale != 1.0 or problem.reducer:
        raise ConfigError(
            "hypergrad='higher' takes its own differentiable step on one whole batch, so it cannot combine with "
            "grad_accum_steps > 1, float16 loss scaling or data parallelism; use hypergrad='unrolled' (the same "
            "exact hypergradient through torch.func) or autocast='bf16'."
        )
    (train_batch,), (val_batch,) = train_batches, val_batches
    sgd = torch.optim.SGD(problem.weights, lr=xi)
    # copy_initial_weights=False: the fast model starts from the real parameters, so the
    # selectors stay connected (the default would detach them and their gradient is None).
    with higher.innerloop_ctx(problem.module, sgd, copy_initial_weights=False, track_higher_grads=True) as (fmod, dopt):
        try:
            # the weight step's dropout masks; math attention, as this pass is differentiated twice
            with train_rng.replay(), problem.autocast(), math_attention():
                train_loss = fmod(train_batch)
            dopt.step(train_loss)
            with problem.autocast():
                val_loss = fmod(val_batch)
        except TypeError as e:
            if "MonkeyPatched" not in str(e):
                raise
            # higher rebuilds every module as a new class whose constructor differs, so code
            # that re-creates a module (e.g. slicing a ModuleList, as Llama does) breaks.
            raise ConfigError(
                f"the 'higher' library cannot run this model ({type(problem.model).__name__}): it re-creates "
                "a submodule, which higher's patched classes do not support. Use hypergrad='unrolled', "
                "which computes the same exact hypergradient through torch.func."
            ) from None
        grads = grads_or_zeros(val_loss, problem.selectors)
    return Hypergrad(grads, val_loss.detach())


# The one registry of engines; SearchConfig.hypergrad accepts its keys (config.EngineName).
# "darts" is the forward difference; DARTS_CENTRAL below is darts_difference="central".
ENGINES: dict[str, Engine] = {
    "first_order": FunctionEngine(_first_order, second_order=False, graph_train_grads=False),
    "darts": FunctionEngine(
        _darts, second_order=False, graph_train_grads=False, replays_train_pass=True, wants_train_selector_grads=True
    ),
    "unrolled": FunctionEngine(_unrolled, second_order=True, graph_train_grads=True),
    # higher takes its own differentiable step, so the step's gradient needs no graph
    "higher": FunctionEngine(_higher, second_order=True, graph_train_grads=False, replays_train_pass=True),
}
assert tuple(ENGINES) == ENGINE_NAMES, "EngineName in config.py lists the keys of ENGINES"
assert tuple(n for n, e in ENGINES.items() if e.second_order) == SECOND_ORDER_ENGINES, "config.SECOND_ORDER_ENGINES"
# without grad_beta L_train(w) from the step, _darts takes the central difference
DARTS_CENTRAL: Engine = FunctionEngine(_darts, second_order=False, graph_train_grads=False, replays_train_pass=True)


def _registered(name: str) -> Engine:
    if name not in ENGINES:
        raise ConfigError(f"hypergrad={name!r} is not an engine; choose one of {', '.join(map(repr, ENGINES))}.")
    return ENGINES[name]


def get_engine(name: str, *, darts_difference: DartsDifference) -> Engine:
    """The engine called ``name``; for ``"darts"``, the one of ``darts_difference``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    engine = _registered(name)
    return DARTS_CENTRAL if name == "darts" and darts_difference == "central" else engine


def check_capabilities(name: str, *, data_parallel: bool = False, checkpointing: bool = False) -> None:
    """Refuse an engine where it cannot run: second-order engines under data parallelism or
    gradient checkpointing.

    Raises:
        ConfigError: naming the engine and what to use instead.
    """
    if not _registered(name).second_order:
        return
    if checkpointing:
        raise ConfigError(
            f"hypergrad={name!r} cannot run with gradient_checkpointing: its double backward "
            "re-runs checkpointed blocks outside the fast weights it differentiates through. Use "
            "hypergrad='darts' or 'first_order' with checkpointing, or turn checkpointing off."
        )
    if data_parallel:
        raise ConfigError(
            f"hypergrad={name!r} is not supported with data parallelism: its "
            "double backward would need a differentiable all-reduce inside the unrolled step. Use "
            "hypergrad='darts' (the same one-step hypergradient by finite differences) or 'first_order'."
        )


@dataclass(frozen=True)
class MetaGrads:
    """Everything one bilevel step needs, computed at the current weights w_t."""

    train_loss: torch.Tensor
    weight_grads: tuple[torch.Tensor, ...]
    hyper: Hypergrad | None


def meta_gradients(
    problem: Bilevel, engine: Engine | None, train_batches, val_batches, *, xi: float, fd_epsilon: float
) -> MetaGrads:
    """Train loss and weight gradient at w_t, then (with an engine) the hypergradient reusing it.

    ``train_batches`` and ``val_batches`` are sequences of micro-batches (one for a plain step);
    their gradients are accumulated. Only a train forward that will be differentiated twice (the
    ``create_graph`` train gradient of ``unrolled``, ``higher``'s own train pass) runs with math
    attention: the double backward goes through that pass alone, so every other forward, the
    validation passes included, keeps the fused kernels. With ``engine=None`` only the weight
    gradient is computed (a step without a selector update); only an engine that asks for it
    (``darts``' forward difference) gets grad_beta L_train(w) from that same backward.
    """
    graph = engine is not None and engine.graph_train_grads
    replays = engine is not None and engine.replays_train_pass
    train_rng = RngSnapshot(list({p.device for p in problem.weights})) if replays else None
    # the selectors are more inputs of the same forward: one backward gives g and grad_beta L_train
    with_selectors = engine is not None and engine.wants_train_selector_grads
    inputs = [*problem.weights, *problem.selectors] if with_selectors else problem.weights
    with math_attention() if graph else contextlib.nullcontext():
        train_loss, grads = problem.value_and_grad(train_batches, inputs, create_graph=graph)
    n = len(problem.weights)
    weight_grads, train_selector_grads = grads[:n], (grads[n:] if with_selectors else None)
    hyper = None
    if engine is not None:
        hyper = engine(
            problem,
            train_batches,
            val_batches,
            weight_grads,
            xi=xi,
            fd_epsilon=fd_epsilon,
            train_rng=train_rng,
            train_selector_grads=train_selector_grads,
        )
    # without create_graph the gradients carry no graph: a detach per weight would be one more
    # host dispatch per tensor (420 for 210 adapted modules) that changes nothing
    weight_grads = tuple(g.detach() for g in weight_grads) if graph else tuple(weight_grads)
    return MetaGrads(train_loss.detach(), weight_grads, hyper)
