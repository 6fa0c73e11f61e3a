"""The Typer-free reading of `classify --server` (zsclip.cli._quick): it reads a command line exactly as
the Typer command would, or leaves it to Typer. Its output against a live server, next to the Typer
command's, is in tests/test_serve.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsclip.cli import _quick
from zsclip.cli._classify_server import ServerClassify

URL = "http://127.0.0.1:9"
# Options that choose or run a model here: the Typer command refuses them with --server (or they
# need their own checks), so the quick path always leaves them to it.
LEFT_TO_TYPER = {
    "model",
    "vocab",
    "other",
    "other_file",
    "embeddings",
    "examples",
    "head",
    "device",
    "precision",
}


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch) -> None:
    for name in ("ZSCLIP_SERVER", "ZSCLIP_VOCAB", "ZSCLIP_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _quick_read(*words: str) -> ServerClassify | None:
    command = _quick.quick_command(list(words))
    return None if command is None else command.__self__


def test_reads_what_the_server_run_needs() -> None:
    read = _quick_read(
        "classify",
        "a.jpg",
        "-l",
        "cat,dog",
        "--server",
        URL,
        "-k3",
        "--format=csv",
        "photos/",
        "--multi-label",
        "--threshold",
        "-0.25",
        "--min-score",
        ".5",
        "-o",
        "out.csv",
        "--report",
        "r.html",
        "-b",
        "8",
        "--exact-preprocess",
        "--xmp",
        "-q",
        "-",
        "-t",
        "simple",
    )
    assert read == ServerClassify(
        server=URL,
        inputs=["a.jpg", "photos/", "-"],
        labels="cat,dog",
        templates="simple",
        top_k=3,
        multi_label=True,
        threshold=-0.25,
        min_score=0.5,
        fmt="csv",
        output=Path("out.csv"),
        report=Path("r.html"),
        batch_size=8,
        exact_preprocess=True,
        xmp=True,
        quiet=True,
    )


def test_last_repeat_wins_and_double_dash_ends_the_options() -> None:
    read = _quick_read(
        "classify", "-L", "a.txt", "-k", "2", "-k", "4", "--server", URL, "--", "-odd.jpg", "-q"
    )
    assert read == ServerClassify(
        server=URL, labels_file=Path("a.txt"), top_k=4, inputs=["-odd.jpg", "-q"]
    )


def test_options_without_meaning_on_the_server_are_accepted_and_ignored() -> None:
    read = _quick_read("classify", "x.jpg", "-l", "a,b", "--server", URL, "-j", "3", "--no-cache")
    assert read == ServerClassify(server=URL, inputs=["x.jpg"], labels="a,b")
    assert _quick_read("classify", "x.jpg", "-l", "a,b", "--server", URL, "--offline", "--cache")


def test_the_server_comes_from_the_environment_too(monkeypatch) -> None:
    assert _quick_read("classify", "x.jpg", "-l", "a,b") is None  # a local run: Typer's
    monkeypatch.setenv("ZSCLIP_SERVER", URL)
    assert _quick_read("classify", "x.jpg", "-l", "a,b").server == URL
    assert _quick_read("classify", "x.jpg", "-l", "a,b", "--server", "http://h:1").server == (
        "http://h:1"
    )
    monkeypatch.setenv("ZSCLIP_SERVER", "")
    assert _quick_read("classify", "x.jpg", "-l", "a,b") is None


@pytest.mark.parametrize(
    "words",
    [
        ["embed", "x.jpg", "--server", URL],  # only classify
        ["--version"],
        ["classify", "--help", "--server", URL],
        ["classify", "-h", "--server", URL],
        ["classify", "x.jpg", "--server", URL, "--model", "ViT-B/32"],
        ["classify", "x.jpg", "--server", URL, "-m", "x"],
        ["classify", "x.jpg", "--server", URL, "--device", "cpu"],
        ["classify", "x.jpg", "--server", URL, "--other", "something else"],
        ["classify", "x.jpg", "--server", URL, "--bogus"],
        ["classify", "x.jpg", "--server", URL, "-qk5"],  # combined short flags
        ["classify", "x.jpg", "--server", URL, "--top-k", "0"],
        ["classify", "x.jpg", "--server", URL, "--top-k", "1.5"],
        ["classify", "x.jpg", "--server", URL, "--top-k", "+3"],
        ["classify", "x.jpg", "--server", URL, "--threshold", "nan"],
        ["classify", "x.jpg", "--server", URL, "--threshold", "1.5"],
        ["classify", "x.jpg", "--server", URL, "--min-score", "-0.1"],
        ["classify", "x.jpg", "--server", URL, "--batch-size", "0"],
        ["classify", "x.jpg", "--server", URL, "--labels"],  # no value
        ["classify", "x.jpg", "--server", URL, "--labels", "-q"],  # an option where a value goes
        ["classify", "x.jpg", "--server", URL, "--labels", ""],
        ["classify", "x.jpg", "--server", URL, "--multi-label=yes"],
        ["classify", "x.jpg", "--server", ""],
        ["classify", "x.jpg", "--server="],
    ],
)
def test_anything_doubtful_is_left_to_typer(words: list[str]) -> None:
    assert _quick.quick_command(words) is None


def test_environment_typer_would_refuse_is_left_to_it(monkeypatch) -> None:
    words = ["classify", "x.jpg", "-l", "a,b", "--server", URL]
    monkeypatch.setenv("ZSCLIP_OFFLINE", "Yes")
    assert _quick.quick_command(words) is not None
    monkeypatch.setenv("ZSCLIP_OFFLINE", "perhaps")  # Typer: not a valid boolean
    assert _quick.quick_command(words) is None
    monkeypatch.delenv("ZSCLIP_OFFLINE")
    monkeypatch.setenv("ZSCLIP_VOCAB", "vocab.txt.gz")  # Typer: --vocab does not apply
    assert _quick.quick_command(words) is None


def _typer_options() -> dict:
    import typer.main

    from zsclip.cli.app import app

    command = typer.main.get_command(app).commands["classify"]
    return {param.name: param for param in command.params if param.param_type_name == "option"}


def test_the_option_table_is_the_typer_commands() -> None:
    """Every quick option is spelt as the Typer command spells it, with the same flag-ness, the same
    bounds and the same default; every Typer option is either read here or left to Typer."""
    typer_options = _typer_options()
    quick = {option.opts: option for option in _quick.OPTIONS}
    ignored = {option.opts for option in _quick.OPTIONS if option.field is None}
    defaults = ServerClassify(server=URL)
    for name, param in typer_options.items():
        if name in LEFT_TO_TYPER:
            assert not set(param.opts + param.secondary_opts) & set(_quick._BY_NAME), name
            continue
        option = quick.get(tuple(param.opts))
        assert option is not None, (
            f"--{name} is neither read by zsclip.cli._quick nor left to Typer"
        )
        assert (option.read is None) == bool(param.is_flag), name
        for secondary in param.secondary_opts:
            assert _quick._BY_NAME[secondary].secondary, secondary
        if option.field is not None:
            assert option.field == name
            if name != "server":  # required here
                assert getattr(defaults, name) == param.default, name
        else:
            assert option.opts in ignored
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        if low is not None:
            assert option.read(str(low)) == low
            assert option.read(str(low - 1)) is None and option.read(str(low - 0.5)) is None
        if high is not None:
            assert option.read(str(high)) == high and option.read(str(high + 0.5)) is None
    spelled = {opt for param in typer_options.values() for opt in param.opts + param.secondary_opts}
    assert set(_quick._BY_NAME) <= spelled


@pytest.mark.parametrize(
    "words",
    [
        ["a.jpg", "-l", "cat,dog", "--server", URL],
        ["-", "photos", "-L", "labels.txt", "-t", "simple", "-k", "007", "--server=" + URL],
        ["a.jpg", "-lcat,dog", "-k3", "-fcsv", "-ob.csv", "--report", "r.html", "--server", URL],
        ["a.jpg", "-l", "a,b", "--multi-label", "--threshold", "-.5", "--min-score", "1.", "-q"],
        ["a.jpg", "-l", "a,b", "--multi-label", "--threshold=00.25", "--min-score", "0", "--xmp"],
        [
            "a.jpg",
            "-l",
            "a,b",
            "--threshold",
            "-0",
            "--multi-label",
            "-b",
            "1",
            "--exact-preprocess",
        ],
        [
            "-l",
            "x,y",
            "-l",
            "z,w",
            "-k",
            "2",
            "-k",
            "9",
            "--no-cache",
            "--cache",
            "-j",
            "0",
            "x.jpg",
        ],
        ["--offline", "--", "-odd.jpg", "--labels", "-q"],
    ],
)
def test_typer_reads_the_same_options(words: list[str], monkeypatch) -> None:
    """Every command line the quick path takes, given to the Typer command itself: the same
    ServerClassify (the Typer command hands its options to the same class)."""
    from zsclip.cli.app import app

    monkeypatch.setenv("ZSCLIP_SERVER", URL)  # where --server is not given
    quick = _quick_read("classify", *words)
    assert quick is not None
    seen: list[ServerClassify] = []
    monkeypatch.setattr(ServerClassify, "run", lambda self: seen.append(self))
    app(args=["classify", *words], standalone_mode=False)
    assert seen == [quick]
