"""The training job: data checks, resume equality, crash-safe saves, NaN stop, and train-then-classify."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zsclip.errors import UserError
from zsclip.train import data as pairs_data
from zsclip.train import shapes
from zsclip.train.loop import Hooks, TrainConfig, TrainingDiverged, prepare, train
from zsclip.train.state import load_state


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small shapes world at 32 px: 48 training pairs, plus eval folders."""
    out = tmp_path_factory.mktemp("world")
    shapes.generate(out, 48, seed=5, image_size=32, val_count=16, eval_per_class=1)
    return out


def config_for(world: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        data=str(world / "train.tsv"),
        output=str(out),
        model="tiny",
        vocab_size=600,
        batch_size=8,
        steps=6,
        warmup=2,
        lr=1e-3,
        save_every=3,
        log_every=1,
        device="cpu",
        seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def params(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ---- pairs files ----------------------------------------------------------------------------------------------


def write_image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_pairs_formats_and_header(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "p.tsv").write_text("image\tcaption\na.png\ta red square.\n\na.png\tagain\n")
    pairs, problems = pairs_data.read_pairs(tmp_path / "p.tsv")
    assert problems == [] and [p.line for p in pairs] == [2, 4]
    assert pairs[0].image == tmp_path / "a.png" and pairs[0].caption == "a red square."
    (tmp_path / "p.csv").write_text('a.png,"a red, square"\n')
    assert pairs_data.read_pairs(tmp_path / "p.csv")[0][0].caption == "a red, square"
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    assert pairs_data.read_pairs(tmp_path / "p.jsonl")[0][0].caption == "x"


def test_problems_are_reported_with_line_numbers(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "p.tsv").write_text(
        "a.png\tok\nno tab here\nmissing.png\tgone\nbad.png\tbroken\na.png\t \n"
    )
    with pytest.raises(pairs_data.DataError) as err:
        pairs_data.load_pairs(tmp_path / "p.tsv")
    problems = err.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5"]  # in file order
    assert "two fields" in problems[0] and "empty caption" in problems[3]
    assert "not found" in problems[1] and "unreadable" in problems[2]
    assert "--skip-missing" in str(err.value)
    warnings = []
    kept = pairs_data.load_pairs(tmp_path / "p.tsv", skip_missing=True, warn=warnings.append)
    assert [p.line for p in kept] == [1]
    # each skipped row by its line, then the count
    assert [w.split(":")[1] for w in warnings[:4]] == ["2", "3", "4", "5"]
    assert all(w.endswith("(skipped)") for w in warnings[:4]) and "4 bad row" in warnings[4]
    (tmp_path / "j.jsonl").write_text('{"image": "a.png"}\nnot json\n')
    assert len(pairs_data.read_pairs(tmp_path / "j.jsonl")[1]) == 2


def test_a_byte_order_mark_does_not_hide_the_header(tmp_path):
    write_image(tmp_path / "a.png")
    bom = "\ufeff"
    (tmp_path / "p.tsv").write_text(f"{bom}image\tcaption\na.png\tx\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text(f"{bom}image,caption\na.png,x\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(
        f'{bom}{{"image": "a.png", "caption": "x"}}\n', encoding="utf-8"
    )
    for name in ("p.tsv", "p.csv", "p.jsonl"):
        pairs, problems = pairs_data.read_pairs(tmp_path / name)
        assert problems == [] and len(pairs) == 1, name
        assert pairs[0].image == tmp_path / "a.png" and pairs[0].caption == "x"


def truncated_png(path: Path) -> None:
    """A PNG whose header is whole but whose pixel data stops halfway (a download cut short)."""
    import io
    import random

    from PIL import Image

    rng = random.Random(0)
    image = Image.frombytes("RGB", (48, 48), bytes(rng.randrange(256) for _ in range(48 * 48 * 3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def pixel_flood_png(path: Path, side: int = 30000) -> None:
    """A few hundred bytes that claim side x side pixels: Pillow refuses it as a decompression bomb."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))  # over the type and the 13 data bytes
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_images_are_checked_by_decoding_them(tmp_path):
    """A truncated file passes a header check but not a decode; a pixel flood is refused by its header
    size. Both are problems with their line numbers, and --skip-missing drops both."""
    write_image(tmp_path / "a.png")
    truncated_png(tmp_path / "cut.png")
    pixel_flood_png(tmp_path / "flood.png")
    (tmp_path / "p.tsv").write_text("a.png\tok\ncut.png\tcut\nflood.png\tflood\na.png\tok again\n")
    with pytest.raises(pairs_data.DataError) as err:
        pairs_data.load_pairs(tmp_path / "p.tsv")
    problems = err.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "3"]
    assert "cut.png" in problems[0] and "flood.png" in problems[1]
    assert all("unreadable image" in p for p in problems)
    warnings: list[str] = []
    kept = pairs_data.load_pairs(tmp_path / "p.tsv", skip_missing=True, warn=warnings.append)
    assert [p.line for p in kept] == [1, 4] and len(warnings) == 3


def test_skip_missing_trains_past_undecodable_images(world, tmp_path):
    """The run that used to stop at step 0 on a truncated image now trains without that row."""
    rows = (world / "train.tsv").read_text().splitlines()
    truncated_png(tmp_path / "cut.png")
    pixel_flood_png(tmp_path / "flood.png")
    rows[3] = f"{tmp_path / 'cut.png'}\tcut"
    rows[7] = f"{tmp_path / 'flood.png'}\tflood"
    (world / "broken.tsv").write_text("\n".join(rows) + "\n")
    warnings: list[str] = []
    data = str(world / "broken.tsv")
    with pytest.raises(pairs_data.DataError, match="2 problem"):
        prepare(config_for(world, tmp_path / "stop", data=data))
    result = train(
        config_for(world, tmp_path / "skip", data=data, skip_missing=True, steps=5),
        hooks=Hooks(warn=warnings.append),
    )
    assert result.step == 5
    assert [w.split(":")[1] for w in warnings[:2]] == ["4", "8"]  # line numbers of the file


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert pairs_data.epoch_order(50, 1, 2) == pairs_data.epoch_order(50, 1, 2)
    assert pairs_data.epoch_order(50, 1, 2) != pairs_data.epoch_order(50, 1, 3)
    batches = pairs_data.epoch_batches(10, 3, 0, 0)
    assert len(batches) == 3 and pairs_data.epoch_batches(10, 3, 0, 0, start=2) == batches[2:]


# ---- the loop -------------------------------------------------------------------------------------------------


def test_interrupted_and_resumed_equals_uninterrupted(world, tmp_path):
    # 48 pairs / batch 8 = 6 steps an epoch; 9 steps cross an epoch boundary.
    full = train(config_for(world, tmp_path / "full", steps=9))
    assert full.step == 9 and not full.interrupted
    calls = {"n": 0}

    def stop_after_4() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    first = train(
        config_for(world, tmp_path / "cut", steps=9), hooks=Hooks(should_stop=stop_after_4)
    )
    assert first.interrupted and first.step == 4
    again = train(
        config_for(world, tmp_path / "cut", steps=9, lr=5.0), resume=True
    )  # saved config wins
    assert again.step == 9 and not again.interrupted
    a, b = (
        params(tmp_path / "full" / "model.safetensors"),
        params(tmp_path / "cut" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "config" and log[0]["world_size"] == 1
    steps = [r["step"] for r in log if r.get("event") == "train"]
    assert steps == list(range(1, 10))
    assert {"step", "epoch", "loss", "logit_scale", "lr", "images_per_s"} <= set(log[1])
    assert "<svg" in (tmp_path / "cut" / "report.html").read_text()


def test_output_folder_of_a_run_needs_resume(world, tmp_path):
    train(config_for(world, tmp_path / "r", steps=1))
    with pytest.raises(UserError, match="--resume"):
        prepare(config_for(world, tmp_path / "r", steps=1))
    with pytest.raises(UserError, match="no training state"):
        prepare(config_for(world, tmp_path / "empty"), resume=True)


def test_crash_during_save_keeps_the_previous_files(world, tmp_path, monkeypatch):
    import zsclip.core.safetensors_io as io
    from zsclip.core.checkpoints import load_path

    run = prepare(config_for(world, tmp_path / "c", steps=6, save_every=3))
    run.checkpoint(validate=False)  # step 0
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    state_before = (tmp_path / "c" / "state.safetensors").read_bytes()
    real_bytes, calls = io._raw_bytes, {"n": 0}

    def dies_after_a_few_tensors(tensor):
        calls["n"] += 1
        if calls["n"] == 5:  # some tensors are in the file already: a half-written model
            raise OSError("disk full")
        return real_bytes(tensor)

    monkeypatch.setattr(io, "_raw_bytes", dies_after_a_few_tensors)
    with pytest.raises(OSError):
        run.train()
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "c" / "state.safetensors").read_bytes() == state_before
    monkeypatch.setattr(io, "_raw_bytes", real_bytes)

    # now the model is written whole and the state write dies halfway through its tensors
    model_tensors = len(run.model.state_dict())
    calls["n"] = 0

    def dies_inside_the_state(tensor):
        calls["n"] += 1
        if calls["n"] == model_tensors + 5:
            raise OSError("killed")
        return real_bytes(tensor)

    monkeypatch.setattr(io, "_raw_bytes", dies_inside_the_state)
    with pytest.raises(OSError):
        run.checkpoint(validate=False)
    assert calls["n"] == model_tensors + 5
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != before  # the new model is in
    assert (tmp_path / "c" / "state.safetensors").read_bytes() == state_before
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]
    assert load_path(tmp_path / "c" / "model.safetensors").model is not None
    monkeypatch.undo()
    resumed = train(config_for(world, tmp_path / "c"), resume=True)  # the older state still resumes
    assert resumed.step == 6


def test_nan_loss_stops_with_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    import zsclip.train.accumulate as job  # the training step's loss (one call per step without --accum-steps)

    real_loss, calls = job.local_rows_loss, {"n": 0}

    def loss_goes_nan(*args, **kwargs):
        calls["n"] += 1
        value = real_loss(*args, **kwargs)
        return value * math.nan if calls["n"] == 5 else value

    monkeypatch.setattr(job, "local_rows_loss", loss_goes_nan)
    with pytest.raises(TrainingDiverged, match="step 5") as err:
        train(config_for(world, tmp_path / "n", steps=8, save_every=2))
    assert "step 4" in str(err.value) and err.value.exit_code == 1
    from safetensors import safe_open

    with safe_open(tmp_path / "n" / "model.safetensors", "pt") as handle:
        assert handle.metadata()["step"] == "4"
        assert all(torch.isfinite(handle.get_tensor(k)).all() for k in handle.keys())


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (35, 55, 215),
    "yellow": (235, 215, 0),
}
TEMPLATES = "a {} picture\na picture that is {}.\n"  # the first is the captions' own phrasing


@pytest.fixture(scope="module")
def colour_world(tmp_path_factory) -> Path:
    return colour_world_at(tmp_path_factory.mktemp("colours"))


def colour_world_at(root: Path) -> Path:
    """48 noisy flat-colour images, 12 per colour, captioned 'a red picture': a task the tiny preset
    learns in about 40 steps (the loss falls from ln 8 towards ln 2, the floor when each batch of 8
    holds about two images of each colour)."""
    import random

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(48):
        colour = list(COLOURS)[i % 4]
        (root / "images" / colour).mkdir(parents=True, exist_ok=True)
        pixel = tuple(min(255, max(0, v + rng.randint(-30, 30))) for v in COLOURS[colour])
        Image.new("RGB", (32, 32), pixel).save(root / "images" / colour / f"{i:02d}.png")
        rows.append(f"images/{colour}/{i:02d}.png\ta {colour} picture")
    (root / "pairs.tsv").write_text("\n".join(rows) + "\n")
    (root / "templates.txt").write_text(TEMPLATES)
    return root


def colour_config(root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(steps=40, lr=1e-3, warmup=2, save_every=40, log_every=1)
    return config_for(root, out, **{"data": str(root / "pairs.tsv"), **base, **overrides})


def hand_scores(model_path: Path, image: Path, labels: list[str]) -> torch.Tensor:
    """classify's scores computed here from the pieces: each template filled with each label, prompt
    embeddings normalised, averaged per label and renormalised; softmax of exp(logit_scale) x cosine."""
    import torch.nn.functional as F

    from zsclip.core.checkpoints import load_path
    from zsclip.core.transform import load_image, to_tensor

    loaded = load_path(model_path)
    model, context = loaded.model, loaded.model.config.text.context_length
    templates = [line for line in TEMPLATES.splitlines() if line]
    with torch.no_grad():
        columns = []
        for label in labels:
            tokens = loaded.tokenizer([t.format(label) for t in templates], context_length=context)
            prompts = F.normalize(model.encode_text(tokens), dim=-1)  # [T, D]
            columns.append(F.normalize(prompts.mean(0), dim=0))
        classifier = torch.stack(columns, dim=1)  # [D, C]
        pixels = to_tensor(load_image(image), loaded.preprocess)[None]  # [1, 3, S, S]
        features = F.normalize(model.encode_image(pixels), dim=-1)  # [1, D]
        return (model.logit_scale.exp().clamp(max=100) * features @ classifier).softmax(-1)[0]


def test_train_tiny_then_classify(colour_world, tmp_path):
    """A trained model classifies its training images by colour, through classify, with the scores a
    hand computation gives from the saved file; validation at the checkpoint measured the same."""
    from cli_helpers import run_cli

    result = train(
        colour_config(
            colour_world,
            tmp_path / "e2e",
            val=str(colour_world / "pairs.tsv"),
            zeroshot_dir=str(colour_world / "images"),
            templates=str(colour_world / "templates.txt"),
        )
    )
    assert set(result.validation) >= {"image_to_text_R@1", "text_to_image_R@10", "zeroshot_top1"}
    assert result.validation["zeroshot_top1"] >= 0.8  # chance: 0.25
    model = tmp_path / "e2e" / "model.safetensors"
    labels = list(COLOURS)
    run = run_cli(
        [
            "classify",
            str(colour_world / "images"),
            "--labels",
            ",".join(labels),
            "--templates",
            str(colour_world / "templates.txt"),
            "--model",
            str(model),
            "--format",
            "jsonl",
            "--no-cache",
        ]
    )
    assert run.code == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 48
    right = sum(Path(row["path"]).parent.name == row["label"] for row in rows)
    assert right >= 40, right  # chance: 12
    for row in rows[::8]:
        want = hand_scores(model, Path(row["path"]), labels)
        got = {entry["label"]: entry["score"] for entry in row["top"]}
        # the CLI rounds scores to 6 decimals; the rest is float32 summation order
        assert [got[label] for label in labels] == pytest.approx(want.tolist(), abs=1e-5)


def test_report_page_draws_every_chart():
    from zsclip.train.report import render_report, svg_chart

    records = [{"event": "config", "config": {"lr": 0.001}}]
    records += [
        {
            "event": "train",
            "step": s,
            "loss": 3 - s / 10,
            "lr": 1e-3,
            "logit_scale": 14 + s,
            "images_per_s": 100.0,
            "epoch": 0,
        }
        for s in range(1, 6)
    ]
    records += [{"event": "val", "step": 5, "image_to_text_R@1": 0.5, "zeroshot_top1": 0.25}]
    page = render_report(records)
    assert page.count("<svg") == 4 and page.count("<polyline") == 5
    assert "zeroshot_top1" in page and "&quot;lr&quot;" in page
    assert "no data yet" in svg_chart("empty", {"x": []})
    assert "<polyline" in svg_chart("one point", {"x": [(1.0, 2.0)]})


def test_long_captions_are_counted_in_one_warning(world, tmp_path):
    rows = (world / "train.tsv").read_text().splitlines()
    long_caption = " ".join(["red"] * 100)
    rows[1] = rows[1].split("\t")[0] + "\t" + long_caption
    rows[2] = rows[2].split("\t")[0] + "\t" + long_caption
    (world / "long.tsv").write_text("\n".join(rows) + "\n")
    warnings: list[str] = []
    prepare(
        config_for(world, tmp_path / "l", data=str(world / "long.tsv")),
        hooks=Hooks(warn=warnings.append),
    )
    assert len(warnings) == 1 and warnings[0].startswith("2 of 48 captions")


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(world, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sig"
    args = [
        sys.executable,
        "-m",
        "zsclip",
        "train",
        "--data",
        str(world / "train.tsv"),
        "--output",
        str(out),
        "--model",
        "tiny",
        "--vocab-size",
        "600",
        "--batch-size",
        "8",
        "--steps",
        "200",
        "--save-every",
        "1000",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)

    def logged() -> int:
        path = out / "log.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    deadline = time.time() + 60
    while time.time() < deadline and logged() < 4:  # the config line and a few steps
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert 0 < load_state(out)["step"] < 200
    with_resume = subprocess.run(
        [*args, "--resume"], capture_output=True, text=True, env=env, timeout=120
    )
    assert with_resume.returncode == 0, with_resume.stderr
    assert load_state(out)["step"] == 200


def test_fine_tune_a_checkpoint_keeps_its_tokenizer_and_templates(world, tmp_path):
    from safetensors import safe_open

    train(config_for(world, tmp_path / "base", steps=2, templates="shapes"))
    base = tmp_path / "base" / "model.safetensors"
    with pytest.raises(UserError, match="--vocab-size"):
        prepare(config_for(world, tmp_path / "ft", model=str(base)))
    result = train(config_for(world, tmp_path / "ft", model=str(base), vocab_size=None, steps=2))
    assert result.step == 2
    with safe_open(base, "pt") as a, safe_open(tmp_path / "ft" / "model.safetensors", "pt") as b:
        assert a.metadata()["tokenizer.merges"] == b.metadata()["tokenizer.merges"]
        assert b.metadata()["templates"] == "shapes" and "fine_tuned_from" in b.metadata()
        assert not torch.equal(
            a.get_tensor("text_projection"), b.get_tensor("text_projection")
        )  # it trained
