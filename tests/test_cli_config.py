"""`zsclip config` and the settings file: set/show/unset, which model wins (--model > $ZSCLIP_MODEL >
settings file > built-in), damaged files, and errors that name where a bad model name came from.

conftest.py gives every test its own empty $XDG_CONFIG_HOME and no $ZSCLIP_MODEL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, run_cli

from zsclip.config import config_path, default_model, read_settings

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "weights" / "zsclip-shapes.safetensors"
FIX = 'fix it (a JSON object such as {"model": "ViT-B/32"}) or delete it'


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config-models")
    image = make_image(root / "x.png")
    return {
        "a": build_tiny_checkpoint(root, "a.safetensors"),
        "b": build_tiny_checkpoint(root, "b.safetensors"),
        "image": image,
    }


def settings_file() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "zsclip" / "config.json"


def test_the_file_lives_in_the_user_config_folder(monkeypatch, tmp_path: Path) -> None:
    assert config_path() == settings_file()
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == tmp_path / ".config" / "zsclip" / "config.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec: ignore relative paths
    assert config_path() == tmp_path / ".config" / "zsclip" / "config.json"
    assert run_cli(["config", "path"]).stdout == f"{tmp_path}/.config/zsclip/config.json\n"


def test_set_show_unset_round_trip() -> None:
    empty = run_cli(["config", "show"])
    assert empty.code == 0 and empty.stdout == ""
    assert f"no settings file yet ({settings_file()})" in empty.stderr
    assert "commands use the built-in model zsclip-shapes" in empty.stderr

    result = run_cli(["config", "set", "model", "vit-b-32"])  # stored as `zsclip models` lists it
    assert result.code == 0, result.stderr
    assert json.loads(settings_file().read_text()) == {"model": "ViT-B/32"}
    assert result.stderr.splitlines()[0] == f"zsclip: model = ViT-B/32 (in {settings_file()})"
    assert "ViT-B/32 (338 MiB) is downloaded on first use" in result.stderr
    assert [p.name for p in settings_file().parent.iterdir()] == ["config.json"]  # no temporaries

    shown = run_cli(["config", "show"])
    assert shown.stdout == "model = ViT-B/32\n"
    assert f"commands use ViT-B/32 (from {settings_file()})" in shown.stderr

    assert run_cli(["config", "unset", "model"]).code == 0
    assert read_settings() == {} and run_cli(["config", "show"]).stdout == ""
    again = run_cli(["config", "unset", "model"])
    assert again.code == 0 and "model is not set" in again.stderr


def test_a_path_is_stored_absolute(models: dict, monkeypatch) -> None:
    monkeypatch.chdir(models["a"].parent)
    assert run_cli(["config", "set", "model", "a.safetensors"]).code == 0
    assert read_settings() == {"model": str(models["a"])}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("device", "cpu", "unknown setting 'device'; the settings are: model (the model used "),
        ("model", "nosuch", "no model or file named 'nosuch'; see `zsclip models` for names"),
        ("model", "tiny", "'tiny' names an architecture without trained weights here"),
        ("model", "vocab", "'vocab' is the tokenizer's vocabulary, not a model"),
        ("model", "hf:no-slash", "hf:no-slash is not hf:ORG/NAME"),
        ("model", " ", "the model must not be empty; to go back to the built-in model run"),
    ],
)
def test_bad_settings_are_refused_and_nothing_is_written(
    key: str, value: str, message: str
) -> None:
    result = run_cli(["config", "set", key, value])
    assert result.code == 2 and result.stderr.startswith(f"zsclip: error: {message}")
    assert len(result.stderr.splitlines()) == 1 and not settings_file().exists()


def test_precedence_model_option_then_variable_then_file_then_builtin(
    models: dict, monkeypatch
) -> None:
    from zsclip.core.checkpoints import load_model, resolve_spec

    assert resolve_spec(None) == BUILTIN and default_model() is None
    settings_file().parent.mkdir(parents=True)
    settings_file().write_text(json.dumps({"model": str(models["a"])}))
    assert resolve_spec(None) == models["a"]
    assert load_model(None).name == str(models["a"])  # named as the setting says
    monkeypatch.setenv("ZSCLIP_MODEL", str(models["b"]))
    assert resolve_spec(None) == models["b"]
    assert resolve_spec(str(BUILTIN)) == BUILTIN  # an explicit --model wins over both


def test_classify_uses_the_settings_model(models: dict) -> None:
    command = ["classify", str(models["image"]), "-t", "simple", "--no-cache"]
    command += ["-l", "red circle,blue star"]
    builtin = run_cli(command)
    assert "using the built-in model zsclip-shapes" in builtin.stderr
    assert run_cli(["config", "set", "model", str(models["a"])]).code == 0
    chosen = run_cli(command)
    assert chosen.code == 0 and chosen.stderr == ""  # not the built-in model: nothing to announce
    explicit = run_cli([*command, "--model", str(models["a"])])
    assert json.loads(chosen.stdout) == json.loads(explicit.stdout) != json.loads(builtin.stdout)


def test_a_bad_model_name_names_its_source(monkeypatch) -> None:
    command = ["classify", str(REPO / "examples" / "red-heart.png"), "-l", "red heart,blue star"]
    settings_file().parent.mkdir(parents=True)
    settings_file().write_text('{"model": "nosuch"}\n')
    from_file = run_cli(command)
    assert from_file.code == 2 and from_file.stdout == ""
    assert from_file.stderr == (
        f"zsclip: error: model 'nosuch' from {settings_file()}: no model or file named 'nosuch'; see "
        "`zsclip models` for names, or pass a checkpoint path (or change it: `zsclip config set "
        "model NAME`, `zsclip config unset model`)\n"
    )
    monkeypatch.setenv("ZSCLIP_MODEL", "nosuch2")
    from_env = run_cli(command)
    assert from_env.code == 2 and from_env.stderr == (
        "zsclip: error: ZSCLIP_MODEL=nosuch2: no model or file named 'nosuch2'; see `zsclip models` "
        "for names, or pass a checkpoint path (or unset ZSCLIP_MODEL)\n"
    )
    explicit = run_cli([*command, "--model", "nosuch3"])  # typed by the user: no source to name
    assert explicit.stderr.startswith("zsclip: error: no model or file named 'nosuch3'")


def test_a_damaged_model_file_from_the_settings_names_its_source(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert run_cli(["config", "set", "model", str(broken)]).code == 0
    result = run_cli(["embed", "--text", "a red circle"])
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"zsclip: error: model '{broken}' from {settings_file()}: ")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"model": ', "is not valid JSON (Expecting value, line 1)"),
        (b"[1, 2]", "holds no JSON object"),
        (b'{"model": 3}', "has a 'model' that is not a non-empty string"),
        (b'{"model": ""}', "has a 'model' that is not a non-empty string"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[" * 100_000, "is larger than 64 KiB, too large for a settings file"),
        (b"[" * 20_000, "is nested too deeply"),
    ],
)
def test_a_damaged_settings_file_is_one_line_naming_it_and_the_fix(
    content: bytes, reason: str, models: dict
) -> None:
    settings_file().parent.mkdir(parents=True)
    settings_file().write_bytes(content)
    expected = f"zsclip: error: settings file {settings_file()} {reason}; {FIX}\n"
    for command in (
        ["config", "show"],
        ["config", "set", "model", "ViT-B/32"],
        ["embed", "--text", "x"],
    ):
        result = run_cli(command)
        assert (result.code, result.stdout, result.stderr) == (2, "", expected), command
    assert settings_file().read_bytes() == content  # never overwritten
    with_model = run_cli(["embed", "--text", "x", "--model", str(models["a"])])
    assert with_model.code == 0  # --model never reads the file


def test_unknown_keys_are_kept_and_reported(monkeypatch, tmp_path: Path) -> None:
    settings_file().parent.mkdir(parents=True)
    settings_file().write_text('{"future": {"x": 1}, "model": "RN50"}')
    assert run_cli(["config", "set", "model", "RN101"]).code == 0
    assert json.loads(settings_file().read_text()) == {"future": {"x": 1}, "model": "RN101"}
    shown = run_cli(["config", "show"])
    assert shown.stdout == 'future = {"x": 1}\nmodel = RN101\n'
    assert "'future' is not a setting this version reads; it is ignored" in shown.stderr


def test_a_symlinked_settings_file_stays_a_link(tmp_path: Path) -> None:
    dotfiles = tmp_path / "dotfiles" / "zsclip.json"
    dotfiles.parent.mkdir()
    dotfiles.write_text("{}")
    settings_file().parent.mkdir(parents=True)
    settings_file().symlink_to(dotfiles)
    assert run_cli(["config", "set", "model", "ViT-B/16"]).code == 0
    assert settings_file().is_symlink() and json.loads(dotfiles.read_text()) == {
        "model": "ViT-B/16"
    }


def test_the_variable_is_said_to_win_when_setting_the_file(monkeypatch) -> None:
    monkeypatch.setenv("ZSCLIP_MODEL", "RN50")
    result = run_cli(["config", "set", "model", "ViT-B/32"])
    assert result.code == 0
    assert (
        "zsclip: warning: ZSCLIP_MODEL=RN50 is set and wins over the settings file; unset it for the "
        "file's model to apply\n"
    ) in result.stderr
    assert "commands use ZSCLIP_MODEL=RN50 (the variable wins" in run_cli(["config", "show"]).stderr
