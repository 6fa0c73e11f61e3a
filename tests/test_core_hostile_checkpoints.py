"""Hostile checkpoints: each costs one UserError line (exit 2 from the CLI), nothing in them runs,
and nothing they merely claim is allocated or built.

Zip archives (torch.save and TorchScript): bombs, members whose size differs from what data.pkl
declares, names outside the archive. zsclip headers and foreign configs that lie about the model:
checked field by field against the tensors before the model is built. Files that are no checkpoint
at all: said so, with the formats zsclip reads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoint_files import Formats, build_formats, hf_state_dict
from cli_helpers import make_image, run_cli

from zsclip.core import checkpoints
from zsclip.core.checkpoints import load_path
from zsclip.core.safetensors_io import read_metadata, write_safetensors
from zsclip.core.torch_files import read_torch_file
from zsclip.errors import UserError


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> Formats:
    return build_formats(tmp_path_factory.mktemp("formats"))


def _refused(path: Path, match: str) -> str:
    """The one-line UserError that loading `path` raises; `match` is searched after the path (test
    folders are named after the tests, whose names share words with the messages)."""
    with pytest.raises(UserError) as info:
        load_path(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    said = message[len(str(path)) :] if message.startswith(str(path)) else message
    assert re.search(match, said), message
    return message


def _rezip(
    src: Path,
    dst: Path,
    replace: dict[str, tuple[bytes, int]] | None = None,
    *,
    compress: int | None = None,
) -> Path:
    """Copy a zip archive member by member, replacing some (name -> (bytes, compression))."""
    replace = replace or {}
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data, method = replace.get(info.filename, (old.read(info), compress))
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.compress_type = info.compress_type if method is None else method
            new.writestr(entry, data)
    return dst


def _member(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith(suffix))


# ----------------------------------------------------------------------------------------- archives


@pytest.mark.parametrize("kind", ["torchscript", "openai"])
def test_zip_bomb_is_refused_before_anything_is_decompressed(formats, tmp_path, kind):
    src = getattr(formats, kind)
    bomb = _rezip(src, tmp_path / "bomb.pt", {_member(src, "data/0"): (bytes(64 << 20), 8)})
    assert bomb.stat().st_size < 2 << 20  # 64 MiB of zeros in well under 2 MiB
    tracemalloc.start()
    try:
        _refused(bomb, "zip bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated while refusing the bomb"


def test_member_must_hold_exactly_what_data_pkl_declares(formats, tmp_path):
    name = _member(formats.torchscript, "data/0")
    with zipfile.ZipFile(formats.torchscript) as archive:
        data = archive.read(name)
    for label, changed in (("longer", data + bytes(4)), ("shorter", data[:-4])):
        bad = _rezip(formats.torchscript, tmp_path / f"{label}.pt", {name: (changed, 0)})
        _refused(bad, "declares")


def test_stored_members_are_memory_mapped_not_read(formats):
    total = sum(t.numel() * t.element_size() for t in formats.state_dict.values())
    tracemalloc.start()
    try:
        tensors = read_torch_file(formats.torchscript)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 4, f"{peak:,} bytes allocated to read {total:,} bytes of weights"
    for key, tensor in formats.state_dict.items():
        assert torch.equal(tensors[key], tensor), key


@pytest.mark.parametrize("kind", ["torchscript", "openai"])
def test_a_rezipped_archive_with_compressed_members_loads_the_same(formats, tmp_path, kind):
    # torch.load maps stored members straight from the file; read that way, deflated ones are noise.
    rezipped = _rezip(getattr(formats, kind), tmp_path / "model.pt", compress=8)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((getattr(formats, kind).parent / name).read_bytes())
    loaded = load_path(rezipped).model.state_dict()
    for key, tensor in formats.state_dict.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", ["../../model/data/0", "/etc/passwd", "model/../../x", "C:/x"])
def test_member_names_outside_the_archive_are_refused(formats, tmp_path, name):
    bad = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _rezip(formats.torchscript, bad)
        with zipfile.ZipFile(bad, "a") as archive:
            archive.writestr(name, b"x")
    _refused(bad, "named outside it")


def test_a_member_named_twice_is_refused(formats, tmp_path):
    bad = _rezip(formats.openai, tmp_path / "model.pt")
    with warnings.catch_warnings():  # zipfile warns about the duplicate it is asked to write
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(bad, "a") as archive:
            archive.writestr(_member(bad, "data/0"), b"\x00" * 16)
    _refused(bad, "holds .* twice")


def test_a_pickle_memo_index_cannot_claim_memory(formats, tmp_path):
    # The C unpickler sizes its memo array by the largest index a PUT names: five bytes of data.pkl
    # (found by the fuzz test) asked for 12 GB. Here: push None, memo it at index 2^27, pop.
    name = _member(formats.torchscript, "data.pkl")
    with zipfile.ZipFile(formats.torchscript) as archive:
        data = archive.read(name)
    assert data[:2] == b"\x80\x02"
    bomb = data[:2] + b"Nr" + (1 << 27).to_bytes(4, "little") + b"0" + data[2:]
    model = tmp_path / "model.pt"
    _rezip(formats.torchscript, model, {name: (bomb, 0)})
    script = (
        "import os, resource, sys, torch; from pathlib import Path; "
        "from zsclip.core.torch_files import read_torch_file; "
        "t = read_torch_file(Path(sys.argv[1])); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(t))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(model)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-500:]
    peak, count = map(int, result.stdout.split())
    assert count == len(formats.state_dict)
    assert peak < 1 << 30, f"peak RSS {peak:,} bytes"  # 2^27 slots of 8 bytes would be 1 GiB+


def test_a_zip_version_python_cannot_read_is_one_line(formats, tmp_path):
    bad = tmp_path / "model.pt"
    with zipfile.ZipFile(formats.openai) as old, zipfile.ZipFile(bad, "w") as new:
        for info in old.infolist():
            entry = zipfile.ZipInfo(info.filename)
            entry.extract_version = 64  # "zip file version 6.4": zipfile raises NotImplementedError
            new.writestr(entry, old.read(info))
    _refused(bad, "damaged zip archive")


class _Payload:
    """Unpickling this would create a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torchscript_whose_data_pkl_would_run_code_is_refused(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "evil.pt"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    message = _refused(bad, "refusing to load")
    assert "asks for" in message and "nothing was run" in message
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ configs


def _rewrite_zsclip(formats: Formats, dst: Path, edit_config=None, **header: str) -> Path:
    from safetensors.torch import load_file

    metadata = read_metadata(formats.zsclip)
    if edit_config is not None:
        config = json.loads(metadata["config"])
        edit_config(config)
        metadata["config"] = json.dumps(config)
    metadata.update(header)
    write_safetensors(dst, load_file(formats.zsclip), metadata)
    return dst


def _set(path: str, value):
    def edit(config: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            config = config[key]
        if value is _DELETE:
            del config[last]
        else:
            config[last] = value

    return edit


_DELETE = object()


@pytest.fixture()
def never_built(monkeypatch):
    """Fails the test if a model is built: every lie must be caught from the header alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(checkpoints, "CLIP", refuse)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("text.layers", 100_000), r"text\.layers is 100000 but the weights hold 2 blocks"),
        (_set("vision.layers", 0), r"vision\.layers must be a positive integer"),
        (_set("vision.width", 10**9), r"vision\.width does not match the weights"),
        (_set("vision.width", 1e9), r"vision\.width must be a positive integer"),
        (_set("text.heads", 0), r"text\.heads must be a positive integer"),
        (_set("text.heads", 3), r"text\.heads \(3\) must divide text\.width"),
        (_set("text.vocab_size", 2048), r"text\.vocab_size does not match"),
        (_set("text.mlp_ratio", float("inf")), r"text\.mlp_ratio must be a positive number"),
        (_set("vision.patch_size", 16), r"vision\.patch_size does not match"),
        (_set("vision.kind", "resnet"), r"vision\.layers must list 4 stage depths"),
        (_set("vision.stem", "conv"), r"vision\.stem is 'conv' but the weights have a patch stem"),
        (_set("embed_dim", _DELETE), r"lacks field embed_dim"),
        (_set("text.width", _DELETE), r"lacks field text\.width"),
        (_set("vision.colour", 3), r"unknown config field vision\.colour"),
        (_set("quick_gelu", "yes"), r"quick_gelu must be true or false"),
    ],
)
def test_a_lying_config_is_named_before_the_model_is_built(
    formats, tmp_path, never_built, edit, match
):
    _refused(_rewrite_zsclip(formats, tmp_path / "lie.safetensors", edit), match)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"config": "[]"}, "must be a JSON object"),
        ({"config": "{"}, "'config' entry is not valid JSON"),
        ({"config": "[" * 100_000 + "]" * 100_000}, "'config' entry is not valid JSON"),
        ({"tokenizer.vocab": "[" * 100_000}, r"tokenizer\.vocab must be a JSON object"),
        ({"preprocess": '{"image_size": 64}'}, r"preprocess field image_size \(64\) differs"),
        ({"preprocess": '{"image_size": 32, "std": [0, 1, 1]}'}, "bad preprocess field"),
        ({"preprocess": '{"image_size": 32, "mean": [NaN, 0, 0]}'}, "must be finite"),
        ({"preprocess": '{"image_size": 32, "interpolation": "magic"}'}, "interpolation"),
        ({"preprocess": "[32]"}, "preprocess entry must be a JSON object"),
        ({"tokenizer.context_length": "many"}, r"tokenizer\.context_length must be an integer"),
        ({"tokenizer.context_length": "1"}, r"tokenizer\.context_length must be an integer of at"),
        ({"tokenizer.vocab": "[1, 2]"}, r"tokenizer\.vocab must be a JSON object"),
        ({"tokenizer.vocab": '{"a": true}'}, r"tokenizer\.vocab must be a JSON object"),
    ],
)
def test_bad_preprocess_and_tokenizer_fields_are_named(
    formats, tmp_path, never_built, header, match
):
    _refused(_rewrite_zsclip(formats, tmp_path / "lie.safetensors", **header), match)


def test_a_context_length_beyond_the_model_is_cut_to_it(formats, tmp_path):
    # zsclip itself saves tokenizers at the default 77 beside models of fewer positions.
    stated = {"tokenizer.context_length": "500"}
    path = _rewrite_zsclip(formats, tmp_path / "long.safetensors", **stated)
    loaded = load_path(path)
    assert loaded.tokenizer.context_length == loaded.model.config.text.context_length == 77
    long_text = " ".join(["circle"] * 600)
    with torch.no_grad():
        assert loaded.model.encode_text(loaded.tokenizer([long_text])).shape == (1, 32)


def test_weights_of_an_integer_dtype_are_refused(formats, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(formats.zsclip)
    tensors["ln_final.weight"] = tensors["ln_final.weight"].to(torch.int32)
    bad = tmp_path / "ints.safetensors"
    write_safetensors(bad, tensors, read_metadata(formats.zsclip))
    _refused(bad, r"ln_final\.weight has dtype torch\.int32")


def _hf_folder(formats: Formats, dst: Path, edit=None, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    config = json.loads((formats.huggingface / "config.json").read_text())
    if edit is not None:
        edit(config)
    dst.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((formats.huggingface / name).read_bytes())
    (dst / "config.json").write_text(json.dumps(config))
    save_file(
        {**hf_state_dict(formats.state_dict, 2, 2), **(extra or {})}, dst / "model.safetensors"
    )
    return dst


def test_hf_config_that_declares_fewer_layers_than_the_weights_hold(formats, tmp_path):
    # Before: the second layer was dropped silently and the model gave different embeddings.
    folder = _hf_folder(formats, tmp_path / "hf", _set("text_config.num_hidden_layers", 1))
    _refused(folder, r"text_config\.num_hidden_layers is 1 but the weights hold 2 layers")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("text_config.vocab_size", 2048), r"config\.json text_config\.vocab_size does not"),
        (_set("vision_config.hidden_size", "64"), r"hidden_size must be a positive integer"),
        (_set("vision_config.num_attention_heads", 0), r"num_attention_heads must be a positive"),
        (_set("projection_dim", 33), r"config\.json projection_dim does not match"),
        (_set("text_config", [1]), r"text_config must be a JSON object"),
        (_set("model_type", "bert"), "not a CLIP model"),
    ],
)
def test_a_lying_hf_config_is_named(formats, tmp_path, never_built, edit, match):
    _refused(_hf_folder(formats, tmp_path / "hf", edit), match)


def test_an_hf_config_nested_deeper_than_python_goes_is_one_line(formats, tmp_path):
    folder = _hf_folder(formats, tmp_path / "hf")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(folder, "not a readable JSON file")
    (folder / "config.json").write_text((formats.huggingface / "config.json").read_text())
    (folder / "vocab.json").write_text("[" * 100_000)  # the vocabulary beside it, too
    _refused(folder, "vocab.json is not valid JSON")


def test_unused_weights_in_a_foreign_checkpoint_are_an_error(formats, tmp_path):
    extra = {"text_model.encoder.adapter.weight": torch.zeros(4)}
    _refused(_hf_folder(formats, tmp_path / "hf", extra=extra), "does not use.*adapter")
    sd = {**formats.state_dict, "visual.adapter.weight": torch.zeros(4)}
    openai = tmp_path / "openai"
    openai.mkdir()
    torch.save(sd, openai / "model.pt")
    _refused(openai / "model.pt", r"does not use, e\.g\. 'visual\.adapter\.weight'")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("[1]", "must hold a JSON object, not a list"),
        ("{", "not a readable JSON file"),
        ('{"model_cfg": {"text_cfg": {"heads": 0}}}', r"text_cfg\.heads must be a positive"),
        ('{"model_cfg": {"text_cfg": {"heads": 3}}}', r"json text_cfg\.heads \(3\) must divide"),
        ('{"model_cfg": {"quick_gelu": "yes"}}', r"quick_gelu must be true or false"),
        ('{"preprocess_cfg": {"std": [0, 1, 1]}}', "bad preprocess field"),
    ],
)
def test_a_bad_open_clip_config_beside_the_weights_is_named(formats, tmp_path, config, match):
    torch.save({"epoch": 1, "state_dict": formats.state_dict}, tmp_path / "epoch_1.pt")
    (tmp_path / "open_clip_config.json").write_text(config)
    _refused(tmp_path / "epoch_1.pt", match)


def test_openai_state_dict_missing_a_tensor_the_architecture_is_read_from(formats, tmp_path):
    sd = {k: v for k, v in formats.state_dict.items() if k != "visual.conv1.weight"}
    torch.save(sd, tmp_path / "model.pt")
    _refused(tmp_path / "model.pt", r"lacks 'visual\.conv1\.weight'")


def test_the_files_these_tests_damage_load_intact(formats):
    # Every refusal above must come from the damage, not from a fixture that never loaded.
    for path in (formats.zsclip, formats.openai, formats.torchscript, formats.huggingface):
        loaded = load_path(path).model.state_dict()
        for key, tensor in formats.state_dict.items():
            assert torch.equal(loaded[key], tensor), (path, key)


# -------------------------------------------------------------------------------------------- not a
# checkpoint at all


def _not_checkpoints(tmp_path: Path, formats: Formats) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the one line must say)."""
    cases: dict[str, tuple[Path, str]] = {}

    def file(name: str, data: bytes, match: str) -> None:
        (tmp_path / name).write_bytes(data)
        cases[name] = (tmp_path / name, match)

    file("empty.pt", b"", "not a checkpoint (it is empty)")
    file("notes.pt", b"weights: see the wiki\n", "it looks like a text file")
    file("random.bin", bytes(range(256)) * 16, "its bytes match no format")
    jpeg = make_image(tmp_path / "photo.jpg", fmt="JPEG")
    file("photo.pt", jpeg.read_bytes(), "it looks like a JPEG image")
    file("truncated.pt", formats.openai.read_bytes()[:5000], "damaged zip archive")
    (tmp_path / "hf_bad_json").mkdir()
    (tmp_path / "hf_bad_json" / "config.json").write_text("{not json")
    cases["hf_bad_json"] = (tmp_path / "hf_bad_json", "not a readable JSON file")
    (tmp_path / "hf_list").mkdir()
    (tmp_path / "hf_list" / "config.json").write_text("[1, 2]")
    cases["hf_list"] = (tmp_path / "hf_list", "must hold a JSON object, not a list")
    cases["devnull"] = (Path(os.devnull), "not a regular file")
    return cases


CASES = [
    "empty.pt",
    "notes.pt",
    "random.bin",
    "photo.pt",
    "truncated.pt",
    "hf_bad_json",
    "hf_list",
    "devnull",
]


@pytest.mark.parametrize("case", CASES)
def test_what_is_no_checkpoint_is_said_in_one_line(formats, tmp_path, case):
    path, match = _not_checkpoints(tmp_path, formats)[case]
    _refused(path, match.replace("(", r"\(").replace(")", r"\)"))
    images = tmp_path / "images"
    make_image(images / "a.png")
    result = run_cli(["classify", str(images), "--labels", "a,b", "--model", str(path)])
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("zsclip: error: ")
    assert result.stdout == ""
