"""Frozen, validated configuration: one dataclass per concern.

The Python API (:class:`~autolora.AutoLoRATrainer`) and the YAML configs of the CLI map onto the
same dataclasses, so a value is validated the same way wherever it comes from. Each default is
declared here once; the trainer's keyword arguments are these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

from autolora.errors import ConfigError

GateKind = Literal["softmax", "sigmoid"]
EngineName = Literal["first_order", "darts", "unrolled", "higher"]
DartsDifference = Literal["forward", "central"]
CompileScope = Literal["blocks", "model"]
AutocastKind = Literal["bf16", "fp16"]
LoggerName = Literal["tensorboard", "jsonl"]

GATE_KINDS: tuple[str, ...] = get_args(GateKind)
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)  # the keys of autolora.search.hypergrad.ENGINES
DARTS_DIFFERENCES: tuple[str, ...] = get_args(DartsDifference)
COMPILE_SCOPES: tuple[str, ...] = get_args(CompileScope)
AUTOCAST_KINDS: tuple[str, ...] = get_args(AutocastKind)
LOGGER_NAMES: tuple[str, ...] = get_args(LoggerName)  # the keys of autolora.logging.LOGGERS
# the engines with a double backward (hypergrad.ENGINES' second_order flag), which compile cannot capture
SECOND_ORDER_ENGINES: tuple[str, ...] = ("unrolled", "higher")


def check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def check_positive(field: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ConfigError(f"{field}={value!r} is invalid; it must be {bound}.")


def check_int(field: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{field}={value!r} is invalid; it must be an integer >= {minimum}.")


def check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is invalid; it must be true or false.")


@dataclass(frozen=True)
class AdapterConfig:
    """What is adapted and how each gated adapter is shaped.

    Attributes:
        max_rank: Rank-1 components per adapted layer before pruning (the paper's r).
        lora_alpha: LoRA's alpha. See ``scale`` for how it enters the gated update.
        target_modules: Which layers to adapt: a list of names (exact, or dotted suffix, as in
            PEFT), a regex string (full match), ``"all-linear"``, or ``None`` for PEFT's default
            for the model's architecture (Hugging Face models only).
        modules_to_save: Modules (e.g. the classifier head) trained fully and exported with the
            adapter, matched like ``target_modules`` lists.
        gate: ``"softmax"`` over a layer's components (the paper), or independent ``"sigmoid"``
            gates.
        lora_dropout: Dropout on the adapter's input, as in PEFT.
        scale: The factor s in ``base(x) + s * B diag(g) A x``. ``None`` picks s so that at init
            the update is as large as a standard LoRA of rank ``max_rank`` with the same alpha:
            s * g_init = alpha / max_rank. For softmax gates (g_init = 1/r) that is s = alpha;
            the paper's code used alpha / r on top of the softmax, which shrinks the initial
            update by another factor r (severe at r = 64). For sigmoid gates (g_init = 1/2) it
            is s = 2 * alpha / r.
    """

    max_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    gate: GateKind = "softmax"
    lora_dropout: float = 0.0
    scale: float | None = None

    def __post_init__(self) -> None:
        check_int("max_rank", self.max_rank, minimum=1)
        check_positive("lora_alpha", self.lora_alpha)
        check_choice("gate", self.gate, GATE_KINDS)
        check_positive("lora_dropout", self.lora_dropout, allow_zero=True)
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} is invalid; it must be in [0, 1).")
        if self.scale is not None:
            check_positive("scale", self.scale)
        for field in ("target_modules", "modules_to_save"):
            value = getattr(self, field)
            if isinstance(value, list):  # accept lists, store tuples (hashable, immutable)
                object.__setattr__(self, field, tuple(value))
                value = getattr(self, field)
            if field == "modules_to_save" and isinstance(value, str):
                object.__setattr__(self, field, (value,))
                value = getattr(self, field)
            if isinstance(value, tuple) and (not value or not all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{field}={value!r} is invalid; give a non-empty list of module names.")
            if value is not None and not isinstance(value, (str, tuple)):
                raise ConfigError(f"{field}={value!r} is invalid; give a list of module names or a string.")

    @property
    def effective_scale(self) -> float:
        """The scale s actually used (see ``scale``)."""
        if self.scale is not None:
            return float(self.scale)
        if self.gate == "softmax":
            return float(self.lora_alpha)
        return 2.0 * self.lora_alpha / self.max_rank


@dataclass(frozen=True)
class SearchConfig:
    """The bilevel search: optimisers, hypergradient engine and regulariser.

    Attributes:
        hypergrad: Selector hypergradient engine: ``"first_order"`` (the default: on the
            planted-rank study ``darts`` and ``unrolled`` gave the same ranks at 2-3x the cost),
            ``"darts"`` (finite difference, as the paper's code), ``"unrolled"`` (exact,
            ``torch.func``) or ``"higher"`` (exact, through the ``higher`` library).
        lr: AdamW learning rate of the weights (``lora_A``, ``lora_B``, ``modules_to_save``).
        weight_decay: AdamW weight decay of the weights.
        max_grad_norm: Clip the weights' gradient to this total 2-norm before each AdamW step,
            in the search and in ``retrain`` (the Hugging Face Trainer's ``max_grad_norm``, whose
            default there is 1.0). ``None``: no clipping. The selectors' hypergradient and the
            virtual step it differentiates through are never clipped.
        selector_lr: Learning rate of the selector optimiser (Adam, as the paper).
        selector_betas: Adam betas of the selector optimiser; the paper's (0.5, 0.999).
        inner_lr: xi, the step of the virtual SGD step ``w - xi * grad L_train`` that the
            hypergradient differentiates through. ``None`` means ``lr`` (the DARTS convention).
        sparsity: Weight of the sparsity regulariser in the selector update (entropy of each
            layer's softmax gates, or L1 of sigmoid gates). Never part of ``hypergradient()``.
        selector_every: Take a selector step every k weight steps (k = 1 is the paper; the
            default 4 gave the same seed agreement on GLUE at a quarter of the selector passes).
        fd_epsilon: DARTS finite-difference radius: eps = fd_epsilon / ||v||, so the weights
            move by fd_epsilon in 2-norm.
        darts_difference: How ``darts`` differences grad_beta L_train along v. ``"forward"``
            (the default) reuses the train step's own backward for the point w and adds one pass
            at w + eps v: 3 passes per selector step, truncation error O(eps). ``"central"``
            (the paper's code) takes w + eps v and w - eps v: 4 passes, error O(eps^2). At the
            default fd_epsilon both errors are far below the gap between ``darts`` and
            ``first_order`` (tests/search/test_hypergrad.py measures them).
        val_fraction: With ``val_data=None``, this fraction of the train batches (rounded
            down, at least 1) becomes validation data, once, with ``seed``.
        seed: Seeds adapter init, the train/validation split and dropout.
        autocast: ``"bf16"`` or ``"fp16"`` mixed precision for the forward passes (adapter
            parameters stay in their own dtype); ``None`` for none. ``"fp16"`` adds a dynamic
            loss scale: a step whose gradients overflow is skipped and the scale halved.
        grad_accum_steps: Micro-batches per step: each step accumulates the gradients of this
            many train batches (and as many validation batches for the hypergradient).
        gradient_checkpointing: Call the model's ``gradient_checkpointing_enable`` (Hugging Face
            models) with the non-reentrant implementation, which ``autograd.grad`` needs.
        stop_when_stable: End the search early once this many consecutive logged plans
            (one every ``log_every`` steps) give every module the same rank, after at least a
            quarter of the call's steps; the log says so (``search/stopped`` text and
            ``summary/stopped_at``). ``None`` (the default) always spends the whole budget.
        skip_nonfinite: On a NaN/inf loss or gradient, skip that step (counted in
            ``trainer.state.skipped_steps``) instead of raising ``NonFiniteError``.
        compile: Run every loss pass (the train gradient, the validation and finite-difference
            passes of ``first_order`` and ``darts``, the retrain steps) through ``torch.compile``,
            forward and backward. The first pass of each kind, and the first batch of a new
            length, compiles (seconds to minutes); ``trainer.state.compile_seconds`` and the
            logged ``compile/seconds`` say how long. ``unrolled`` and ``higher`` refuse it: a
            compiled graph has no double backward.
        compile_scope: What ``compile`` captures. ``"blocks"`` (the default) compiles the
            model's repeated blocks (its transformer layers) and runs the embeddings, head and
            loss eagerly: the layers share one graph, so compiling takes one layer's time
            however deep the model. ``"model"`` compiles the whole loss as one graph per pass
            (a compile time that grows with depth); a model without repeated blocks is
            compiled whole either way.
        compile_backend: Advanced: the ``torch.compile`` backend. ``"inductor"`` generates
            kernels; ``"aot_eager"`` captures the same graphs and runs them with eager kernels
            (fast to compile, for debugging a capture).
    """

    hypergrad: EngineName = "first_order"
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    selector_lr: float = 5e-3
    selector_betas: tuple[float, float] = (0.5, 0.999)
    inner_lr: float | None = None
    sparsity: float = 0.0
    selector_every: int = 4
    fd_epsilon: float = 0.01
    darts_difference: DartsDifference = "forward"
    val_fraction: float = 0.3
    seed: int = 0
    autocast: AutocastKind | None = None
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    skip_nonfinite: bool = False
    stop_when_stable: int | None = None
    compile: bool = False
    compile_scope: CompileScope = "blocks"
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.hypergrad not in ENGINE_NAMES:
            choices = ", ".join(map(repr, ENGINE_NAMES))
            raise ConfigError(f"hypergrad={self.hypergrad!r} is not an engine; choose one of {choices}.")
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.max_grad_norm is not None:
            check_positive("max_grad_norm", self.max_grad_norm)
        check_positive("selector_lr", self.selector_lr)
        if isinstance(self.selector_betas, list):
            object.__setattr__(self, "selector_betas", tuple(self.selector_betas))
        betas = self.selector_betas
        if not (
            isinstance(betas, tuple)
            and len(betas) == 2
            and all(isinstance(b, (int, float)) for b in betas)
            and all(0 <= b < 1 for b in betas)
        ):
            raise ConfigError(f"selector_betas={betas!r} is invalid; give two numbers in [0, 1).")
        if self.inner_lr is not None:
            check_positive("inner_lr", self.inner_lr, allow_zero=True)
        check_positive("sparsity", self.sparsity, allow_zero=True)
        check_int("selector_every", self.selector_every, minimum=1)
        check_positive("fd_epsilon", self.fd_epsilon)
        check_choice("darts_difference", self.darts_difference, DARTS_DIFFERENCES)
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ConfigError(f"val_fraction={self.val_fraction!r} is invalid; it must be in (0, 1).")
        check_int("seed", self.seed, minimum=0)
        if self.autocast is not None:
            check_choice("autocast", self.autocast, AUTOCAST_KINDS)
        check_int("grad_accum_steps", self.grad_accum_steps, minimum=1)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_bool("skip_nonfinite", self.skip_nonfinite)
        if self.stop_when_stable is not None:
            check_int("stop_when_stable", self.stop_when_stable, minimum=2)
        check_bool("compile", self.compile)
        check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ConfigError(f"compile_backend={self.compile_backend!r} is invalid; name a torch.compile backend.")
        if self.compile and self.hypergrad in SECOND_ORDER_ENGINES:
            raise ConfigError(
                f"compile=True does not support hypergrad={self.hypergrad!r}: that engine differentiates "
                "through a gradient (double backward), which a torch.compile graph cannot. Use "
                "hypergrad='darts' (the same one-step hypergradient by finite differences) or 'first_order' "
                "with compile, or set compile=False (in a YAML config: search.compile: false)."
            )

    @property
    def xi(self) -> float:
        """The virtual step size actually used."""
        return float(self.lr if self.inner_lr is None else self.inner_lr)


@dataclass(frozen=True)
class LoggingConfig:
    """Where and how often the search is logged.

    Attributes:
        log_dir: TensorBoard log folder; ``None`` logs nowhere.
        log_every: Log every N steps (and always at the first and the last step).
        progress: Show a progress bar when attached to a terminal.
        loggers: What writes into ``log_dir``: ``"tensorboard"`` event files, ``"jsonl"``
            (``metrics.jsonl``, which ``autolora report`` reads), or both (the default).
    """

    log_dir: str | None = None
    log_every: int = 10
    progress: bool = True
    loggers: tuple[LoggerName, ...] = LOGGER_NAMES

    def __post_init__(self) -> None:
        check_int("log_every", self.log_every, minimum=1)
        check_bool("progress", self.progress)
        if isinstance(self.loggers, (list, str)):
            object.__setattr__(
                self, "loggers", (self.loggers,) if isinstance(self.loggers, str) else tuple(self.loggers)
            )
        if not self.loggers or not isinstance(self.loggers, tuple):
            raise ConfigError(f"loggers={self.loggers!r} is invalid; give a list from 'tensorboard', 'jsonl'.")
        for name in self.loggers:
            check_choice("loggers", name, LOGGER_NAMES)
        if self.log_dir is not None:
            object.__setattr__(self, "log_dir", str(self.log_dir))


def split_kwargs(kwargs: dict[str, object]) -> tuple[dict, dict, dict]:
    """Route flat keyword arguments to (adapter, search, logging) config fields.

    Raises:
        ConfigError: for a keyword no config knows, naming it and the valid ones.
    """
    groups: tuple[dict, dict, dict] = ({}, {}, {})
    owners = [{f.name for f in fields(c)} for c in (AdapterConfig, SearchConfig, LoggingConfig)]
    for key, value in kwargs.items():
        for owner, group in zip(owners, groups):
            if key in owner:
                group[key] = value
                break
        else:
            known = sorted(set().union(*owners))
            raise ConfigError(f"unknown argument {key!r}; valid arguments are: {', '.join(known)}.")
    return groups
