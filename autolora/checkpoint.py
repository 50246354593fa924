"""Search checkpoints: adapter state only, written atomically, verified on load.

A checkpoint is a folder ``step-<N>`` holding

- ``adapter.safetensors``: every adapter weight, selector and ``modules_to_save`` parameter;
- ``state.pt``: optimiser states, counters and RNG states (plain tensors, numbers, lists and
  dicts only, loaded with ``torch.load(weights_only=True)``, so nothing is unpickled);
- ``checkpoint.json``: the fingerprint of the model and config, and the SHA-256 of each file.

It is written into a temporary folder and renamed into place
(:func:`~autolora.plan.atomic.atomic_dir`), and ``checkpoint.json`` is written last, so a folder
without it, or whose files do not match their hashes, is incomplete and skipped. The newest
``keep`` checkpoints are kept. Capture and restore work on a
:class:`~autolora.search.step.Search`, never on the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from autolora.config import AdapterConfig, SearchConfig
from autolora.errors import StateError
from autolora.plan.atomic import atomic_dir
from autolora.state import TrainerState

if TYPE_CHECKING:
    from autolora.search.step import Search

MANIFEST = "checkpoint.json"
TENSORS = "adapter.safetensors"
STATE = "state.pt"
PREFIX = "step-"
STATE_KEYS = {"trainer", "call_start", "weight_optimizer", "selector_optimizer", "rng"}


@dataclass(frozen=True)
class Checkpoint:
    """What one checkpoint holds."""

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict
    fingerprint: dict
    path: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states, as weights-only-loadable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(s, i)


def save(
    directory: str | os.PathLike,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict,
    fingerprint: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` into ``directory`` atomically and keep the newest ``keep``."""
    root = Path(directory)
    final = root / f"{PREFIX}{step:08d}"
    # an existing step-N (the same step saved again, e.g. the end of a call after a periodic
    # save) is replaced; atomic_dir creates the folder, removes temp folders of killed writers
    # and turns a file-system fault into one WriteError naming the path
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        torch.save(state, tmp / STATE)
        manifest = {
            "step": step,
            "fingerprint": fingerprint,
            "sha256": {name: _sha256(tmp / name) for name in (TENSORS, STATE)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint folders that have a manifest, oldest first (not yet verified)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    if (root / MANIFEST).is_file():  # a step folder itself
        return [root]
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify one checkpoint folder.

    Raises:
        StateError: if a file is missing, truncated or altered (hash mismatch), unreadable (also
            by ``torch.load(weights_only=True)``), or ``state.pt`` lacks a key.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, digest in manifest["sha256"].items():
            if _sha256(path / name) != digest:
                raise StateError(f"checkpoint {path} is corrupt: {name} does not match its recorded SHA-256.")
        tensors = load_file(str(path / TENSORS), device=str(map_location))
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
        missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else sorted(STATE_KEYS)
        if missing:
            raise StateError(f"checkpoint {path} is incomplete: {STATE} lacks {missing}.")
        TrainerState(**state["trainer"])  # the counters must fit this version's fields
    except StateError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
        raise StateError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}).") from None
    return Checkpoint(int(manifest["step"]), tensors, state, manifest["fingerprint"], path)


