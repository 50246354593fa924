"""``AutoLoRATrainer``: inject gated adapters, search ranks bilevel, prune, export to PEFT."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from autolora import checkpoint, dashboard
from autolora.bilevel import Bilevel, LossFn, _LossModule, default_loss
from autolora.config import AdapterConfig, LoggingConfig, SearchConfig, split_kwargs
from autolora.data import Cycle, check_nonempty, check_reiterable, lookahead, split_batches, to_device
from autolora.distributed import DistContext, init_distributed
from autolora.errors import ConfigError, NonFiniteError, StateError
from autolora.export import adapter_files, merged_model, write_adapter, write_merged
from autolora.gates import default_threshold, sparsity_penalty
from autolora.guard import Guard
from autolora.hypergrad import Engine, MetaGrads, get_engine, meta_gradients
from autolora.inject import (
    check_rank_fits,
    freeze_base,
    inject_adapters,
    replace_module,
    resolve_modules_to_save,
    resolve_targets,
)
from autolora.layers import GatedLoRALinear, layer_dims
from autolora.loggers import LoggerBase, make_logger
from autolora.prune import THRESHOLD_RTOL, PrunePlan, adapter_parameters, budget_keep, threshold_keep
from autolora.state import FP16_INIT_SCALE, TrainerState


def _optimiser(cls: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)``, with the fused kernel when every parameter is on a CUDA device
    and it supports them (one launch per step, and ``found_inf`` skips a step on the device)."""
    params = list(params)
    if params and all(p.device.type == "cuda" for p in params):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a dtype or device the fused kernel does not cover
            pass
    return cls(params, **kwargs)


