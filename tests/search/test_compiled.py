"""``compile=True``: the captured loss passes agree with eager ones, keep their graphs across
sequence lengths, leave the non-finite guard intact, and refuse the double-backward engines.

Most tests use the ``aot_eager`` backend (dynamo and AOTAutograd capture the same forward and
backward graphs, run with eager kernels): on a 2-core CPU inductor's code generation alone takes
tens of seconds per graph of a transformer. One test runs inductor on the MLP.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from autolora import AutoLoRATrainer, ConfigError, NonFiniteError, SearchConfig
from autolora.search.compiled import repeated_blocks
from autolora.search.guard import Guard
from autolora.search.step import build_search, settle, take_step
from autolora.state import TrainerState
from tests.conftest import MLP, VOCAB, llama, mlp_batches, mlp_loss, token_batches

# aot_eager runs the eager kernels in another order (fused backward graph): bitwise equal here, but
# allowed float32 rounding differences of a few ulp per step, compounded over the steps below
TOL = 1e-5


def _bert(layers: int = 1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,  # one layer: the whole model is traced once per test
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # BERT sets problem_type on its first forward, which fails that first graph's guard and
        # recompiles it once; set here so the test compiles each graph once
        problem_type="single_label_classification",
    )
    return BertForSequenceClassification(cfg)


def _llama(layers: int = 1):
    return llama(layers=layers)


MODELS = {
    "bert": (_bert, {"modules_to_save": ["classifier"]}, "cls"),
    "llama": (_llama, {"target_modules": "all-linear"}, "lm"),
}


def _trainer(name: str, compile: bool, scope: str = "model", **kw) -> AutoLoRATrainer:
    """``scope="model"`` on one layer; ``"blocks"`` on three, which share their graphs."""
    make, options, _ = MODELS[name]
    return AutoLoRATrainer(
        make(layers=3 if scope == "blocks" else 1), max_rank=4, progress=False, compile=compile,
        compile_scope=scope, compile_backend="aot_eager", **options, **kw,
    )  # fmt: skip


def _batches(name: str):
    """Train batches of two sequence lengths and two batch sizes; validation of a third length."""
    labels = MODELS[name][2]
    train = token_batches(n=2, length=8, labels=labels) + token_batches(n=2, size=3, length=12, seed=3, labels=labels)
    return train, token_batches(n=2, length=10, seed=2, labels=labels)


def _weights(t: AutoLoRATrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def _close(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=TOL, atol=TOL, msg=k)


@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_matches_eager(name, scope):
    """first_order and darts hypergradients, the losses, and the adapters after a darts search
    (both lengths, selector step every step) agree with eager within TOL; first_order and darts
    capture four graphs in all ({weights}, {selectors}, {virtual weights, selectors}, and darts's
    train pass {weights, selectors}, which gives the forward difference its base point), with no
    recompile for the second sequence length or batch size. With ``blocks`` each pass kind has two
    graphs of one layer: the first layer's (its input needs no gradient) and one that the other
    two layers share (twelve in all would mean a graph per layer)."""
    train, val = _batches(name)
    runs = {}
    for compiled in (False, True):
        t = _trainer(name, compiled, scope, hypergrad="darts", selector_every=1)
        hyper = {e: t.hypergradient(train[0], val[0], engine=e) for e in ("first_order", "darts")}
        start = dict(counters["stats"])
        t.fit(train, val)
        runs[compiled] = (t, hyper, t.step(train[2], val[1]), _weights(t))
        new_graphs = counters["stats"]["unique_graphs"] - start.get("unique_graphs", 0)
    (eager, hyper_e, loss_e, weights_e), (comp, hyper_c, loss_c, weights_c) = runs[False], runs[True]
    for engine in hyper_e:
        _close(hyper_e[engine], hyper_c[engine])
    assert loss_c.keys() == {"loss/train", "loss/val"}
    _close({k: torch.tensor(v) for k, v in loss_e.items()}, {k: torch.tensor(v) for k, v in loss_c.items()})
    _close(weights_e, weights_c)
    assert eager.state.compiled_graphs == 0 and eager.state.compile_seconds == 0
    # all in the hypergradient() calls: fit compiled nothing
    assert comp.state.compiled_graphs == (4 if scope == "model" else 8)
    assert new_graphs == 0  # dynamo's own count: lengths 8, 12 and 10, batch sizes 4 and 3, no recompile
    assert comp.state.compile_seconds > 0
    assert comp.search.problem.compiled.scope == scope


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_are_the_layers_and_are_left_uncompiled(name):
    """``repeated_blocks`` finds the transformer layers, and the compiled call is on them only
    during a pass: after a search the user's model is plain again."""
    t = _trainer(name, True, "blocks", selector_every=1)
    layers = t.model.bert.encoder.layer if name == "bert" else t.model.model.layers
    assert repeated_blocks(t.model) == list(layers)
    train, val = _batches(name)
    t.fit(train, val)
    assert t.state.compiled_graphs > 0
    assert all(b._compiled_call_impl is None for b in layers)


