"""Data-parallel search: 2 gloo processes launched by torch.distributed.run on CPU."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autolora import AutoLoRATrainer
from tests.conftest import MLP, mlp_batches, mlp_loss

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch
    from safetensors.torch import save_file
    from autolora import AutoLoRATrainer, AutoLoRAError
    from tests.conftest import MLP, mlp_batches, mlp_loss

    out, engine, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    train, val = mlp_batches(6, size=4, seed=5), mlp_batches(4, size=4, seed=6)
    # each process passes its own shard: every other batch
    train, val = train[rank::2], val[rank::2]
    if mode == "unequal" and rank == 1:
        train = train[:-1]
    torch.manual_seed(0)
    t = AutoLoRATrainer(MLP(), max_rank=4, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                        loss_fn=mlp_loss, hypergrad=engine, selector_lr=0.1, seed=2, log_dir=out + "/logs",
                        loggers=["jsonl"], log_every=1)
    try:
        # "partial" stops after 3 steps, as if killed; the next launch resumes from the checkpoint
        steps = 3 if mode == "partial" else None
        t.fit(train, val, epochs=2, max_steps=steps, checkpoint_dir=out + "/ckpt", resume=True)
        if mode == "partial":
            sys.exit(0)
    except AutoLoRAError as e:
        print(f"rank {{rank}}: {{type(e).__name__}}: {{e}}", file=sys.stderr)
        sys.exit(3)
    state = {{n: p.detach().contiguous() for n, p in t.model.named_parameters() if p.requires_grad}}
    save_file(state, f"{{out}}/rank{{rank}}.safetensors")
    """
)


# The one-line accelerate config of the README (MULTI_GPU launches through torchrun; on CPU the
# trainer joins with gloo)
ACCELERATE_CONFIG = "distributed_type: MULTI_GPU\nnum_processes: 2\n"


def _launch(tmp_path, engine, mode="equal", launcher="torchrun"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    if launcher == "accelerate":
        config = tmp_path / "accelerate.yaml"
        config.write_text(ACCELERATE_CONFIG)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*cmd, str(tmp_path), engine, mode], capture_output=True, text=True, timeout=300)


def _single_process(engine):
    train, val = mlp_batches(6, size=4, seed=5), mlp_batches(4, size=4, seed=6)

    def union(batches):  # the batch each data-parallel step sees across both processes
        return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(batches[0::2], batches[1::2])]

    torch.manual_seed(0)
    t = AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        modules_to_save=["head"],
        loss_fn=mlp_loss,
        hypergrad=engine,
        selector_lr=0.1,
        seed=2,
    )
    init = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.fit(union(train), union(val), epochs=2)
    return t, init


@pytest.mark.parametrize("engine", ["first_order", "darts"])
def test_two_processes_equal_the_single_process_maths(tmp_path, engine):
    result = _launch(tmp_path, engine)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    ref, init = _single_process(engine)
    expected = {n: p.detach() for n, p in ref.model.named_parameters() if p.requires_grad}
    assert r0.keys() == expected.keys() and any("selector" in n for n in r0)
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n  # identical on every process
        assert torch.allclose(r0[n], expected[n], atol=1e-6, rtol=1e-5), n  # = one process on the union
    assert any(not torch.equal(r0[n], init[n]) for n in r0 if "selector" in n)  # the selectors moved
    # only the main process logged and checkpointed
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    scalar_steps = [r["step"] for r in records if "kind" not in r]
    assert scalar_steps == list(range(1, 7))  # once per step, not once per process
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000006"]


def test_accelerate_launch_with_the_one_line_config_equals_one_process(tmp_path):
    pytest.importorskip("accelerate")
    result = _launch(tmp_path, "first_order", launcher="accelerate")
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    expected = {n: p.detach() for n, p in _single_process("first_order")[0].model.named_parameters() if p.requires_grad}
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
        assert torch.allclose(r0[n], expected[n], atol=1e-6, rtol=1e-5), n


def test_resume_under_data_parallelism(tmp_path):
    first = _launch(tmp_path, "darts", mode="partial")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000003"]
    second = _launch(tmp_path, "darts")  # the same command line, resumed on both ranks
    assert second.returncode == 0, second.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    ref, _ = _single_process("darts")
    for n, p in ref.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(r0[n], r1[n]), n
            assert torch.allclose(r0[n], p.detach(), atol=1e-6, rtol=1e-5), n


def test_unequal_shards_are_a_clear_error_not_a_hang(tmp_path):
    result = _launch(tmp_path, "first_order", mode="unequal")
    assert result.returncode != 0
    assert "different number of batches on each process ([3, 2])" in result.stderr


def test_unrolled_is_refused_under_data_parallelism(tmp_path):
    result = _launch(tmp_path, "unrolled")
    assert result.returncode != 0
    assert "not supported with data parallelism" in result.stderr


def test_single_process_without_launcher_does_not_initialise(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    t = AutoLoRATrainer(MLP(), max_rank=2, target_modules=["fc1"], loss_fn=mlp_loss)
    t.fit(mlp_batches(3), max_steps=1)
    assert t.is_main_process and not torch.distributed.is_initialized()
