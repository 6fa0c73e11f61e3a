"""INPUT expansion (files, folders, stdin, symlinks), labels and template sets, device/precision checks."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from cli_helpers import make_image, make_photo_folder

from zsclip.errors import UserError
from zsclip.jobs.inputs import InputItem, expand_inputs
from zsclip.jobs.labels import (
    DEFAULT_TEMPLATE_SET,
    available_template_sets,
    load_templates,
    parse_labels_option,
    read_labels_file,
    resolve_labels,
)


def paths(items: list[InputItem]) -> list[str]:
    return [item.path for item in items]


# ------------------------------------------------------------------------------------------------ inputs


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    expected = make_photo_folder(tmp_path / "photos")
    make_image(tmp_path / "photos" / ".hidden_dir" / "x.jpg")
    items = expand_inputs([str(tmp_path / "photos")])
    assert paths(items) == expected
    assert all(item.error is None for item in items)


def test_argument_order_is_kept_and_explicit_files_are_taken_whatever_their_name(
    tmp_path: Path,
) -> None:
    folder = make_photo_folder(tmp_path / "photos")
    odd = make_image(tmp_path / "picture.data", fmt="PNG")
    hidden = make_image(tmp_path / ".hidden.jpg")
    items = expand_inputs([str(odd), str(tmp_path / "photos"), str(hidden)])
    assert paths(items) == [str(odd), *folder, str(hidden)]


def test_stdin_paths_blank_lines_spaces_and_folders(tmp_path: Path) -> None:
    folder = make_photo_folder(tmp_path / "photos")
    spaced = make_image(tmp_path / " lead space.png")
    stdin = io.StringIO(f"{spaced}\n\n{tmp_path / 'photos'}\r\n")
    items = expand_inputs(["-"], stdin)
    assert paths(items) == [str(spaced), *folder]


def test_stdin_dash_only_once() -> None:
    with pytest.raises(UserError):
        expand_inputs(["-", "-"], io.StringIO(""))


def test_no_inputs_is_a_usage_error() -> None:
    with pytest.raises(UserError, match="INPUT"):
        expand_inputs([])


def test_missing_argument_is_a_usage_error_but_a_missing_stdin_path_an_input_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(UserError, match="nope.jpg.*no such file or folder") as info:
        expand_inputs([str(tmp_path / "nope.jpg")])
    assert info.value.exit_code == 2
    items = expand_inputs(["-"], io.StringIO(f"{tmp_path / 'nope.jpg'}\n"))
    assert items == [InputItem(str(tmp_path / "nope.jpg"), "no such file or folder")]


def test_symlinks_followed_without_looping(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_image(root / "a.jpg")
    make_image(tmp_path / "elsewhere" / "far.jpg")
    os.symlink(root, root / "loop")  # a folder link back to its parent
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root / "a.jpg", root / "alias.jpg")
    os.symlink(tmp_path / "gone.jpg", root / "dangling.jpg")
    os.symlink(root / "cycle2.jpg", root / "cycle1.jpg")
    os.symlink(root / "cycle1.jpg", root / "cycle2.jpg")
    items = expand_inputs([str(root)])
    by_path = {Path(item.path).name: item.error for item in items}
    assert by_path["a.jpg"] is None and by_path["alias.jpg"] is None and by_path["far.jpg"] is None
    assert "dangling" in by_path["dangling.jpg"]
    assert "cycle" in by_path["cycle1.jpg"] and "cycle" in by_path["cycle2.jpg"]
    assert sum(Path(item.path).name == "a.jpg" for item in items) == 1  # the loop was not followed


def test_a_tree_deeper_than_the_recursion_limit_is_walked_in_order(tmp_path: Path) -> None:
    """Folders nested past Python's recursion limit (1,200 deep, as a stress test found) are walked
    like any other: depth first, each level sorted, files before and after a subfolder in name order."""
    depth = sys.getrecursionlimit() + 200
    top = tmp_path / "deep"
    current = str(top)
    os.mkdir(current)  # os.makedirs and Path.mkdir(parents=True) recurse themselves
    expected_down, expected_up = [], []
    try:
        for level in range(depth):
            if level in (0, depth // 2, depth - 1):
                before, after = os.path.join(current, "a.png"), os.path.join(current, "z.png")
                for name in (before, after):
                    with open(name, "wb") as handle:
                        handle.write(b"not decoded here")
                expected_down.append(before)
                expected_up.insert(0, after)
            os.mkdir(os.path.join(current, "m"))
            current = os.path.join(current, "m")
        os.symlink(
            top, os.path.join(current, "back-to-top")
        )  # a cycle from the bottom: not followed
        items = expand_inputs([str(top)])
    finally:
        _remove_deep_tree(current, top)
    assert paths(items) == expected_down + expected_up
    assert all(item.error is None for item in items)


def _remove_deep_tree(bottom: str, top: Path) -> None:
    """Bottom up, without recursion: shutil.rmtree (and pytest's clean-up of old tmp_path folders)
    would hit the recursion limit on this tree and break later test sessions."""
    current = bottom
    while True:
        for name in os.listdir(current):
            path = os.path.join(current, name)
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
        os.rmdir(current)
        if current == str(top):
            return
        current = os.path.dirname(current)


def test_dangling_link_given_directly(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    [item] = expand_inputs([str(tmp_path / "link.jpg")])
    assert item.error is not None and "dangling" in item.error


# ------------------------------------------------------------------------------------------------ labels


def test_labels_option_splits_and_trims() -> None:
    assert parse_labels_option(" corgi, jazz album ,cat") == ["corgi", "jazz album", "cat"]


@pytest.mark.parametrize("text", ["cat,,dog", "cat,dog,", " , ", ""])
def test_empty_labels_are_usage_errors(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_labels_option(text)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["cat,dog,cat", "Cat,cat", "jazz  album,jazz album"])
def test_duplicate_labels_are_usage_errors(text: str) -> None:
    with pytest.raises(UserError, match="duplicate"):
        parse_labels_option(text)


@pytest.mark.parametrize(
    ("labels", "shown"),
    [
        (["cat", "ca\u200bt"], r"ca\u200bt"),  # zero-width space
        (["jazz album", "jazz\u00a0album"], r"jazz\xa0album"),  # no-break space
        (["corgi", "\ufeffcorgi"], r"\ufeffcorgi"),  # byte-order mark
        (["cafe\u0301", "caf\u00e9"], "caf"),  # combining accent vs precomposed
        (["ﬁsh", "fish"], "fish"),  # ligature
        (["ｃａｔ", "cat"], "cat"),  # full-width letters
        (["soft\u00adware", "software"], "software"),  # soft hyphen
    ],
)
def test_labels_differing_only_by_invisible_or_look_alike_characters_are_duplicates(
    labels: list[str], shown: str
) -> None:
    """A reader cannot tell these apart, so they would split one class in two."""
    with pytest.raises(UserError, match="duplicate") as info:
        read_labels_from(labels)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert all(ch.isprintable() for ch in message)  # the invisible character is shown escaped


def read_labels_from(labels: list[str]) -> list[str]:
    from zsclip.jobs.labels import check_labels

    return check_labels(labels, "--labels")


def test_a_label_of_invisible_characters_only_is_refused() -> None:
    with pytest.raises(UserError, match="invisible"):
        read_labels_from(["cat", "\u200b\u200d"])


def test_labels_file_keeps_commas_and_skips_comments(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("\ufeff# my classes\nsalt, pepper\n\n  corgi  \n# done\n", encoding="utf-8")
    assert read_labels_file(path) == ["salt, pepper", "corgi"]


def test_labels_file_problems(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    for name in ("empty.txt", "dup.txt", "missing.txt"):
        with pytest.raises(UserError):
            read_labels_file(tmp_path / name)
    with pytest.raises(UserError, match="not both"):
        resolve_labels("a,b", tmp_path / "dup.txt")
    with pytest.raises(UserError, match="no labels"):
        resolve_labels(None, None)


# --------------------------------------------------------------------------------------------- templates


def test_named_template_sets_are_valid() -> None:
    names = available_template_sets()
    assert {DEFAULT_TEMPLATE_SET, "simple", "plain"} <= set(names)
    for name in names:
        assert all("{}" in template for template in load_templates(name).templates)
    assert len(load_templates("photo").templates) >= 24
    assert load_templates("simple").templates == ("a photo of a {}.",)


def test_template_default_follows_the_model_when_it_names_a_set() -> None:
    assert load_templates(None, model_default="simple").name == "simple"
    assert load_templates(None, model_default="no-such-set").name == DEFAULT_TEMPLATE_SET


def test_user_template_file_and_braces_in_labels(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# comment\nart of {}\n\n{} on a table\n  # indented comment\n")
    templates = load_templates(str(path))
    assert templates.templates == ("art of {}", "{} on a table")
    assert templates.prompts("{odd} label") == ["art of {odd} label", "{odd} label on a table"]


def test_a_hash_inside_a_template_is_part_of_it(tmp_path: Path) -> None:
    """Only a line starting with `#` is a comment: "#1" or "C#" in a template must reach the model."""
    path = tmp_path / "mine.txt"
    path.write_text("# comment\nthe #1 {} of the year\n{} in C# code\n")
    assert load_templates(str(path)).templates == ("the #1 {} of the year", "{} in C# code")


def test_template_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    with pytest.raises(UserError, match="has no"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="photo"):  # the message lists the available names
        load_templates("no-such-set")


# ----------------------------------------------------------------------------------- device and precision


def test_device_and_precision_choices() -> None:
    import torch

    from zsclip.core.devices import resolve_device, resolve_precision

    cpu = resolve_device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="unknown --precision"):
        resolve_precision("fp8", cpu)
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("tpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda")
