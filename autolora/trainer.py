"""``AutoLoRATrainer``: inject gated adapters, search ranks bilevel, prune, export to PEFT."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autolora.bilevel import Bilevel, LossFn, _LossModule, default_loss
from autolora.config import AdapterConfig, LoggingConfig, SearchConfig, split_kwargs
from autolora.data import Cycle, check_nonempty, check_reiterable, split_batches, to_device
from autolora.errors import ConfigError, NonFiniteError, StateError
from autolora.export import adapter_files, merged_model, write_adapter, write_merged
from autolora.gates import default_threshold, sparsity_penalty
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
from autolora.loggers import Logger, NullLogger, TensorBoardLogger
from autolora.prune import PrunePlan, adapter_parameters, budget_keep, threshold_keep


@dataclass
class TrainerState:
    """Counters that let ``fit`` continue where it stopped."""

    step: int = 0  # weight steps taken
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # train batches consumed in the current epoch
    val_position: int = 0  # validation batches consumed in the current cycle


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
        gen = torch.Generator().manual_seed(search.seed)

        def make(layer: nn.Module) -> GatedLoRALinear:
            return GatedLoRALinear(
                layer, adapter.max_rank, adapter.effective_scale, adapter.gate, adapter.lora_dropout, generator=gen
            )

        self.adapters: dict[str, GatedLoRALinear] = inject_adapters(model, names, make)
        # the modules_to_save as they started, so retrain() can start them over too
        self._saved_init = {
            n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()}
            for n in self.modules_to_save
        }
        self.retrained = False
        self.removed: list[str] = []  # modules pruned to rank 0
        freeze_base(model, self.adapters, self.modules_to_save)
        self.state = TrainerState()
        self.plan: PrunePlan | None = None
        self._build_optimisers()
        self._logger: Logger | None = None

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
        )
        s = self.search_config
        # after pruning every module to rank 0 nothing may be left to optimise
        self.weight_optimizer = (
            torch.optim.AdamW(self.problem.weights, lr=s.lr, weight_decay=s.weight_decay)
            if self.problem.weights
            else None
        )
        self.selector_optimizer = (
            torch.optim.Adam(self.problem.selectors, lr=s.selector_lr, betas=s.selector_betas)
            if self.problem.selectors
            else None
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.adapters.values())).lora_A.device if self.adapters else torch.device("cpu")

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
        keep = threshold_keep(self.gates(), self._thresholds(), min_rank=1)
        return {n: len(k) for n, k in keep.items()}

    def parameter_count(self, ranks: dict[str, int] | None = None) -> dict[str, int]:
        """Adapter parameters under ``ranks`` (default: ``ranks()``), and those of a uniform LoRA
        with the same number of components spread evenly (rounded to the nearest rank)."""
        ranks = self.ranks() if ranks is None else ranks
        shapes = {
            n: layer_dims(self.model.get_submodule(n).base_layer if n in self.adapters else self.model.get_submodule(n))
            for n in ranks
        }
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
            meta = self._meta(train_batch, val_batch, self.engine if engine is None else get_engine(engine))
        return {n: g.detach().clone() for n, g in zip(self.problem.selector_names, meta.hyper.selector_grads)}

    # ----------------------------------------------------------------------------- search
    def _meta(self, train_batch, val_batch, engine: Engine | None) -> MetaGrads:
        """Gradients at the current weights; ``engine=None`` computes the weight gradient only."""
        s = self.search_config
        return meta_gradients(
            self.problem,
            engine,
            to_device(train_batch, self.device),
            to_device(val_batch, self.device),
            xi=s.xi,
            fd_epsilon=s.fd_epsilon,
        )

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, params, grads) -> None:
        """One optimiser step with the given gradients (never accumulated into ``.grad``)."""
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _check_searchable(self, call: str) -> None:
        if self.plan is not None:
            raise StateError(
                f"{call} is not possible after prune(): the selectors are fixed. Retrain at the found ranks "
                "with a fresh PEFT LoRA (autolora exports the plan), or build a new trainer to search again."
            )

    def fit(
        self, train_data: Iterable, val_data: Iterable | None = None, epochs: int = 1, max_steps: int | None = None
    ) -> AutoLoRATrainer:
        """Run the bilevel search.

        Each step takes one train batch: the weights (AdamW) step on it, and the selectors step on
        the hypergradient from the next validation batch. Validation batches are cycled.

        Args:
            train_data: Re-iterable batches (a DataLoader, a list of dicts).
            val_data: Re-iterable validation batches. ``None`` splits the train batches once,
                with the seed: floor(30%) of them (at least 1) become validation, the same split
                in every epoch.
            epochs: Stop after this many epoch ends in this call.
            max_steps: Stop after this many steps in this call.

        Calling ``fit`` again continues where it stopped (step, epoch, data position,
        optimiser states).

        Raises:
            AutoLoRAError: for empty or one-shot data, after ``prune()``, or on a non-finite loss
                or gradient (no parameter is changed by that step).
        """
        self._check_searchable("fit()")
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs={epochs!r} is invalid; it must be an integer >= 1.")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"max_steps={max_steps!r} is invalid; it must be an integer >= 1 or None.")
        check_reiterable(train_data, "train_data")
        check_nonempty(train_data, "train_data")
        if val_data is None:
            train_data, val_data = split_batches(
                list(train_data), self.search_config.val_fraction, self.search_config.seed
            )
        else:
            check_reiterable(val_data, "val_data")
            check_nonempty(val_data, "val_data")
        val = Cycle(val_data)
        val.position = self.state.val_position
        logger = self._get_logger()
        total = len(train_data) * epochs - self.state.batch_in_epoch if hasattr(train_data, "__len__") else None
        if max_steps is not None:
            total = max_steps if total is None else min(total, max_steps)
        bar = self._progress(total)
        steps, epochs_done, last = 0, 0, None
        try:
            n_batches = len(train_data) if hasattr(train_data, "__len__") else None
            while epochs_done < epochs and (max_steps is None or steps < max_steps):
                finished = True
                for i, batch in enumerate(train_data):
                    if i < self.state.batch_in_epoch:
                        continue  # continue mid-epoch where the last call stopped
                    metrics = self.step(batch, val.next())
                    self.state.batch_in_epoch, self.state.val_position = i + 1, val.position
                    steps += 1
                    last = metrics
                    if self.state.step == 1 or self.state.step % self.logging_config.log_every == 0:
                        logger.log_dict(metrics, self.state.step)
                        last = None
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(train=f"{metrics['loss/train']:.4f}", mean_rank=f"{metrics['rank/mean']:.1f}")
                    # out of steps: stop, unless this was the epoch's last batch (then the epoch ends)
                    if max_steps is not None and steps >= max_steps and i + 1 != n_batches:
                        finished = False
                        break
                if finished:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    epochs_done += 1
        finally:
            if last is not None:  # always log the last step
                logger.log_dict(last, self.state.step)
            if bar is not None:
                bar.close()
        return self

    def step(self, train_batch: object, val_batch: object) -> dict[str, float]:
        """One bilevel step on one train and one validation batch; returns its metrics.

        The train loss and its weight gradient are computed once at w_t; the selector
        hypergradient (every ``selector_every`` steps) is computed at w_t reusing that gradient;
        every loss and gradient is checked; then AdamW updates w and Adam updates the selectors.
        """
        self._check_searchable("step()")
        s = self.search_config
        step = self.state.step + 1
        meta = self._meta(train_batch, val_batch, self.engine if step % s.selector_every == 0 else None)
        self._check_finite(meta, step)
        selector_grads = None
        if meta.hyper is not None:
            selector_grads = list(meta.hyper.selector_grads)
            if s.sparsity > 0:
                penalty = sum(
                    sparsity_penalty(b, a.gate) for b, a in zip(self.problem.selectors, self.adapters.values())
                )
                reg = torch.autograd.grad(penalty, self.problem.selectors)
                selector_grads = [g + s.sparsity * r for g, r in zip(selector_grads, reg)]
        self._apply(self.weight_optimizer, self.problem.weights, meta.weight_grads)
        if selector_grads is not None:
            self._apply(self.selector_optimizer, self.problem.selectors, selector_grads)
        self.state.step = step
        ranks = self.ranks()
        metrics = {"loss/train": float(meta.train_loss)}
        if meta.hyper is not None:
            metrics["loss/val"] = float(meta.hyper.val_loss)
        metrics.update({f"rank/{n}": float(r) for n, r in ranks.items()})
        metrics["rank/mean"] = sum(ranks.values()) / len(ranks)
        metrics["rank/total"] = float(sum(ranks.values()))
        return metrics

    def _check_finite(self, meta: MetaGrads, step: int) -> None:
        checks = [("train loss", [meta.train_loss]), ("weight gradient", meta.weight_grads)]
        if meta.hyper is not None:
            checks += [
                ("validation loss", [meta.hyper.val_loss]),
                ("selector hypergradient", meta.hyper.selector_grads),
            ]
        for what, tensors in checks:
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise NonFiniteError(
                    f"step {step}: the {what} is not finite (NaN or inf); no parameter was changed. "
                    "Check that batch for bad values, or lower lr / selector_lr."
                )

    def _get_logger(self) -> Logger:
        if self._logger is None:
            cfg = self.logging_config
            self._logger = TensorBoardLogger(cfg.log_dir) if cfg.log_dir else NullLogger()
            self._logger.log_config({**asdict(self.adapter_config), **asdict(self.search_config)})
        return self._logger

    def _progress(self, total: int | None):
        if not (self.logging_config.progress and sys.stderr.isatty()):
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
        a linear schedule and ``warmup_ratio`` warm-up (the paper's retrain recipe).

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
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda i: (i + 1) / max(1, warmup) if i < warmup else max(0.0, (total - i) / max(1, total - warmup)),
        )
        order = torch.Generator().manual_seed(self.search_config.seed)
        logger, bar = self._get_logger(), self._progress(total)
        step = 0
        try:
            while step < total:
                for i in torch.randperm(len(batches), generator=order).tolist():
                    meta = self._meta(batches[i], None, engine=None)
                    self._check_finite(meta, step + 1)
                    self._apply(optimizer, self.problem.weights, meta.weight_grads)
                    schedule.step()
                    step += 1
                    if step == 1 or step == total or step % self.logging_config.log_every == 0:
                        logger.log_dict(
                            {"retrain/loss": float(meta.train_loss), "retrain/lr": schedule.get_last_lr()[0]},
                            self.state.step + step,
                        )
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(meta.train_loss):.4f}")
                    if step >= total:
                        break
        finally:
            if bar is not None:
                bar.close()
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
