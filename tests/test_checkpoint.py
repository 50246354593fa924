"""Checkpoints: lossless kill-and-resume, atomic writes, fault injection, mismatch errors."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autolora import AutoLoRATrainer, ConfigError, StateError
from autolora.checkpoint import complete
from tests.conftest import MLP, mlp_batches, mlp_loss

ROOT = Path(__file__).resolve().parents[1]

# A child process: a seeded search with adapter dropout (so RNG state matters), checkpointing
# every 2 steps; it writes its final adapter state to OUT. SLOW makes each step take a while.
CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    from safetensors.torch import save_file
    from autolora import AutoLoRATrainer
    from tests.conftest import MLP, mlp_batches, mlp_loss

    ckpt, out, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def loss_fn(model, batch):
        time.sleep(slow)
        return mlp_loss(model, batch)

    torch.manual_seed(0)
    t = AutoLoRATrainer(MLP(), max_rank=4, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                        loss_fn=loss_fn, hypergrad="darts", lora_dropout=0.2, selector_lr=0.05, seed=3)
    t.fit(mlp_batches(10), epochs=3, checkpoint_dir=ckpt, checkpoint_every=2, keep_checkpoints=2, resume=True)
    save_file({{n: p.detach().contiguous() for n, p in t.model.named_parameters() if p.requires_grad or "selector" in n}}, out)
    print("steps", t.state.step)
    """
)


