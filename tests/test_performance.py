"""The speed-ups keep their promises: draft decoding is on by default and close, --exact-preprocess is the
reference, text batching is exact, `zsclip --help` imports nothing heavy, and loading maps the weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import build_tiny_checkpoint, run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("perf-model"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 640x480 JPEG with detail: the tiny model's 32-px input lets the decoder scale it by 1/8."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(0, 640, 23):
        draw.line((i, 0, 640 - i, 480), fill=(i % 256, 90, 200), width=3)
    path = tmp_path_factory.mktemp("perf-photo") / "photo.jpg"
    image.save(path, quality=92)
    return path


def embed(model: Path, photo: Path, *extra: str) -> torch.Tensor:
    run = run_cli(["embed", str(photo), "--model", str(model), "-f", "jsonl", "--no-cache", *extra])
    assert run.code == 0, run.stderr
    return torch.tensor(json.loads(run.stdout)["embedding"])


def test_draft_decoding_is_the_default_and_exact_preprocess_turns_it_off(
    model: Path, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zsclip.core.transform

    drafts: list[int | None] = []
    load_image = zsclip.core.transform.load_image

    def spy(path, *, draft_size=None, **kwargs):
        drafts.append(draft_size)
        return load_image(path, draft_size=draft_size, **kwargs)

    monkeypatch.setattr(zsclip.core.transform, "load_image", spy)
    drafted = embed(model, photo)
    exact = embed(model, photo, "--exact-preprocess")
    assert drafts == [48, None]  # 1.5 x the tiny model's 32 px, then the full-size decode
    assert float(drafted @ exact) > 0.99


def test_exact_preprocess_matches_the_reference_pipeline(model: Path, photo: Path) -> None:
    from zsclip.core.checkpoints import load_model
    from zsclip.core.transform import load_image, to_tensor

    loaded = load_model(model)
    with torch.inference_mode():
        reference = loaded.model.encode_image(
            to_tensor(load_image(photo), loaded.preprocess)[None]
        )[0]
    reference = torch.nn.functional.normalize(reference, dim=-1)
    assert (embed(model, photo, "--exact-preprocess") - reference).abs().max() < 1e-5


def test_text_passes_equal_one_text_at_a_time(model: Path) -> None:
    from zsclip.core.checkpoints import load_model
    from zsclip.jobs.zeroshot import encode_texts

    loaded = load_model(model)
    texts = [
        "a cat",
        "a photo of a small dog on a sofa in the evening light",
        "dog",
        "a jazz album cover",
        "a photo of a red circle",
        "a",
    ]
    together = encode_texts(
        loaded.model, loaded.tokenizer, texts, device=torch.device("cpu"), token_budget=12
    )
    alone = torch.cat(
        [
            encode_texts(loaded.model, loaded.tokenizer, [t], device=torch.device("cpu"))
            for t in texts
        ]
    )
    assert together.shape == (6, loaded.model.config.embed_dim)
    assert (together - alone).abs().max() < 1e-5  # same rows, same (input) order


def test_help_imports_nothing_heavy() -> None:
    code = textwrap.dedent("""
        import sys, io, contextlib
        sys.argv = ["zsclip", "--help"]
        from zsclip.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
            except SystemExit:
                pass
        heavy = ("torch", "PIL", "rich", "numpy", "safetensors", "zsclip.core.catalogue", "http.client", "ssl")
        print(sorted(name for name in heavy if name in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_download_progress_is_still_installed_for_commands(model: Path) -> None:
    from zsclip.core import catalogue as hub

    hub.set_progress_factory(None)
    run = run_cli(["models", "--format", "json"])
    assert run.code == 0
    assert hub._default_progress is not None  # installed by the app callback before the command ran


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_the_cpu(model: Path, photo: Path, tmp_path: Path) -> None:
    """Pinned memory, non-blocking copies and the one-batch lag give the CPU's rows, in order."""
    import shutil

    from PIL import Image

    paths = [str(photo)]
    for index, angle in enumerate((90, 180, 270)):
        other = tmp_path / f"turned{index}.png"
        Image.open(photo).rotate(angle, expand=True).save(other)
        paths.append(str(other))
    shutil.copy(photo, tmp_path / "copy.jpg")
    paths.append(str(tmp_path / "copy.jpg"))

    def rows(*extra: str) -> torch.Tensor:
        run = run_cli(
            ["embed", *paths, "--model", str(model), "-f", "jsonl", "--no-cache", "-b", "2", *extra]
        )
        assert run.code == 0, run.stderr
        return torch.tensor([json.loads(line)["embedding"] for line in run.stdout.splitlines()])

    cpu, cuda = rows("--device", "cpu"), rows("--device", "cuda")
    assert cuda.shape == (5, cpu.shape[1])
    assert (cpu - cuda).abs().max() < 1e-4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loading_maps_the_weights_without_copies_or_slow_imports(model: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from zsclip.core.checkpoints import load_model
        loaded = load_model({str(model)!r})
        spans = []
        for line in open("/proc/self/maps"):
            fields = line.split()
            if len(fields) >= 6 and fields[5] == {str(model)!r}:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                spans.append((low, high))
        params = list(loaded.model.parameters())
        mapped = sum(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in params)
        print(mapped, len(params), "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped, total, dynamo = out.stdout.split()
    assert int(mapped) == int(total) > 0  # every parameter lives in the file's memory map
    assert dynamo == "False"  # building the module did not pull in torch._dynamo (~1.7 s)