def linear_warmup(total: int, warmup: int) -> Callable[[int], float]:
    """The retrain schedule's factor at step i: linear warm-up over ``warmup`` steps, then
    linear decay to 0 at ``total`` (for ``LambdaLR``)."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / max(1, warmup)
        return max(0.0, (total - i) / max(1, total - warmup))

    return factor


class AutoLoRATrainer:
    """Find a LoRA rank for every layer by bilevel search, then export a stock PEFT adapter.

    The constructor validates its arguments and injects the gated adapters into ``model`` in
    place; ``trainer.model`` is the same object.

    Args:
        model: The model to adapt (a Hugging Face model or any ``nn.Module``).
        max_rank: Rank-1 components per layer during the search.
        target_modules: Layers to adapt (see :class:`~autolora.config.AdapterConfig`).
        modules_to_save: Modules trained fully and exported (e.g. ``["classifier"]``).
        lora_alpha: LoRA alpha; with softmax gates the update scale is ``lora_alpha`` so that at
            init it matches a standard LoRA of rank ``max_rank`` (alpha / r per component).
        hypergrad: ``"darts"`` (default, as the paper), ``"first_order"``, ``"unrolled"`` or
            ``"higher"``.
        lr: AdamW learning rate of the weights. Default 5e-4.
        selector_lr: Adam learning rate of the selectors (betas (0.5, 0.999)). Default 5e-3.
        inner_lr: xi of the virtual step; ``None`` uses ``lr``.
        sparsity: Weight of the sparsity regulariser in the selector update.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        log_dir: TensorBoard folder, or ``None``.
        seed: Seeds the adapter init, the train/validation split and dropout.
        **options: Any other field of ``AdapterConfig``, ``SearchConfig`` or ``LoggingConfig``
            (``gate``, ``lora_dropout``, ``selector_every``, ``log_every``, ``progress``, ...).

    Raises:
        AutoLoRAError: for bad targets, a bad ``max_rank``, an unknown engine or option.
    """

    def __init__(
        self,
        model: nn.Module,
        max_rank: int = 64,
        target_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        lora_alpha: float = 16,
        hypergrad: str = "darts",
        lr: float = 5e-4,
        selector_lr: float = 5e-3,
        inner_lr: float | None = None,
        sparsity: float = 0.0,
        loss_fn: LossFn | None = None,
        log_dir: str | os.PathLike | None = None,
        seed: int = 0,
        **options: object,
    ) -> None:
        adapter_kw, search_kw, logging_kw = split_kwargs(options)
        get_engine(hypergrad)  # a clear error for an unknown engine, before anything else
        self._setup(
            model,
            AdapterConfig(
                max_rank=max_rank,
                lora_alpha=lora_alpha,
                target_modules=target_modules,
                modules_to_save=modules_to_save,
                **adapter_kw,
            ),
            SearchConfig(
                hypergrad=hypergrad,
                lr=lr,
                selector_lr=selector_lr,
                inner_lr=inner_lr,
                sparsity=sparsity,
                seed=seed,
                **search_kw,
            ),
            LoggingConfig(log_dir=log_dir, **logging_kw),
            loss_fn,
        )

    @classmethod
    def from_configs(
        cls,
        model: nn.Module,
        adapter: AdapterConfig,
        search: SearchConfig | None = None,
        logging: LoggingConfig | None = None,
        loss_fn: LossFn | None = None,
    ) -> AutoLoRATrainer:
        """Build a trainer from config dataclasses (what the CLI does)."""
        self = cls.__new__(cls)
        self._setup(model, adapter, search or SearchConfig(), logging or LoggingConfig(), loss_fn)
        return self

    def _setup(self, model, adapter: AdapterConfig, search: SearchConfig, logging: LoggingConfig, loss_fn) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor.")
        self.adapter_config, self.search_config, self.logging_config = adapter, search, logging
        self.engine = get_engine(search.hypergrad)
        self.model = model
        self.loss_fn: LossFn = loss_fn or default_loss
        self.modules_to_save = resolve_modules_to_save(model, adapter.modules_to_save)
        names = resolve_targets(model, adapter.target_modules, self.modules_to_save)
        check_rank_fits(model, names, adapter.max_rank)
        if search.gradient_checkpointing:
            self._enable_checkpointing(model, search)
        gen = torch.Generator().manual_seed(search.seed)

        def make(layer: nn.Module) -> GatedLoRALinear:
            return GatedLoRALinear(
                layer, adapter.max_rank, adapter.effective_scale, adapter.gate, adapter.lora_dropout, generator=gen
            )

        self.adapters: dict[str, GatedLoRALinear] = inject_adapters(model, names, make)
        self._shapes = {n: layer_dims(a.base_layer) for n, a in self.adapters.items()}  # kept after pruning
        # the modules_to_save as they started, so retrain() can start them over too
        self._saved_init = {
            n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()}
            for n in self.modules_to_save
        }
        self.retrained = False
        self.removed: list[str] = []  # modules pruned to rank 0
        freeze_base(model, self.adapters, self.modules_to_save)
        self.state = TrainerState(loss_scale=FP16_INIT_SCALE if search.autocast == "fp16" else 1.0)
        self._nonfinite = Guard(fp16=search.autocast == "fp16", skip=search.skip_nonfinite)
        self.plan: PrunePlan | None = None
        self._dist: DistContext | None = None
        self._build_optimisers()
        self._logger: LoggerBase | None = None
        self._logged_step = -1

    @staticmethod
    def _enable_checkpointing(model: nn.Module, search: SearchConfig) -> None:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(
                f"gradient_checkpointing=True calls model.gradient_checkpointing_enable(), which "
                f"{type(model).__name__} does not have (Hugging Face models do). Wrap your blocks in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself and leave this off."
            )
        if search.hypergrad in ("unrolled", "higher"):
            raise ConfigError(
                f"hypergrad={search.hypergrad!r} cannot run with gradient_checkpointing: its double backward "
                "re-runs checkpointed blocks outside the fast weights it differentiates through. Use "
                "hypergrad='darts' or 'first_order' with checkpointing, or turn checkpointing off."
            )
        # autograd.grad (every engine uses it) needs the non-reentrant implementation
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----------------------------------------------------------------------------- structure
    def _weight_params(self) -> dict[str, nn.Parameter]:
        """The weights w, by dotted name: every lora_A, lora_B and modules_to_save parameter."""
        wanted = {id(a.lora_A) for a in self.adapters.values()} | {id(a.lora_B) for a in self.adapters.values()}
        for name in self.modules_to_save:
            wanted |= {id(p) for p in self.model.get_submodule(name).parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) in wanted}

    def _build_optimisers(self) -> None:
        weights = self._weight_params()
        self.problem = Bilevel(
            _LossModule(self.model, self.loss_fn),
            tuple(weights),
            tuple(weights.values()),
            tuple(self.adapters),
            tuple(a.selector for a in self.adapters.values()),
            reducer=self._dist.average if self._dist else None,
            autocast=self._autocast,
        )
        s = self.search_config
        # after pruning every module to rank 0 nothing may be left to optimise
        self.weight_optimizer = (
            _optimiser(torch.optim.AdamW, self.problem.weights, lr=s.lr, weight_decay=s.weight_decay)
            if self.problem.weights
            else None
        )
        self.selector_optimizer = (
            _optimiser(torch.optim.Adam, self.problem.selectors, lr=s.selector_lr, betas=s.selector_betas)
            if self.problem.selectors
            else None
        )
        # bad steps are skipped on the device (fused optimisers take found_inf) and the host reads
        # the verdict a step later; float16 needs its loss scale at once, so it settles every step
        optimisers = [o for o in (self.weight_optimizer, self.selector_optimizer) if o is not None]
        self._defer = bool(optimisers) and all(o.defaults.get("fused") for o in optimisers) and s.autocast != "fp16"

    @property
    def device(self) -> torch.device:
        return next(iter(self.adapters.values())).lora_A.device if self.adapters else torch.device("cpu")

    @property
    def is_main_process(self) -> bool:
        """False on every data-parallel process but the first (they neither log nor write)."""
        return self._dist is None or self._dist.is_main

    # ----------------------------------------------------------------------------- queries
    def gates(self) -> dict[str, torch.Tensor]:
        """{module: gate values (detached)}."""
        return {n: a.gates().detach() for n, a in self.adapters.items()}

    def _thresholds(self) -> dict[str, float]:
        return {n: default_threshold(a.gate, a.rank) for n, a in self.adapters.items()}

    def ranks(self) -> dict[str, int]:
        """{module: rank}. Before pruning: gates >= the default threshold (1/r for softmax,
        0.5 for sigmoid), at least 1. After pruning: the physical rank, 0 for removed modules."""
        if self.plan is not None:
            return {n: len(self.plan.keep[n]) for n in self.plan.keep}
        if not self.adapters:
            return {}
        # on the device, one sync for all layers (the same rule as threshold_keep, min_rank 1)
        counts = torch.stack(
            [
                (a.gates().detach() >= t * (1 - THRESHOLD_RTOL)).sum().clamp_min(1)
                for a, t in zip(self.adapters.values(), self._thresholds().values())
            ]
        ).tolist()
        return dict(zip(self.adapters, counts))

    def parameter_count(self, ranks: dict[str, int] | None = None) -> dict[str, int]:
        """Adapter parameters under ``ranks`` (default: ``ranks()``), and those of a uniform LoRA
        with the same number of components spread evenly (rounded to the nearest rank)."""
        ranks = self.ranks() if ranks is None else ranks
        shapes = self._shapes
        if not set(ranks) <= set(shapes):
            raise ConfigError(
                f"parameter_count() got modules that are not adapted: {sorted(set(ranks) - set(shapes))}."
            )
        uniform_r = round(sum(ranks.values()) / max(len(ranks), 1))
        return {
            "adapter": adapter_parameters(shapes, ranks),
            "uniform_rank": uniform_r,
            "uniform": adapter_parameters(shapes, {n: uniform_r for n in ranks}),
        }

    def hypergradient(
        self, train_batch: object, val_batch: object, engine: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The selector hypergradient of the configured engine (or ``engine``) at the current weights.

        No sparsity term. The model's train/eval mode is used as it is. No parameter, ``.grad``,
        optimiser state, counter or global RNG state changes.

        Returns:
            {module: tensor shaped and typed like its selector}.
        """
        self._check_searchable("hypergradient()")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            meta = self._meta([train_batch], [val_batch], self.engine if engine is None else get_engine(engine))
        return {n: g.detach().clone() for n, g in zip(self.problem.selector_names, meta.hyper.selector_grads)}

    # ----------------------------------------------------------------------------- search
    def _autocast(self) -> contextlib.AbstractContextManager:
        kind = self.search_config.autocast
        if kind is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _meta(self, train_batches: list, val_batches: list | None, engine: Engine | None) -> MetaGrads:
        """Gradients at the current weights over micro-batches; ``engine=None`` (or no validation
        batches) computes the weight gradient only."""
        s = self.search_config
        self.problem.loss_scale = self.state.loss_scale
        train = [to_device(b, self.device) for b in train_batches]
        val = [to_device(b, self.device) for b in val_batches] if val_batches is not None else None
        return meta_gradients(
            self.problem, engine if val is not None else None, train, val, xi=s.xi, fd_epsilon=s.fd_epsilon
        )

    @staticmethod
    def _apply(
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

    def _check_searchable(self, call: str) -> None:
        if self.plan is not None:
            raise StateError(
                f"{call} is not possible after prune(): the selectors are fixed. Retrain at the found ranks "
                "with a fresh PEFT LoRA (autolora exports the plan), or build a new trainer to search again."
            )

    def _init_distributed(self, train_data, val_data) -> None:
        """Join a process group (if launched by torchrun/accelerate) and align all processes."""
        if self._dist is None:
            self._dist = init_distributed(self.device)
            if self._dist is None:
                return
            if self.engine.second_order:
                raise ConfigError(
                    f"hypergrad={self.search_config.hypergrad!r} is not supported with data parallelism: its "
                    "double backward would need a differentiable all-reduce inside the unrolled step. Use "
                    "hypergrad='darts' (the same one-step hypergradient by finite differences) or 'first_order'."
                )
            self._dist.broadcast([*self.problem.weights, *self.problem.selectors])
            self._build_optimisers()  # the problem now carries the reducer
        for data, what in ((train_data, "train_data"), (val_data, "val_data")):
            self._dist.check_same_length(sum(1 for _ in data), what, self.device)

    def fit(
        self,
        train_data: Iterable,
        val_data: Iterable | None = None,
        epochs: int = 1,
        max_steps: int | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 3,
        resume: bool = False,
    ) -> AutoLoRATrainer:
        """Run the bilevel search.

        Each step takes one train batch (``grad_accum_steps`` of them with accumulation): the
        weights (AdamW) step on it, and, every ``selector_every`` steps, the selectors step on
        the hypergradient from the next validation batch(es). Validation batches are cycled.

        Args:
            train_data: Re-iterable batches (a DataLoader, a list of dicts).
            val_data: Re-iterable validation batches. ``None`` splits the train batches once,
                with the seed: floor(30%) of them (at least 1) become validation, the same split
                in every epoch.
            epochs: Stop after this many epoch ends in this call.
            max_steps: Stop after this many steps in this call.
            checkpoint_dir: Folder for checkpoints (adapter state, optimisers, counters, data
                position, RNG states), written atomically; ``None`` writes none.
            checkpoint_every: Also checkpoint every N steps (one is always written at the end).
            keep_checkpoints: How many of the newest checkpoints to keep.
            resume: Continue from the newest good checkpoint in ``checkpoint_dir`` and finish the
                budget of the call that wrote it; with none there yet, start fresh. So one
                command line serves the first run and every restart.

        Calling ``fit`` again continues where it stopped (step, epoch, data position,
        optimiser states). Launched with ``torchrun``/``accelerate launch``, each process passes
        its own equal-sized shard and all of them take the same steps.

        Raises:
            AutoLoRAError: for empty or one-shot data, after ``prune()``, on a non-finite loss or
                gradient (no parameter is changed by that step; see ``skip_nonfinite``), or for
                a checkpoint from another model or config.
        """
        self._check_searchable("fit()")
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs={epochs!r} is invalid; it must be an integer >= 1.")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"max_steps={max_steps!r} is invalid; it must be an integer >= 1 or None.")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ConfigError(f"checkpoint_every={checkpoint_every!r} is invalid; it must be an integer >= 1.")
        if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={keep_checkpoints!r} is invalid; it must be an integer >= 1.")
        if (resume or checkpoint_every) and checkpoint_dir is None:
            raise ConfigError("resume=True and checkpoint_every need checkpoint_dir=<folder> to know where to look.")
        check_reiterable(train_data, "train_data")
        check_nonempty(train_data, "train_data")
        if val_data is None:
            train_data, val_data = split_batches(
                list(train_data), self.search_config.val_fraction, self.search_config.seed
            )
        else:
            check_reiterable(val_data, "val_data")
            check_nonempty(val_data, "val_data")
        self._init_distributed(train_data, val_data)
        start = (self.state.step, self.state.epoch)
        if resume:
            saved = checkpoint.latest(checkpoint_dir, map_location=self.device)
            if saved is not None:
                start = checkpoint.restore(self, saved)
        val = Cycle(val_data)
        val.position = self.state.val_position
        logger = self._get_logger()
        n_batches = len(train_data) if hasattr(train_data, "__len__") else None
        k = self.search_config.grad_accum_steps

        def out_of_steps() -> bool:
            return max_steps is not None and self.state.step - start[0] >= max_steps

        def out_of_epochs() -> bool:
            return self.state.epoch - start[1] >= epochs

        total = None
        if n_batches is not None:
            per_epoch = -(-n_batches // k)
            total = per_epoch * (epochs - (self.state.epoch - start[1])) - -(-self.state.batch_in_epoch // k)
        if max_steps is not None:
            left = max_steps - (self.state.step - start[0])
            total = left if total is None else min(total, left)
        bar = self._progress(total)
        last: dict[str, torch.Tensor] | None = None
        try:
            while not out_of_epochs() and not out_of_steps():
                epoch_ended = False
                group: list = []
                for i, batch, is_last in lookahead(train_data):
                    if i < self.state.batch_in_epoch:
                        continue  # continue mid-epoch where the last call (or checkpoint) stopped
                    group.append(batch)
                    if len(group) < k and not is_last:
                        continue
                    due = (self.state.step + 1) % self.search_config.selector_every == 0
                    losses = self._step(group, [val.next() for _ in group] if due else None)
                    group = []
                    self.state.batch_in_epoch, self.state.val_position = i + 1, val.position
                    epoch_ended = is_last
                    if epoch_ended:
                        self.state.epoch += 1
                        self.state.batch_in_epoch = 0
                    last = losses
                    metrics = None  # the full metrics cost a sync; built on logged steps only, once
                    if self.state.step == 1 or self.state.step % self.logging_config.log_every == 0:
                        metrics = self._metrics(losses)
                        self._log_step(logger, metrics)
                    if checkpoint_every and self.state.step % checkpoint_every == 0:
                        self.save_checkpoint(checkpoint_dir, keep_checkpoints, call_start=start)
                    if bar is not None:
                        bar.update(1)
                        if metrics is not None:
                            bar.set_postfix(self._postfix(metrics))
                    if out_of_steps() or epoch_ended:
                        break
                if not epoch_ended and not out_of_steps():  # an empty epoch (nothing left to skip to)
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
        finally:
            if last is not None and self._logged_step != self.state.step:
                self._log_step(logger, self._metrics(last))  # always log the last step
            if bar is not None:
                bar.close()
        self._settle()
        dashboard.log_summary(logger, self, None if last is None else {k: float(v) for k, v in last.items()})
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir, keep_checkpoints, call_start=start)
        return self

    @staticmethod
    def _postfix(metrics: dict[str, float]) -> dict[str, str]:
        shown = {"train": "loss/train", "val": "loss/val", "mean_rank": "summary/mean_rank"}
        return {k: f"{metrics[m]:.4g}" for k, m in shown.items() if m in metrics}

    def step(self, train_batch: object, val_batch: object) -> dict[str, float]:
        """One bilevel step on one train and one validation batch; returns its losses.

        The result holds ``"loss/train"``, and ``"loss/val"`` on steps with a selector update
        (empty for a skipped step). Ranks and counts are :meth:`ranks` and
        :meth:`parameter_count`; they cost a device sync, so a custom loop asks for them when it
        logs, as ``fit`` does.

        The train loss and its weight gradient are computed once at w_t; the selector
        hypergradient (every ``selector_every`` steps; otherwise ``val_batch`` is unused) is
        computed at w_t reusing that gradient; every loss and gradient is checked; then AdamW
        updates w and Adam updates the selectors.
        """
        self._check_searchable("step()")
        due = (self.state.step + 1) % self.search_config.selector_every == 0
        losses = self._step([train_batch], [val_batch] if due else None)
        self._settle()
        return {k: float(v) for k, v in losses.items()}

    def _step(self, train_batches: list, val_batches: list | None) -> dict[str, torch.Tensor]:
        """One step on micro-batches; returns its losses as device scalars (empty for a skipped
        step), so that nothing but the guard waits for the device."""
        s = self.search_config
        step = self.state.step + 1
        meta = self._meta(train_batches, val_batches, self.engine)
        skip, found_inf = self._check(meta, step)
        if skip:
            self.state.step = step
            return {}
        selector_grads = None
        if meta.hyper is not None:
            selector_grads = list(meta.hyper.selector_grads)
            if s.sparsity > 0:
                penalty = sum(
                    sparsity_penalty(b, a.gate) for b, a in zip(self.problem.selectors, self.adapters.values())
                )
                reg = torch.autograd.grad(penalty, self.problem.selectors)
                selector_grads = [g + s.sparsity * r for g, r in zip(selector_grads, reg)]
        self._apply(self.weight_optimizer, self.problem.weights, meta.weight_grads, s.max_grad_norm, found_inf)
        if selector_grads is not None:
            self._apply(self.selector_optimizer, self.problem.selectors, selector_grads, found_inf=found_inf)
        self.state.step = step
        losses = {"loss/train": meta.train_loss}
        if meta.hyper is not None:
            losses["loss/val"] = meta.hyper.val_loss
        return losses

    def _metrics(self, losses: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
        """``losses`` plus ranks, counts and learning rates at the current state (for logging)."""
        self._settle()  # the counters must include the last step
        ranks = self.ranks()
        metrics = {k: float(v) for k, v in losses.items()}
        metrics.update({f"rank/{n}": float(r) for n, r in ranks.items()})
        metrics["summary/mean_rank"] = sum(ranks.values()) / max(len(ranks), 1)
        metrics["summary/components"] = float(sum(ranks.values()))
        metrics["summary/adapter_params"] = float(self.parameter_count(ranks)["adapter"])
        metrics["summary/skipped_steps"] = float(self.state.skipped_steps)
        if self.search_config.autocast == "fp16":
            metrics["summary/loss_scale"] = self.state.loss_scale
        if self.weight_optimizer is not None:
            metrics["lr/weights"] = float(self.weight_optimizer.param_groups[0]["lr"])
        if self.selector_optimizer is not None and self.plan is None:
            metrics["lr/selectors"] = float(self.selector_optimizer.param_groups[0]["lr"])
        return metrics

    def _check(self, meta: MetaGrads, step: int, search: bool = True) -> tuple[bool, torch.Tensor | None]:
        """Check step ``step`` (see :class:`autolora.guard.Guard`): (skip it now, ``found_inf``
        for the optimisers). Deferred, the host skips nothing and the device does."""
        self._settle(search)
        found_inf = self._nonfinite.check(meta, step, defer=self._defer)
        if found_inf is not None:
            return False, found_inf
        return self._settle(search), None

    def _settle(self, search: bool = True) -> bool:
        """Settle the pending step; a failed search step does not count as taken."""
        try:
            return self._nonfinite.settle(self.state)
        except NonFiniteError as e:
            if search:
                self.state.step = e.step - 1
            raise

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, directory: str | os.PathLike, keep: int = 3, *, call_start: tuple[int, int] | None = None
    ) -> Path | None:
        """Write a checkpoint of the search into ``directory`` (only on the main process).

        ``call_start`` is the (step, epoch) at which the current ``fit`` call began, so that a
        resumed call finishes the same budget.
        """
        self._settle()
        path = None
        if self.is_main_process:
            tensors, state = checkpoint.capture(self, call_start or (self.state.step, self.state.epoch))
            path = checkpoint.save(directory, self.state.step, tensors, state, checkpoint.fingerprint(self), keep)
        if self._dist is not None:
            self._dist.barrier()
        return path

    def load_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Load the newest good checkpoint in ``directory`` (adapters, optimisers, counters, RNG).

        Raises:
            StateError: if there is none, or it is from another model or config.
        """
        self._check_searchable("load_checkpoint()")
        saved = checkpoint.latest(directory, map_location=self.device)
        if saved is None:
            raise StateError(f"no complete checkpoint in {str(directory)!r}; fit(..., checkpoint_dir=...) writes them.")
        checkpoint.restore(self, saved)
        return saved.path

    # ----------------------------------------------------------------------------- logging
    def _get_logger(self) -> LoggerBase:
        if self._logger is None:
            cfg = self.logging_config
            self._logger = make_logger(cfg.log_dir if self.is_main_process else None, cfg.loggers)
            self._logger.log_config({**asdict(self.adapter_config), **asdict(self.search_config)})
            if self.adapters:
                self._logger.log_layout(dashboard.custom_scalar_layout(list(self.adapters)))
        return self._logger

    def _log_step(self, logger: LoggerBase, metrics: dict[str, float]) -> None:
        self._logged_step = self.state.step
        dashboard.log_step(logger, self, metrics)

    def _progress(self, total: int | None):
        if not (self.logging_config.progress and sys.stderr.isatty() and self.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"autolora {self.search_config.hypergrad}", unit="step")

    def close(self) -> None:
        """Flush and close the logger."""
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    # ----------------------------------------------------------------------------- prune / export
    def prune(
        self,
        threshold: float | None = None,
        target_rank: int | None = None,
        *,
        min_rank: int = 1,
        max_rank_per_module: int | None = None,
    ) -> dict[str, int]:
        """Shrink every adapter to its final rank and return the plan ``{module: rank}``.

        Args:
            threshold: Keep components whose gate is >= this (default: 1/r for softmax gates,
                0.5 for sigmoid).
            target_rank: A global budget of ``target_rank * (number of modules)`` components,
                allocated by gate value across modules (ties by module order, then index).
            min_rank: Components every module keeps at least; 0 lets a module be removed (the
                plain base layer is put back and the module is left out of the export).
            max_rank_per_module: Components a module keeps at most.

        Kept gates and the scale are folded into ``lora_B``; ``gates()`` then returns ones.
        Calling ``prune()`` again with the same arguments returns the same plan.

        Raises:
            AutoLoRAError: if both rules are given, the budget cannot be met, or ``prune`` was
                already called with other arguments.
        """
        rule = {
            "threshold": threshold,
            "target_rank": target_rank,
            "min_rank": min_rank,
            "max_rank_per_module": max_rank_per_module,
        }
        if self.plan is not None:
            if self.plan.same_rule(**rule):
                return self.plan.ranks
            raise StateError(
                "prune() was already called with other arguments; the adapters are already "
                f"shrunk to {self.plan.ranks}. Build a new trainer to prune differently."
            )
        if threshold is not None and target_rank is not None:
            raise ConfigError("pass threshold= or target_rank= to prune(), not both.")
        gates = self.gates()
        if target_rank is not None:
            max_rank = max(a.rank for a in self.adapters.values())
            if not isinstance(target_rank, int) or not 1 <= target_rank <= max_rank:
                raise ConfigError(
                    f"target_rank={target_rank!r} is invalid; it must be an integer from 1 to max_rank={max_rank}."
                )
            keep = budget_keep(
                gates, target_rank * len(gates), min_rank=min_rank, max_rank_per_module=max_rank_per_module
            )
        else:
            if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
                raise ConfigError(f"threshold={threshold!r} is invalid; it must be a gate value in [0, 1].")
            thresholds = self._thresholds() if threshold is None else dict.fromkeys(gates, float(threshold))
            keep = threshold_keep(gates, thresholds, min_rank=min_rank, max_rank_per_module=max_rank_per_module)
        for name, idx in keep.items():
            adapter = self.adapters[name]
            if idx:
                adapter.shrink(torch.tensor(idx))
            else:  # rank 0: put the plain base layer back
                replace_module(self.model, name, adapter.base_layer)
                del self.adapters[name]
                self.removed.append(name)
        self.plan = PrunePlan(
            keep=keep,
            rule="budget" if target_rank is not None else "threshold",
            gates={n: g.tolist() for n, g in gates.items()},
            **rule,
        )
        self._build_optimisers()
        return self.plan.ranks

    def retrain(
        self,
        train_data: Iterable,
        val_data: Iterable | None = None,
        epochs: int = 1,
        lr: float | None = None,
        max_steps: int | None = None,
        warmup_ratio: float = 0.06,
    ) -> AutoLoRATrainer:
        """Train fresh LoRA adapters at the found ranks, as the paper does after its search.

        Every adapter is re-initialised at its pruned rank (A random, B zero) with PEFT's scaling
        ``lora_alpha / r_k`` and gates fixed at 1 (no selectors); ``modules_to_save`` start
        over from their initial values. Training uses train + validation data: with
        ``val_data=None`` that is all of ``train_data`` (the 30% split merged back). AdamW with
        a linear schedule and ``warmup_ratio`` warm-up (the paper's retrain recipe), gradients
        clipped to the search's ``max_grad_norm`` if it has one.

        Args:
            train_data: Re-iterable batches.
            val_data: Validation batches of the search, trained on too; ``None`` if the search
                split ``train_data``.
            epochs: Passes over the data.
            lr: AdamW learning rate (default: the search's ``lr``).
            max_steps: Stop early after this many steps.
            warmup_ratio: Fraction of the steps spent warming the learning rate up.

        Raises:
            AutoLoRAError: before ``prune()``, or for empty or one-shot data.
        """
        if self.plan is None:
            raise StateError("retrain() trains at the found ranks: call prune() first to fix them.")
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs={epochs!r} is invalid; it must be an integer >= 1.")
        check_reiterable(train_data, "train_data")
        check_nonempty(train_data, "train_data")
        batches = list(train_data)
        if val_data is not None:
            check_reiterable(val_data, "val_data")
            batches += list(val_data)
        gen = torch.Generator().manual_seed(self.search_config.seed + 1)
        alpha = self.adapter_config.lora_alpha
        for adapter in self.adapters.values():
            adapter.reinit(alpha / adapter.rank, generator=gen)
        for name, state in self._saved_init.items():
            self.model.get_submodule(name).load_state_dict(state)
        self._build_optimisers()
        optimizer = self.weight_optimizer
        total = len(batches) * epochs if max_steps is None else min(max_steps, len(batches) * epochs)
        warmup = int(warmup_ratio * total)
        for group in optimizer.param_groups:
            group["lr"] = self.search_config.lr if lr is None else lr
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(total, warmup))
        order = torch.Generator().manual_seed(self.search_config.seed)
        logger, bar = self._get_logger(), self._progress(total)
        step = 0
        try:
            while step < total:
                for i in torch.randperm(len(batches), generator=order).tolist():
                    meta = self._meta([batches[i]], None, engine=None)
                    skip, found_inf = self._check(meta, step + 1, search=False)
                    if not skip:
                        max_norm = self.search_config.max_grad_norm
                        self._apply(optimizer, self.problem.weights, meta.weight_grads, max_norm, found_inf)
                    schedule.step()
                    step += 1
                    logged = step == 1 or step == total or step % self.logging_config.log_every == 0
                    if logged:  # reading the loss waits for the device: only on logged steps
                        loss = float(meta.train_loss)
                        logger.log_dict(
                            {"retrain/loss": loss, "retrain/lr": schedule.get_last_lr()[0]}, self.state.step + step
                        )
                    if bar is not None:
                        bar.update(1)
                        if logged:
                            bar.set_postfix(loss=f"{loss:.4f}")
                    if step >= total:
                        break
        finally:
            if bar is not None:
                bar.close()
        self._settle(search=False)
        self.retrained = True
        return self

    def export_merged(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        """Write the base model with the adapters merged in; ``trainer.model`` is left as it is.

        Hugging Face models are written with ``save_pretrained``; other models as
        ``model.safetensors`` holding the state_dict. A base weight tied to another (GPT-2's
        ``lm_head`` and ``wte``) is untied first, so only the adapted layer changes.

        Raises:
            AutoLoRAError: if ``path`` is a file, or a non-empty folder and ``overwrite`` is False.
        """
        write_merged(path, merged_model(self.model, self.adapters), overwrite=overwrite)
        return str(path)

    def export(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        """Write a stock PEFT LoRA adapter folder (``PeftModel.from_pretrained`` loads it).

        Works before or after ``prune()``; unpruned, every component is exported. Scale and gates
        are folded into ``lora_B`` so the PEFT model's outputs equal this model's in eval mode.
        ``ranks.json`` beside the adapter records the plan and the gates behind it.

        Raises:
            AutoLoRAError: if ``path`` is a file, or a non-empty folder and ``overwrite`` is False
                (the folder is then left untouched).
        """
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        config, tensors = adapter_files(self.model, self.adapters, self.modules_to_save, name_or_path)
        write_adapter(path, config, tensors, {"ranks.json": self.rank_record()}, overwrite=overwrite)
        return str(path)

    def rank_record(self) -> dict:
        """The rank plan as JSON-able data: ranks, the gates behind them, rule and budget."""
        plan = self.plan
        gates = plan.gates if plan else {n: g.tolist() for n, g in self.gates().items()}
        record = {
            "ranks": self.ranks(),
            "gates": gates,
            "rule": plan.rule if plan else "threshold (not pruned)",
            "retrained": self.retrained,
            "threshold": plan.threshold if plan else None,
            "target_rank": plan.target_rank if plan else None,
            "min_rank": plan.min_rank if plan else 1,
            "max_rank_per_module": plan.max_rank_per_module if plan else None,
            "max_rank": self.adapter_config.max_rank,
            "gate": self.adapter_config.gate,
            "parameters": self.parameter_count(),
        }
        return record