def _child(tmp_path, ckpt, out, slow):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    return subprocess.Popen(
        [sys.executable, str(script), str(ckpt), str(out), str(slow)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_sigkill_and_resume_is_lossless(tmp_path):
    # uninterrupted reference
    ref = _child(tmp_path, tmp_path / "ref_ckpt", tmp_path / "ref.safetensors", 0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    # killed after its second checkpoint (step 4), then resumed by the same command line
    ckpt = tmp_path / "ckpt"
    proc = _child(tmp_path, ckpt, tmp_path / "out.safetensors", 0.15)
    deadline = time.time() + 240
    while not any(p.name >= "step-00000004" for p in complete(ckpt)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out.safetensors").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in complete(ckpt))
    assert killed_at < 21  # 7 steps x 3 epochs: the kill came before the end
    resumed = _child(tmp_path, ckpt, tmp_path / "out.safetensors", 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert b"steps 21" in resumed.stdout.read()
    a, b = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "out.safetensors"))
    assert a.keys() == b.keys() and any("selector" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def _trainer(**kw):
    torch.manual_seed(0)
    kw = {"max_rank": 4, "hypergrad": "darts", "lora_dropout": 0.1, "selector_lr": 0.05, **kw}
    return AutoLoRATrainer(
        MLP(), target_modules=["fc1", "fc2"], modules_to_save=["head"], loss_fn=mlp_loss, seed=1, **kw
    )


def _state(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad or "selector" in n}


def test_checkpoint_holds_only_adapter_state_and_keeps_k(tmp_path):
    t = _trainer()
    t.fit(mlp_batches(8), epochs=2, checkpoint_dir=tmp_path, checkpoint_every=3, keep_checkpoints=2)
    names = [p.name for p in complete(tmp_path)]
    assert names == ["step-00000009", "step-00000012"]  # 6 train batches x 2 epochs: saves at 3, 6, 9, 12
    tensors = load_file(str(tmp_path / names[-1] / "adapter.safetensors"))
    assert {k.split("/")[0] for k in tensors} == {"weight", "selector"}
    assert not any("base_layer" in k for k in tensors)  # never the frozen base
    state = torch.load(tmp_path / names[-1] / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 12 and state["call_start"] == [0, 0]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left


def test_resume_finishes_the_interrupted_call_and_matches_an_uninterrupted_run(tmp_path):
    ref = _trainer()
    ref.fit(mlp_batches(8), epochs=2)
    t = _trainer()
    t.fit(mlp_batches(8), epochs=2, max_steps=4, checkpoint_dir=tmp_path)  # stopped after 4 of 12 steps
    at_4 = _state(t)
    # the same command line again (budget: 2 epochs from the call's start) runs the remaining 8 steps
    fresh = _trainer()
    fresh.fit(mlp_batches(8), epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert fresh.state.step == ref.state.step == 12
    for n, p in _state(ref).items():
        assert (p - _state(fresh)[n]).abs().max() <= 1e-6, n
    # load_checkpoint restores a given state exactly; a finished call resumed again does nothing
    other = _trainer()
    other.load_checkpoint(tmp_path)
    assert other.state.step == 12
    done = _trainer()
    done.fit(mlp_batches(8), epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert done.state.step == 12
    assert any(not torch.equal(at_4[n], p) for n, p in _state(done).items())


def test_resume_without_checkpoints_starts_fresh(tmp_path):
    t = _trainer()
    t.fit(mlp_batches(5), epochs=1, checkpoint_dir=tmp_path / "new", resume=True)
    assert t.state.step == 4 and complete(tmp_path / "new")


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    t = _trainer()
    t.fit(mlp_batches(8), epochs=1, checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=3)
    *_, previous, newest = complete(tmp_path)
    blob = newest / "adapter.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # truncated mid-write
    fresh = _trainer()
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        path = fresh.load_checkpoint(tmp_path)
    assert path == previous
    assert fresh.state.step == int(previous.name.split("-")[1])
    # a half-written folder (no manifest yet) is not even a candidate
    (tmp_path / "step-00000099").mkdir()
    assert tmp_path / "step-00000099" not in complete(tmp_path)


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    t = _trainer()
    t.fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    for p in complete(tmp_path):
        (p / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(StateError, match="no complete checkpoint"):
        _trainer().load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"max_rank": 3}, "adapters"), ({"hypergrad": "first_order"}, "search_config")],
)
def test_resume_from_another_model_or_config_is_refused(tmp_path, change, message):
    _trainer().fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(StateError, match=f"different model or config.*{message}"):
        _trainer(**change).fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path, resume=True)


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="need checkpoint_dir"):
        _trainer().fit(mlp_batches(4), resume=True)
    with pytest.raises(ConfigError, match="checkpoint_every=0"):
        _trainer().fit(mlp_batches(4), checkpoint_dir=tmp_path, checkpoint_every=0)


class _Unsafe:
    """Not loadable with torch.load(weights_only=True)."""


def _rewrite_state(step_dir, state):
    import hashlib
    import json

    torch.save(state, step_dir / "state.pt")
    manifest = json.loads((step_dir / "checkpoint.json").read_text())
    manifest["sha256"]["state.pt"] = hashlib.sha256((step_dir / "state.pt").read_bytes()).hexdigest()
    (step_dir / "checkpoint.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("bad", "message"),
    [(lambda s: {"evil": _Unsafe()}, "cannot be read"), (lambda s: {k: s[k] for k in s if k != "rng"}, "lacks")],
)
def test_an_unpicklable_or_incomplete_state_falls_back_to_the_previous_checkpoint(tmp_path, bad, message):
    t = _trainer()
    t.fit(mlp_batches(8), epochs=1, checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=3)
    newest = complete(tmp_path)[-1]
    _rewrite_state(newest, bad(torch.load(newest / "state.pt", weights_only=True)))
    fresh = _trainer()
    with pytest.warns(UserWarning, match=message):
        fresh.fit(mlp_batches(8), epochs=1, checkpoint_dir=tmp_path, resume=True)
    assert fresh.state.step == t.state.step  # resumed from the previous one and finished the call


def test_a_step_folder_loads_and_a_file_as_checkpoint_dir_is_refused(tmp_path):
    t = _trainer()
    t.fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path / "ck", checkpoint_every=1, keep_checkpoints=3)
    first = complete(tmp_path / "ck")[0]
    other = _trainer()
    assert other.load_checkpoint(first) == first and other.state.step == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        _trainer().fit(mlp_batches(4), checkpoint_dir=tmp_path / "file")


def test_a_checkpoint_write_that_fails_is_one_error_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    from autolora import WriteError

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    t = _trainer()
    monkeypatch.setattr("autolora.checkpoint.save_file", full)
    with pytest.raises(WriteError, match=r"step-00000003.*No space left on device"):
        t.fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_from_before_a_config_field_existed_still_loads(tmp_path):
    """A field added later (stop_when_stable here) is taken at its default for an older
    checkpoint, which ran without it; a differing value is still refused."""
    import json

    first = _trainer().fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    (manifest,) = tmp_path.glob("step-*/checkpoint.json")
    record = json.loads(manifest.read_text())
    del record["fingerprint"]["search_config"]["stop_when_stable"]  # as an older version wrote it
    manifest.write_text(json.dumps(record))
    resumed = _trainer()
    resumed.load_checkpoint(tmp_path)
    assert resumed.state.step == first.state.step
    with pytest.raises(StateError, match=r"different model or config.*search_config"):
        _trainer(stop_when_stable=3).load_checkpoint(tmp_path)


def test_a_darts_checkpoint_from_before_darts_difference_is_a_central_one(tmp_path):
    """darts differenced centrally before ``darts_difference`` existed, so such a checkpoint
    resumes with ``darts_difference="central"`` and is refused under the new default."""
    import json

    first = _trainer(darts_difference="central").fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    (manifest,) = tmp_path.glob("step-*/checkpoint.json")
    record = json.loads(manifest.read_text())
    del record["fingerprint"]["search_config"]["darts_difference"]  # as an older version wrote it
    manifest.write_text(json.dumps(record))
    resumed = _trainer(darts_difference="central")
    resumed.load_checkpoint(tmp_path)
    assert resumed.state.step == first.state.step
    with pytest.raises(StateError, match=r"'darts_difference': 'central'.* vs now .*'darts_difference': 'forward'"):
        _trainer().load_checkpoint(tmp_path)


def test_compile_is_no_part_of_the_fingerprint(tmp_path):
    """How a step runs (compiled or eager) does not change what it computes: either resumes the other."""
    import json

    first = _trainer().fit(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)
    (manifest,) = tmp_path.glob("step-*/checkpoint.json")
    assert "compile" not in json.loads(manifest.read_text())["fingerprint"]["search_config"]
    resumed = _trainer(compile=True, compile_backend="aot_eager")
    resumed.load_checkpoint(tmp_path)  # loading runs no pass, so nothing compiles here
    assert resumed.state.step == first.state.step
