"""Screenshots of AutoLoRA's TensorBoard dashboards, taken with headless Chromium.

Runs a short AutoLoRA search on a tiny random BERT (seconds on CPU) with TensorBoard logging,
starts ``tensorboard`` on its log folder, checks through TensorBoard's HTTP data API that the
run's rank scalars, rank heatmap images and custom-scalars layout are loaded, then saves two PNGs:

* ``tensorboard_images.png``: the Images tab (the final gate heatmap ``gates/final`` and the
  rank heatmap ``ranks/heatmap``, layer x module type, with its step slider);
* ``tensorboard_scalars.png``: the Scalars tab filtered to ``^rank/``, one chart per adapted
  module showing its rank over the search (smoothing 0, since ranks are integers).

    python experiments/tensorboard_screenshot.py
    python experiments/tensorboard_screenshot.py --out-dir /tmp/shots --port 6007 --keep-logs

Needs Chromium (Debian: ``apt-get install -y chromium``). TensorBoard's Images and Scalars tabs
are Polymer elements whose content sits in shadow DOM, which ``--dump-dom`` does not serialise;
so the DOM checks are: the dump of each screenshot URL must hold the tab's dashboard element, and
the dump of the (Angular, light-DOM) Time Series tab filtered to the run's tags must hold the
``ranks/heatmap`` and ``rank/<module>`` cards. Any failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RUN = "autolora-search"  # the run's sub-folder of the log dir: its name in TensorBoard
MAX_PNG_BYTES = 400_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
VIRTUAL_TIME_MS = 15_000  # virtual time the page's JS gets before the screenshot / DOM dump


class ScreenshotError(RuntimeError):
    """A step of the screenshot pipeline failed; the message says which and why."""


# ----------------------------------------------------------------------------- the search
def run_search(run_dir: Path) -> dict[str, int]:
    """A short AutoLoRA search on a tiny random BERT, logged to ``run_dir``; the final ranks."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from autolora import AutoLoRATrainer

    # one thread: the model is tiny, and on a busy machine more threads only contend
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=200,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randint(0, 200, (8, 16), generator=g),
            "attention_mask": torch.ones(8, 16, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=g),
        }
        for _ in range(12)
    ]
    # selector_lr 0.02: ranks drift apart over ~50 steps and settle at 2-4 by layer; with 0.2
    # almost every layer collapses to rank 1 within a few epochs, which makes a dull picture
    trainer = AutoLoRATrainer(
        model,
        max_rank=8,
        target_modules=["query", "key", "value"],
        modules_to_save=["classifier"],
        hypergrad="first_order",
        selector_lr=0.02,
        log_dir=run_dir,
        log_every=2,
        progress=False,
    )
    try:
        trainer.fit(batches, epochs=6)
        return trainer.ranks()
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- TensorBoard
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop ``proc`` and its children (it was started in a session of its own)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def tensorboard(logdir: Path, port: int, log_file: Path) -> Iterator[str]:
    """Run TensorBoard on ``logdir``; yields its base URL once ``/data/runs`` answers."""
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port), "--bind_all"]
    with log_file.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise ScreenshotError(f"tensorboard exited with {proc.returncode}:\n{tail(log_file)}")
            try:
                get_json(f"{base}/data/runs", timeout=2)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise ScreenshotError(f"{base}/data/runs did not answer in 90 s:\n{tail(log_file)}") from None
                time.sleep(0.5)
        yield base
    finally:
        stop_group(proc)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def check_tensorboard_data(base: str, modules: list[str], timeout: float = 60.0) -> None:
    """Poll TensorBoard's data API until the run's tags are loaded; raise if they never are."""
    want_scalars = {f"rank/{m}" for m in modules} | {"loss/train", "loss/val"}
    want_images = {"ranks/heatmap", "gates/final"}
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        runs = get_json(f"{base}/data/runs")
        if not isinstance(runs, list) or RUN not in runs:
            problems.append(f"/data/runs is {runs!r}, without {RUN!r}")
        scalars = get_json(f"{base}/data/plugin/scalars/tags")
        have = set(scalars.get(RUN, {})) if isinstance(scalars, dict) else set()
        if missing := sorted(want_scalars - have):
            problems.append(f"/data/plugin/scalars/tags lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        images = get_json(f"{base}/data/plugin/images/tags")
        have = set(images.get(RUN, {})) if isinstance(images, dict) else set()
        if missing := sorted(want_images - have):
            problems.append(f"/data/plugin/images/tags lacks {missing}")
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        if "AutoLoRA ranks" not in json.dumps(layout):
            problems.append("/data/plugin/custom_scalars/layout lacks the 'AutoLoRA ranks' category")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise ScreenshotError("TensorBoard did not load the run's tags:\n  " + "\n  ".join(problems))
        time.sleep(1)


# ----------------------------------------------------------------------------- Chromium
def find_chromium(explicit: str | None) -> str:
    for name in [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(
        f"no Chromium found ({explicit or 'chromium, chromium-browser, google-chrome'}); "
        "on Debian: apt-get install -y chromium"
    )


def chromium(binary: str, args: list[str], url: str, timeout: float = 180.0) -> str:
    """Run headless Chromium once on ``url`` with a fresh profile; its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise ScreenshotError(f"chromium took over {timeout:.0f} s on {url}") from None
    if proc.returncode != 0:
        raise ScreenshotError(f"chromium exited with {proc.returncode} on {url}:\n{err[-3000:]}")
    return out


def screenshot(binary: str, url: str, png: Path, window: tuple[int, int], scale: float = 1.0) -> None:
    png.unlink(missing_ok=True)
    args = [
        f"--window-size={window[0]},{window[1]}",
        f"--force-device-scale-factor={scale}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        f"--screenshot={png}",
    ]
    chromium(binary, args, url)
    if not png.is_file() or png.stat().st_size == 0:
        raise ScreenshotError(f"chromium wrote no screenshot of {url} to {png}")


def dump_dom(binary: str, url: str, window: tuple[int, int] = (1600, 1200)) -> str:
    args = [f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom"]
    return chromium(binary, args, url)


def require_in_dom(dom: str, needles: list[str], url: str) -> None:
    missing = [n for n in needles if n not in dom]
    if missing:
        raise ScreenshotError(f"the DOM of {url} ({len(dom)} chars) lacks {missing}: the page did not load the run")


def shrink_png(png: Path, max_bytes: int = MAX_PNG_BYTES) -> None:
    """Re-save ``png`` optimised; if still over ``max_bytes``, as a 256-colour palette PNG."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    for quantize in (False, True):
        buf = io.BytesIO()
        (rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT) if quantize else rgb).save(buf, "PNG", optimize=True)
        if buf.tell() <= max_bytes or quantize:
            png.write_bytes(buf.getvalue())
            break
    if png.stat().st_size > max_bytes:
        raise ScreenshotError(f"{png} is {png.stat().st_size} bytes even as a palette PNG (limit {max_bytes})")


# ----------------------------------------------------------------------------- main
def hash_url(base: str, tab: str, **params: str) -> str:
    """A Polymer tab's URL; its settings (tag filter, smoothing) live in the URL fragment."""
    return f"{base}/#{tab}" + "".join(f"&{k}={urllib.parse.quote(v, safe='')}" for k, v in params.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--logdir",
        type=Path,
        default=None,
        help="TensorBoard log dir to create (must be absent or empty; kept afterwards). Default: a temp dir",
    )
    ap.add_argument("--port", type=int, default=0, help="TensorBoard port (default: a free one)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent, help="where the PNGs go")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp log dir and TensorBoard's own log")
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    args = ap.parse_args()

    t0 = time.monotonic()
    if args.logdir is not None and args.logdir.exists() and any(args.logdir.iterdir()):
        sys.exit(f"--logdir {args.logdir} is not empty; give a fresh folder so only this run shows")
    try:
        browser = find_chromium(args.chromium)  # fail before the search, not after
    except ScreenshotError as e:
        sys.exit(f"FAILED: {e}")
    work = Path(tempfile.mkdtemp(prefix="autolora-tb-"))
    logdir = work / "logs" if args.logdir is None else args.logdir.resolve()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    images_png, scalars_png = out_dir / "tensorboard_images.png", out_dir / "tensorboard_scalars.png"
    try:
        print(f"[1/4] AutoLoRA search on a tiny random BERT -> {logdir / RUN}", flush=True)
        ranks = run_search(logdir / RUN)
        modules = list(ranks)
        print(f"      {time.monotonic() - t0:.1f} s; final ranks: {list(ranks.values())}", flush=True)

        port = args.port or free_port()
        print(f"[2/4] tensorboard --logdir {logdir} --port {port} --bind_all", flush=True)
        with tensorboard(logdir, port, work / "tensorboard.log") as base:
            check_tensorboard_data(base, modules)
            print(f"      data API OK: {len(modules)} rank/ scalars, ranks/heatmap + gates/final images", flush=True)

            print(f"[3/4] headless Chromium ({browser})", flush=True)
            # the Time Series tab is Angular (light DOM): its cards' titles show in --dump-dom
            first = re.escape(f"rank/{modules[0]}")
            ts_url = f"{base}/?tagFilter={urllib.parse.quote(f'^({first}|ranks/heatmap)$', safe='')}#timeseries"
            require_in_dom(dump_dom(browser, ts_url), [f'title="rank/{modules[0]}"', 'title="ranks/heatmap"'], ts_url)
            print("      Time Series DOM holds the rank/ and ranks/heatmap cards", flush=True)

            images_url = hash_url(base, "images")
            require_in_dom(dump_dom(browser, images_url), ["<tf-image-dashboard"], images_url)
            screenshot(browser, images_url, images_png, window=(1000, 1100), scale=1.25)
            print(f"      {images_url} -> {images_png.name}", flush=True)

            scalars_url = hash_url(base, "scalars", tagFilter="^rank/", _smoothingWeight="0")
            require_in_dom(dump_dom(browser, scalars_url), ["<tf-scalar-dashboard"], scalars_url)
            screenshot(browser, scalars_url, scalars_png, window=(1600, 1330))
            print(f"      {scalars_url} -> {scalars_png.name}", flush=True)
        print("[4/4] TensorBoard stopped", flush=True)

        for png in (images_png, scalars_png):
            shrink_png(png)
    except ScreenshotError as e:
        sys.exit(f"FAILED: {e}")
    finally:
        if args.keep_logs:
            print(f"kept: {logdir} and TensorBoard's own log {work / 'tensorboard.log'}")
        else:
            shutil.rmtree(work, ignore_errors=True)  # the temp log dir (if no --logdir) and tensorboard.log
            if args.logdir is not None:
                print(f"log dir (yours, kept): {logdir}")
    for png in (images_png, scalars_png):
        print(f"wrote {png} ({png.stat().st_size / 1000:.0f} KB)")
    print(f"done in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
