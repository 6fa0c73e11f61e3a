"""`zsclip train`: contrastive training from a pairs file, safe to interrupt and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import BatchSizeOpt, DeviceOpt, PrecisionOpt, QuietOpt

# The registry's names (zsclip.core.presets.PRESETS), written out so that `--help` imports no torch;
# tests/test_train_loop.py checks that the two agree.
PRESET_NAMES = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
    "tiny",
    "tiny-resnet",
    "small",
    "small-resnet",
)


def train_command(
    ctx: typer.Context,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="DIR", help="Run folder: model, state, log, report."
        ),
    ],
    data: Annotated[
        Optional[Path],
        typer.Option(
            "--data",
            help="Pairs file: image<TAB>caption lines (.tsv), .csv or .jsonl; "
            "or tar shards, e.g. 'shards/{00000..00099}.tar' (pip install 'zsclip[shards]'). "
            "Required, except with --resume (the run's own is used).",
            show_default=False,
        ),
    ] = None,
    val: Annotated[
        Optional[Path], typer.Option("--val", help="Pairs file for retrieval recall@1/5/10.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Preset (train from scratch): " + ", ".join(PRESET_NAMES) + "; or a checkpoint "
            "file or a name from `zsclip models` (fine-tune).",
        ),
    ] = "small",
    epochs: Annotated[
        Optional[int], typer.Option("--epochs", min=1, help="Passes over the data (default 1).")
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(
            "--steps",
            min=1,
            help="Optimizer steps (instead of --epochs). With --resume: a new end, the rest of "
            "the run following the schedule of a run that long.",
        ),
    ] = None,
    batch_size: BatchSizeOpt = 256,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 5e-4,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Linear warmup steps before cosine decay.")
    ] = 100,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", min=0.0, help="AdamW decoupled decay.")
    ] = 0.2,
    precision: PrecisionOpt = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Model init and data order.")] = 0,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Image-decoding processes (0: decode in the training process). Decoded "
            "images are kept in memory when they fit.",
        ),
    ] = 0,
    vocab_size: Annotated[
        Optional[int],
        typer.Option(
            "--vocab-size",
            min=514,
            help="Learn a BPE vocabulary of this size from the "
            "captions (from a preset only; default: the standard 49,408 vocabulary).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --output from its last checkpoint."),
    ] = False,
    zeroshot_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--zeroshot-dir", help="Folder of class subfolders: zero-shot top-1 at checkpoints."
        ),
    ] = None,
    templates: Annotated[
        Optional[str],
        typer.Option(
            "--templates",
            help="Prompt set the model is for (stored in it; used by --zeroshot-dir), e.g. shapes.",
        ),
    ] = None,
    skip_missing: Annotated[
        bool, typer.Option("--skip-missing", help="Train without bad rows instead of stopping.")
    ] = False,
    save_every: Annotated[
        int, typer.Option("--save-every", min=1, help="Steps between checkpoints.")
    ] = 200,
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Steps between log.jsonl lines.")
    ] = 10,
    device: DeviceOpt = "auto",
    accum_steps: Annotated[
        int,
        typer.Option(
            "--accum-steps",
            min=1,
            help="Micro-batches per step: a contrastive batch "
            "K times larger at the same memory (exact: features are cached).",
        ),
    ] = 1,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing",
            help="Recompute transformer blocks in the backward pass: less memory, ~30% more time.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a CLIP on image-caption pairs (symmetric contrastive loss, AdamW, warmup + cosine).

    Writes model.safetensors (always loadable), state.safetensors, log.jsonl and report.html into
    --output. Ctrl-C saves and stops; --resume continues to the same final step (or to a new
    --steps / --epochs), with the run's saved settings.

    Example: zsclip train --data shapes/train.tsv --output runs/shapes --model small-resnet
    --vocab-size 1024 --epochs 4 --lr 1e-3

    Several processes: torchrun --nproc_per_node N -m zsclip train ... (global batch = N x batch
    size x accum steps).
    """
    from zsclip.cli._train_progress import run_training
    from zsclip.train.loop import TrainConfig

    config = TrainConfig(
        data=str(data) if data is not None else None,
        output=str(output),
        model=model,
        val=str(val) if val else None,
        zeroshot_dir=str(zeroshot_dir) if zeroshot_dir else None,
        templates=templates,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        precision=precision,
        seed=seed,
        workers=workers or 0,
        vocab_size=vocab_size,
        skip_missing=skip_missing,
        save_every=save_every,
        log_every=log_every,
        device=device,
        accum_steps=accum_steps,
        grad_checkpointing=grad_checkpointing,
    )
    code = run_training(config, resume=resume, quiet=quiet, given=given_options(ctx))
    if code:
        raise typer.Exit(code)


def given_options(ctx: typer.Context) -> frozenset[str]:
    """The options set on the command line (or by environment), not left at their defaults: with
    --resume these are compared with the saved configuration."""
    # by name: Typer 0.29 vendors its own click, older releases use click's ParameterSource
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return frozenset(
        name for name, source in sources.items() if source is not None and source.name != "DEFAULT"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