def latest(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt newer ones are skipped with a warning."""
    for path in reversed(complete(directory)):
        try:
            return load(path, map_location)
        except StateError as e:
            warnings.warn(f"{e} Falling back to the previous checkpoint.", stacklevel=2)
    return None


def _with_new_defaults(saved: dict) -> dict:
    """``saved`` with config fields added since it was written set to their defaults (the
    behaviour of the code that wrote it), so a checkpoint of an older version still matches."""
    defaults = json.loads(
        json.dumps({"adapter_config": asdict(AdapterConfig()), "search_config": asdict(SearchConfig())})
    )
    out = dict(saved)
    for section, values in defaults.items():
        if isinstance(out.get(section), dict):
            out[section] = {**values, **out[section]}
    search = saved.get("search_config")
    if isinstance(search, dict) and "darts_difference" not in search and search.get("hypergrad") == "darts":
        # darts took the central difference before the field existed; the default is now forward
        out["search_config"] = {**out["search_config"], "darts_difference": "central"}
    return out


# how a step is executed, not what it computes: a compiled run resumes an eager one and back
EXECUTION_FIELDS = ("compile", "compile_backend")


def _maths_fields(search_config: dict) -> dict:
    return {k: v for k, v in search_config.items() if k not in EXECUTION_FIELDS}


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    """Raise a ``StateError`` naming what differs between a checkpoint and this trainer."""
    saved = _with_new_defaults(saved)
    if isinstance(saved.get("search_config"), dict):
        saved["search_config"] = _maths_fields(saved["search_config"])
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs[:3])
        raise StateError(
            f"checkpoint {path} is from a different model or config ({detail}). "
            "Point checkpoint_dir at a fresh folder, or restore the original model and settings."
        )


def _named(search: Search) -> dict[str, torch.Tensor]:
    """The search's adapter state by checkpoint key: weights and selectors, never the base."""
    p = search.problem
    named = {f"weight/{n}": w for n, w in zip(p.weight_names, p.weights)}
    return named | {f"selector/{n}": b for n, b in zip(p.selector_names, p.selectors)}


def fingerprint(search: Search, adapter_config: AdapterConfig) -> dict:
    """What a checkpoint must agree on to be resumed into ``search`` (JSON-normalised)."""
    p = search.problem
    record = {
        "model": type(p.model).__name__,
        "adapters": {n: [a.rank, a.in_features, a.out_features] for n, a in search.adapters.items()},
        "weights": {n: list(w.shape) for n, w in zip(p.weight_names, p.weights)},
        "adapter_config": asdict(adapter_config),
        "search_config": _maths_fields(asdict(search.config)),
    }
    return json.loads(json.dumps(record, default=str))


def capture(search: Search, call_start: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of ``search`` for :func:`save`; ``call_start`` is the (step, epoch) at
    which the current ``fit`` call began, so a resumed call finishes the same budget."""
    weight_opt, selector_opt = search.weight_optimizer, search.selector_optimizer
    state = {
        "trainer": asdict(search.state),
        "call_start": list(call_start),
        "weight_optimizer": weight_opt.state_dict() if weight_opt else None,
        "selector_optimizer": selector_opt.state_dict() if selector_opt else None,
        "scheduler": None,  # the search runs at constant learning rates
        "rng": rng_state(),
    }
    return _named(search), state


def retrain_fingerprint(search: Search, adapter_config: AdapterConfig, args: dict) -> dict:
    """The fingerprint of a retrain: the model, configs and planned shapes, and its arguments."""
    return json.loads(json.dumps({**fingerprint(search, adapter_config), "retrain": args}, default=str))


def restore(
    search: Search, adapter_config: AdapterConfig, saved: Checkpoint, expected: dict | None = None
) -> tuple[int, int]:
    """Load a verified checkpoint into ``search``; returns its fit call's (step, epoch).

    ``expected``: the fingerprint it must have (default: :func:`fingerprint` of ``search``).

    Raises:
        StateError: if the checkpoint is from another model or config.
    """
    expected = fingerprint(search, adapter_config) if expected is None else expected
    check_fingerprint(saved.fingerprint, expected, saved.path)
    named = _named(search)
    if set(named) != set(saved.tensors):
        raise StateError(f"checkpoint {saved.path} holds other tensors than this trainer's adapters.")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(saved.tensors[name])
    if search.weight_optimizer is not None:
        search.weight_optimizer.load_state_dict(saved.state["weight_optimizer"])
    if search.selector_optimizer is not None:
        search.selector_optimizer.load_state_dict(saved.state["selector_optimizer"])
    search.state = TrainerState(**saved.state["trainer"])
    set_rng_state(saved.state["rng"])
    step, epoch = saved.state["call_start"]
    return int(step), int(epoch)
