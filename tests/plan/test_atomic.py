"""One atomic folder write for checkpoints and exports."""

import pytest

from autolora.plan.atomic import atomic_dir


def test_the_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_a_failed_block_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_call(tmp_path):
    from autolora.plan.atomic import recover

    target = tmp_path / "adapter"
    # what a writer killed after moving the old folder aside (and before moving the new one in) leaves
    pid = _dead_pid()
    old = tmp_path / f".adapter.old-{pid}-abc123"
    (old / "x").mkdir(parents=True)
    (old / "x" / "keep.txt").write_text("old")
    new = tmp_path / f".adapter.tmp-{pid}-def456"
    new.mkdir()
    (new / "half.txt").write_text("new")
    recover(target)
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_replacement_never_leaves_the_target_missing_and_stale_temp_folders_go(tmp_path, monkeypatch):
    import autolora.plan.atomic as atomic

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    stale = tmp_path / f".step-00000002.tmp-{_dead_pid()}-zzz999"
    stale.mkdir()
    seen = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: seen.append(b.exists()) or real(a, b))
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert seen == [True] and sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the stale one was removed too
    # where the exchange is unsupported, the two-rename fallback gives the same result
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]


def test_a_file_system_fault_is_one_write_error_naming_the_path(tmp_path):
    from autolora import WriteError

    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"cannot write .*file/out"), atomic_dir(tmp_path / "file" / "out"):
        pass

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="No space left on device"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
        full()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