def test_a_model_without_repeated_blocks_is_compiled_whole():
    assert repeated_blocks(MLP()) == []
    t = AutoLoRATrainer(
        MLP(), max_rank=4, target_modules=["fc1", "fc2"], loss_fn=mlp_loss, compile=True,
        compile_backend="aot_eager", progress=False,
    )  # fmt: skip
    t.fit(mlp_batches(4), mlp_batches(2, seed=2))
    assert t.search.problem.compiled.scope == "model" and t.state.compiled_graphs == 2  # train and validation


def test_compile_seconds_are_logged(tmp_path):
    t = AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        loss_fn=mlp_loss,
        compile=True,
        compile_backend="aot_eager",
        log_dir=str(tmp_path),
        loggers=["jsonl"],
        progress=False,
    )
    t.fit(mlp_batches(4), mlp_batches(2, seed=2))
    rows = (tmp_path / "metrics.jsonl").read_text()
    assert '"compile/seconds"' in rows and '"compile/graphs"' in rows
    assert t.state.compiled_graphs == 2 and t.state.compile_seconds > 0  # train and validation pass


def test_inductor_matches_eager():
    runs = {}
    for compiled in (False, True):
        t = AutoLoRATrainer(
            MLP(), max_rank=4, target_modules=["fc1", "fc2"], modules_to_save=["head"], loss_fn=mlp_loss,
            selector_every=1, compile=compiled, progress=False,
        )  # fmt: skip
        t.fit(mlp_batches(3), mlp_batches(2, seed=2))
        runs[compiled] = (_weights(t), t.state.compiled_graphs)
    _close(runs[False][0], runs[True][0])
    assert runs[True][1] == 2


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_loss_is_caught_when_compiled(fused):
    """A NaN input in a compiled pass: settled at once (CPU) or deferred a step (fused optimisers,
    the CUDA configuration), the step changes nothing and the error names it."""
    t = AutoLoRATrainer(
        MLP(), max_rank=4, target_modules=["fc1", "fc2"], loss_fn=mlp_loss, hypergrad="darts",
        compile=True, compile_backend="aot_eager", progress=False,
    )  # fmt: skip
    search = build_search(
        t.model, t.adapters, t.modules_to_save, t.loss_fn, t.search_config,
        state=TrainerState(), guard=Guard(fp16=False, skip=False), fused=fused,
    )  # fmt: skip
    assert search.defer == fused and search.problem.compiled is not None
    batches = mlp_batches(3)
    take_step(search, [batches[0]], [batches[1]])
    settle(search)
    before = _weights(t)
    bad = (batches[0][0] * float("nan"), batches[0][1])
    with pytest.raises(NonFiniteError, match="step 2: the train loss") as failed:
        take_step(search, [bad], [batches[1]])
        take_step(search, [batches[2]], [batches[1]])  # deferred: the verdict comes with the next step
    assert failed.value.step == 2 and search.state.step == 1
    _close(before, _weights(t))


@pytest.mark.parametrize("engine", ["unrolled", "higher"])
def test_double_backward_engines_refuse_compile(engine):
    with pytest.raises(ConfigError, match=f"compile=True does not support hypergrad='{engine}'.*search.compile: false"):
        SearchConfig(hypergrad=engine, compile=True)


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"compile_backend=.nope. is not a torch\.compile backend.*inductor"):
        AutoLoRATrainer(
            MLP(), max_rank=4, target_modules=["fc1"], loss_fn=mlp_loss, compile=True, compile_backend="nope"
        )


def test_blocks_under_gradient_checkpointing_match_eager():
    """A checkpointed layer recomputes its forward in the backward, after the compiled call is
    removed from the blocks: the recomputation runs eagerly and the step is unchanged."""
    train, val = _batches("llama")
    weights = {}
    for compiled in (False, True):
        t = _trainer("llama", compiled, "blocks", gradient_checkpointing=True, selector_every=1)
        t.fit(train, val)
        weights[compiled] = _weights(t)
        assert (t.state.compiled_graphs > 0) == compiled
    _close(weights[False], weights[True])
