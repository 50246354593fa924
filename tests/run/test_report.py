"""``autolora report``: markdown and PNGs from a run folder."""

import json

import pytest

from autolora import AutoLoRATrainer, DataError
from autolora.run.report import read_run, write_report
from tests.conftest import bert, token_batches


def _run(tmp_path, export: bool):
    t = AutoLoRATrainer(
        bert(),
        max_rank=4,
        target_modules=["query", "value"],
        hypergrad="first_order",
        selector_lr=0.5,
        log_dir=str(tmp_path),
        loggers=["jsonl"],
        log_every=2,
    )
    t.fit(token_batches(6), epochs=1)
    if export:
        t.prune()
        t.export(tmp_path / "adapter")
    t.close()
    return t


@pytest.mark.parametrize("export", [False, True])
def test_report_writes_markdown_and_decodable_pngs(tmp_path, export):
    from PIL import Image

    t = _run(tmp_path, export)
    path = write_report(tmp_path)
    text = path.read_text()
    assert "| layer | query | value |" in text
    assert f"adapter parameters: {t.parameter_count()['adapter']:,}" in text
    for name in ("rank_heatmap.png", "gate_distribution.png", "gate_heatmap.png", "rank_over_time.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 100
    run = read_run(tmp_path)
    assert run["ranks"] == t.ranks()
    if export:
        assert run["gates"] == json.loads((tmp_path / "adapter" / "ranks.json").read_text())["gates"]


def test_report_on_a_folder_without_a_run(tmp_path):
    with pytest.raises(DataError, match=r"holds no metrics\.jsonl"):
        write_report(tmp_path)


def test_report_tolerates_a_truncated_last_line(tmp_path):
    _run(tmp_path, export=False)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "rank/x')
    assert write_report(tmp_path).is_file()


def test_report_names_a_corrupt_ranks_file(tmp_path):
    _run(tmp_path, export=True)
    ranks = tmp_path / "adapter" / "ranks.json"
    ranks.write_text(ranks.read_text()[:40])  # truncated
    with pytest.raises(DataError, match=r"ranks\.json is corrupt or truncated"):
        write_report(tmp_path)


def test_report_shows_each_ranks_confidence_and_the_warning(tmp_path):
    from PIL import Image

    _run(tmp_path, export=True)
    path = tmp_path / "adapter" / "ranks.json"
    record = json.loads(path.read_text())
    assert set(record["confidence"]) == set(record["ranks"])
    record["warning"] = "ranks are not distinguishable (a test); consider a uniform LoRA r=2."
    record["confidence"] = dict.fromkeys(record["ranks"], 0.25)
    path.write_text(json.dumps(record))
    text = write_report(tmp_path).read_text()
    assert "## How sure each rank is" in text and "| 0 | 0.25 | 0.25 |" in text
    assert "**Warning:** ranks are not distinguishable (a test)" in text
    Image.open(tmp_path / "rank_confidence.png").verify()
