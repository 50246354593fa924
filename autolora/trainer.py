"""``AutoLoRATrainer``, the public facade: inject gated adapters, search ranks bilevel, prune,
retrain, export to PEFT.

The work lives below: :mod:`autolora.search` (the step, the fit loop, retraining),
:mod:`autolora.plan` (rank rules, export), :mod:`autolora.checkpoint` and
:mod:`autolora.logging`. None of them imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import autolora.checkpoint as checkpoint
from autolora.adapted import AdaptedModel
from autolora.config import AdapterConfig, LoggingConfig, SearchConfig, split_kwargs
from autolora.data import Cycle, check_label_batches, fit_data, retrain_batches
from autolora.distributed import DistContext, init_distributed, launched
from autolora.errors import ConfigError, StateError
from autolora.logging import LoggerBase, dashboard
from autolora.search.bilevel import LossFn, default_loss
from autolora.search.guard import Guard
from autolora.search.hypergrad import check_capabilities, get_engine
from autolora.search.loop import Budget, StableStop, check_fit_args, fit_loop
from autolora.search.retrain import check_retrain_args, restart, retrain_loop
from autolora.search.step import Search, build_search, hypergradient, settle, take_step
from autolora.state import FP16_INIT_SCALE, TrainerState


class AutoLoRATrainer(AdaptedModel):
    """Find a LoRA rank for every layer by bilevel search, then export a stock PEFT adapter.

    The constructor validates its arguments and injects the gated adapters into ``model`` in
    place; ``trainer.model`` is the same object.

    Args:
        model: The model to adapt (a Hugging Face model or any ``nn.Module``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        **options: Any field of :class:`~autolora.config.AdapterConfig`,
            :class:`~autolora.config.SearchConfig` or :class:`~autolora.config.LoggingConfig`;
            their defaults are the only ones. The usual: ``max_rank`` (8, the paper's search
            rank), ``target_modules``, ``modules_to_save`` (e.g. ``["classifier"]``),
            ``lora_alpha`` (16), ``hypergrad`` (``"first_order"``; ``"darts"`` as the paper,
            ``"unrolled"``, ``"higher"``), ``lr`` (5e-4, AdamW on the weights), ``selector_lr``
            (5e-3, Adam on the selectors), ``selector_every`` (4), ``stop_when_stable``,
            ``inner_lr``, ``sparsity``, ``log_dir``, ``seed``, ``compile`` (``torch.compile`` the
            loss passes; ``trainer.state.compile_seconds`` is the time it took).

    Raises:
        AutoLoRAError: for bad targets, a bad ``max_rank``, an unknown engine or option, or an
            engine that cannot run with the chosen options.
    """

    def __init__(self, model: nn.Module, *, loss_fn: LossFn | None = None, **options: object) -> None:
        adapter_kw, search_kw, logging_kw = split_kwargs(options)
        adapter = AdapterConfig(**adapter_kw)
        search = SearchConfig(**search_kw)
        self._setup(model, adapter, search, LoggingConfig(**logging_kw), loss_fn)

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
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor.")
        # capability checks before anything touches the model
        check_capabilities(search.hypergrad, checkpointing=search.gradient_checkpointing, data_parallel=launched())
        super().__init__(model, adapter, search.seed, gradient_checkpointing=search.gradient_checkpointing)
        self.search_config, self.logging_config = search, logging
        self.loss_fn: LossFn = loss_fn or default_loss
        self._dist: DistContext | None = None
        self._log = dashboard.SearchLog(logging, {**asdict(adapter), **asdict(search)})
        fp16 = search.autocast == "fp16"
        self.search: Search = self._build_search(
            TrainerState(loss_scale=FP16_INIT_SCALE if fp16 else 1.0),
            Guard(fp16=fp16, skip=search.skip_nonfinite),
        )

    def _build_search(self, state: TrainerState | None = None, guard: Guard | None = None) -> Search:
        """A search over the current adapters with fresh optimisers (after pruning, for
        retraining, after joining a process group); counters and guard carry over."""
        state, guard = state or self.search.state, guard or self.search.guard
        reducer = self._dist.average if self._dist else None
        args = (self.model, self.adapters, self.modules_to_save, self.loss_fn, self.search_config)
        return build_search(*args, state=state, guard=guard, reducer=reducer)

    # ----------------------------------------------------------------------------- structure
    @property
    def state(self) -> TrainerState:
        """The counters: step, epoch, data position, skipped steps, float16 loss scale."""
        return self.search.state

    problem = property(lambda self: self.search.problem, doc="The weights, the selectors and the loss.")
    weight_optimizer = property(lambda self: self.search.weight_optimizer, doc="AdamW over the weights.")
    selector_optimizer = property(lambda self: self.search.selector_optimizer, doc="Adam over the selectors.")
    engine = property(lambda self: self.search.engine, doc="The hypergradient engine.")

    @property
    def device(self) -> torch.device:
        return self.search.device

    @property
    def is_main_process(self) -> bool:
        """False on every data-parallel process but the first (they neither log nor write)."""
        return self._dist is None or self._dist.is_main

    # ----------------------------------------------------------------------------- queries
    def hypergradient(
        self, train_batch: object, val_batch: object, engine: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The selector hypergradient of the configured engine (or ``engine``) at the current weights.

        No sparsity term. The model's train/eval mode is used as it is. No parameter, ``.grad``,
        optimiser state, step counter or global RNG state changes.

        Returns:
            {module: tensor shaped and typed like its selector}.
        """
        self._check_searchable("hypergradient()")
        s = self.search.config
        chosen = self.engine if engine is None else get_engine(engine, darts_difference=s.darts_difference)
        return hypergradient(self.search, train_batch, val_batch, chosen)

    # ----------------------------------------------------------------------------- search
    def _init_distributed(self, train_data, val_data) -> None:
        """Join a process group (if launched by torchrun/accelerate) and align all processes."""
        if self._dist is None:
            self._dist = init_distributed(self.device)
            if self._dist is None:
                return
            check_capabilities(self.search_config.hypergrad, data_parallel=True)
            self._dist.broadcast([*self.problem.weights, *self.problem.selectors])
            self.search = self._build_search()  # the problem now carries the reducer
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

        Each step takes one train batch (``grad_accum_steps`` with accumulation): the weights
        (AdamW) step on it and, every ``selector_every`` steps, the selectors step on the
        hypergradient from the next (cycled) validation batch. Calling ``fit`` again continues
        where it stopped. Under ``torchrun``/``accelerate launch`` each process passes its own
        equal-sized shard and all take the same steps.

        Args:
            train_data: Re-iterable batches (a DataLoader, a list of dicts).
            val_data: Re-iterable validation batches; ``None`` splits the train batches once,
                with the seed (floor(30%), at least 1, become validation, in every epoch).
            epochs: Stop after this many epoch ends in this call.
            max_steps: Stop after this many steps in this call.
            checkpoint_dir: Folder for atomic checkpoints (adapters, optimisers, counters, data
                position, RNG states); ``None`` writes none.
            checkpoint_every: Also checkpoint every N steps (one is always written at the end).
            keep_checkpoints: How many of the newest checkpoints to keep.
            resume: Continue from the newest good checkpoint in ``checkpoint_dir`` and finish the
                budget of the call that wrote it (none there yet: start fresh).

        Raises:
            AutoLoRAError: for empty or one-shot data, after ``prune()``, on a non-finite loss or
                gradient (that step changes nothing; see ``skip_nonfinite``), or for a
                checkpoint from another model or config.
        """
        self._check_searchable("fit()")
        check_fit_args(epochs, max_steps, checkpoint_every, keep_checkpoints, resume, checkpoint_dir)
        s = self.search_config
        train_data, val_data = fit_data(train_data, val_data, s.val_fraction, s.seed)
        check_label_batches(self.model, train_data, "train_data")
        check_label_batches(self.model, val_data, "val_data")
        self._init_distributed(train_data, val_data)
        start = (self.state.step, self.state.epoch)
        if resume:
            saved = checkpoint.latest(checkpoint_dir, map_location=self.device)
            if saved is not None:
                start = checkpoint.restore(self.search, self.adapter_config, saved)
        if resume and self.state.stopped_stable:
            return self  # that search ended early on a settled plan: it is finished
        self.state.stopped_stable = False
        budget = Budget(*start, epochs, max_steps)
        val = Cycle(val_data)
        val.position = self.state.val_position
        logger = self._get_logger()
        n_batches = len(train_data) if hasattr(train_data, "__len__") else None
        total = budget.steps_left(self.state, n_batches, s.grad_accum_steps)
        bar, last = self._progress(total), []
        watch = StableStop(s.stop_when_stable, self.state.step + (total or 0) // 4) if s.stop_when_stable else None

        def on_step(losses: dict[str, torch.Tensor]) -> bool:
            last[:] = [losses]
            metrics, stop = None, False  # the full metrics cost a sync; built on logged steps only, once
            if self._log.due(self.state.step):
                ranks = self.ranks(self.record_scores(self.state.step))  # one snapshot, one count
                metrics = self._metrics(losses, ranks)
                self._log_step(logger, metrics, ranks)
                stop = watch is not None and watch.update(self.state.step, ranks)
            if checkpoint_every and self.state.step % checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir, keep_checkpoints, call_start=start)
            if bar is not None:
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix(dashboard.postfix(metrics))
            return stop

        try:
            fit_loop(self.search, train_data, val, budget, on_step)
        finally:
            if last and self._log.logged_step != self.state.step:
                # always log (and snapshot) the last step
                ranks = self.ranks(self.record_scores(self.state.step))
                self._log_step(logger, self._metrics(last[0], ranks), ranks)
            if bar is not None:
                bar.close()
        settle(self.search)
        if self.state.stopped_stable:
            dashboard.log_stopped(logger, self.state.step, s.stop_when_stable, self._log.config.log_every)
        if dashboard.draws(logger) and self.adapters:
            gates, ranks = self._figures()
            final = {k: float(v) for k, v in last[0].items()} if last else None
            params = self.parameter_count(ranks)["adapter"]
            dashboard.log_summary(logger, self.state.step, gates, ranks, params, self._log.hparams, final)
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir, keep_checkpoints, call_start=start)
        return self

    def step(self, train_batch: object, val_batch: object) -> dict[str, float]:
        """One bilevel step on one train and one validation batch; returns its losses.

        ``"loss/train"``, and ``"loss/val"`` on steps with a selector update (every
        ``selector_every`` steps; otherwise ``val_batch`` is unused); empty for a skipped step.
        Ranks and counts (:meth:`ranks`, :meth:`parameter_count`) cost a device sync, so a custom
        loop asks for them when it logs, as ``fit`` does. See
        :func:`autolora.search.step.take_step`.
        """
        self._check_searchable("step()")
        due = (self.state.step + 1) % self.search_config.selector_every == 0
        losses = take_step(self.search, [train_batch], [val_batch] if due else None)
        settle(self.search)
        return {k: float(v) for k, v in losses.items()}

    def _metrics(self, losses: Mapping[str, torch.Tensor | float], ranks: dict[str, int]) -> dict[str, float]:
        """``losses`` plus ``ranks``, counts and learning rates at the current state (for logging)."""
        settle(self.search)  # the counters must include the last step
        lrs = {}
        if self.weight_optimizer is not None:
            lrs["weights"] = self.weight_optimizer.param_groups[0]["lr"]
        if self.selector_optimizer is not None and self.plan is None:
            lrs["selectors"] = self.selector_optimizer.param_groups[0]["lr"]
        scale = self.state.loss_scale if self.search_config.autocast == "fp16" else None
        params = self.parameter_count(ranks)["adapter"]
        compiled = (self.state.compile_seconds, self.state.compiled_graphs) if self.search_config.compile else None
        return dashboard.step_metrics(losses, ranks, params, self.state.skipped_steps, scale, lrs, compiled)

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, directory: str | os.PathLike, keep: int = 3, *, call_start: tuple[int, int] | None = None
    ) -> Path | None:
        """Write a checkpoint of the search into ``directory`` (only on the main process).

        ``call_start`` is the (step, epoch) at which the current ``fit`` call began, so that a
        resumed call finishes the same budget.
        """
        settle(self.search)
        path = None
        if self.is_main_process:
            tensors, state = checkpoint.capture(self.search, call_start or (self.state.step, self.state.epoch))
            record = checkpoint.fingerprint(self.search, self.adapter_config)
            path = checkpoint.save(directory, self.state.step, tensors, state, record, keep)
        if self._dist is not None:
            self._dist.barrier()
        return path

    def load_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Load the newest good checkpoint in ``directory``, or the step folder ``directory``
        (adapters, optimisers, counters, RNG).

        Raises:
            StateError: if there is none, or it is from another model or config.
        """
        self._check_searchable("load_checkpoint()")
        saved = checkpoint.latest(directory, map_location=self.device)
        if saved is None:
            raise StateError(
                f"no complete checkpoint in {str(directory)!r} (a checkpoint folder holding step-<N> folders, "
                "or one step-<N> folder); fit(..., checkpoint_dir=...) writes them."
            )
        checkpoint.restore(self.search, self.adapter_config, saved)
        return saved.path

    # ----------------------------------------------------------------------------- logging
    def _get_logger(self) -> LoggerBase:
        return self._log.logger(self.is_main_process, list(self.adapters))

    def _figures(self, ranks: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, int]]:
        if ranks is None:  # from the newest snapshot
            ranks = self.ranks(self.snapshots[-1][1] if self.snapshots and self.plan is None else None)
        return {n: g.float().cpu().tolist() for n, g in self.gates().items()}, ranks

    def _log_step(self, logger: LoggerBase, metrics: dict[str, float], ranks: dict[str, int]) -> None:
        figures = (lambda: self._figures(ranks)) if self.adapters else None
        self._log.step(logger, self.state.step, metrics, figures, self.adapter_config.max_rank)

    def _progress(self, total: int | None):
        desc = f"autolora {self.search_config.hypergrad}"
        return dashboard.progress_bar(self.logging_config.progress and self.is_main_process, total, desc)

    def _on_pruned(self) -> None:
        self.search = self._build_search()  # the selectors are gone; fresh optimisers
        dashboard.log_confidence(self._get_logger(), self.state.step, self.plan.confidence, self.plan.warning)

    def close(self) -> None:
        """Flush and close the logger."""
        self._log.close()

    # ----------------------------------------------------------------------------- prune / export
    def retrain(
        self,
        train_data: Iterable,
        val_data: Iterable | None = None,
        epochs: int = 1,
        lr: float | None = None,
        max_steps: int | None = None,
        warmup_ratio: float = 0.06,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> AutoLoRATrainer:
        """Train fresh LoRA adapters at the found ranks, as the paper does after its search.

        Each adapter restarts at its pruned rank (A random, B zero, PEFT's ``lora_alpha / r_k``,
        gates fixed at 1); ``modules_to_save`` restart from their initial values. AdamW with a
        linear schedule and ``warmup_ratio`` warm-up over train + validation data (with
        ``val_data=None``, all of ``train_data``), clipped to the search's ``max_grad_norm``.

        Args:
            train_data: Re-iterable batches.
            val_data: The search's validation batches, trained on too (``None`` if it split).
            epochs: Passes over the data.
            lr: AdamW learning rate (default: the search's ``lr``).
            max_steps: Stop early after this many steps.
            warmup_ratio: Fraction of the steps spent warming the learning rate up, in [0, 1).
            checkpoint_dir: Write the retrained adapters there (atomically) when done; a later
                call with the same model, plan and arguments loads them instead of retraining
                (the data is not compared: give the same batches).

        Raises:
            AutoLoRAError: before ``prune()``, for a bad argument, or for empty or one-shot data.
        """
        if self.plan is None:
            raise StateError("retrain() trains at the found ranks: call prune() first to fix them.")
        check_retrain_args(epochs, lr, max_steps, warmup_ratio)
        batches, s = retrain_batches(train_data, val_data), self.search_config
        check_label_batches(self.model, batches, "retrain data")
        restart(self.model, self.adapters, self._saved_init, self.adapter_config.lora_alpha, s.seed + 1)
        self.search = self._build_search()
        total = len(batches) * epochs if max_steps is None else min(max_steps, len(batches) * epochs)
        lr = s.lr if lr is None else lr
        args = {"epochs": epochs, "lr": lr, "max_steps": max_steps, "warmup_ratio": warmup_ratio, "steps": total}
        record = checkpoint.retrain_fingerprint(self.search, self.adapter_config, args)
        done = checkpoint.latest(checkpoint_dir, map_location=self.device) if checkpoint_dir is not None else None
        if done is not None and done.fingerprint == record:  # this retrain has been run: load it
            checkpoint.restore(self.search, self.adapter_config, done, expected=record)
            self.retrained = True
            return self
        logger, bar = self._get_logger(), self._progress(total)
        log_every = self.logging_config.log_every
        try:
            retrain_loop(self.search, batches, total=total, warmup=int(warmup_ratio * total), lr=lr, seed=s.seed,
                         log_every=log_every, logger=logger, bar=bar)  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        self.retrained = True
        if checkpoint_dir is not None and self.is_main_process:
            tensors, state = checkpoint.capture(self.search, (self.state.step, self.state.epoch))
            checkpoint.save(checkpoint_dir, total, tensors, state, record, keep=1)
        return self
