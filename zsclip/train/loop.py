"""The training job: contrastive pre-training (or fine-tuning) of a CLIP on image-caption pairs.

    run = prepare(config, resume=False, hooks=hooks)    # data checks, model, optimizer, output folder
    result = run.train()                               # the loop; returns a TrainResult

The loop, one optimizer step at a time: set the lr from the schedule (a pure function of the step),
embed the batch's images and captions, compute the symmetric contrastive loss (zsclip.train.loss),
step AdamW, clamp the temperature. Every `save_every` steps and at the end: model.safetensors,
state.pt, validation, report.html (zsclip.train.state explains the crash-safe order). The data order
is a pure function of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one
would have.

No printing and no argv here: the terminal layer passes `Hooks` and renders what they report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from zsclip.errors import UserError
from zsclip.train import batches
from zsclip.train import state as ts
from zsclip.train.accumulate import contrastive_backward
from zsclip.train.loss import clamp_logit_scale, scale
from zsclip.train.schedule import lr_at, set_lr


@dataclass
class TrainConfig:
    # pairs file (.tsv / .csv / .jsonl), or tar shards ('shards/{00000..00099}.tar',
    # zsclip.train.shards); may be None when resuming (the saved one is used)
    data: str | None
    output: str  # run folder
    model: str = "small"  # preset name (train from scratch) or checkpoint path (fine-tune)
    val: str | None = None  # pairs file for retrieval recall@k
    zeroshot_dir: str | None = None  # folder of class subfolders for zero-shot top-1
    templates: str | None = None  # prompt set the model is trained for (stored in its metadata)
    # total length: epochs, or optimizer steps (wins over epochs). Given again with --resume, either
    # sets a new end: the remaining steps follow the warmup + cosine schedule of a run of that length
    epochs: int | None = None
    steps: int | None = None
    # pairs per process and micro-batch; the contrastive batch (every other pair is a negative) is
    # the global one: world_size x accum_steps x batch_size (zsclip.train.batches)
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 100  # steps of linear warmup before the cosine decay
    weight_decay: float = 0.2
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 on CUDA only, with loss scaling)
    seed: int = 0  # model init and data order
    workers: int = 0  # image-decoding processes (0: in the training process)
    # learn a BPE vocabulary of this size from the captions (from scratch only)
    vocab_size: int | None = None
    skip_missing: bool = False
    save_every: int = 200  # steps between checkpoints (and validations)
    log_every: int = 10
    device: str = "auto"
    world_size: int = 1  # processes (torchrun's WORLD_SIZE; filled in by the set-up)
    # micro-batches per step, with the loss of one batch K times larger (zsclip.train.accumulate)
    accum_steps: int = 1
    # recompute transformer blocks in the backward pass: less memory, more time
    grad_checkpointing: bool = False


@dataclass
class Hooks:
    """How the job talks to whoever runs it. Every hook is optional."""

    warn: Callable[[str], None] = lambda message: None
    note: Callable[[str], None] = lambda message: None
    on_start: Callable[[int, int], None] = lambda start_step, total_steps: None
    on_step: Callable[[dict], None] = lambda record: None  # every logged step
    on_validation: Callable[[dict], None] = lambda record: None
    should_stop: Callable[[], bool] = lambda: False  # polled after each step (Ctrl-C, SIGTERM)


@dataclass
class TrainResult:
    step: int
    total_steps: int
    interrupted: bool
    output: Path
    last_record: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint stays in place."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


def lr_for(config: TrainConfig, step: int, total_steps: int) -> float:
    return lr_at(step, config.lr, min(config.warmup, total_steps), total_steps)


def training_step(
    towers: Any,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    logit_scale: torch.nn.Parameter,
    world: Any,
    autocast: Any,
    scaler: Any,
) -> torch.Tensor:
    """One optimizer step on this process's micro-batches ([B, 3, S, S], [B, L] each); returns the loss
    of the global batch (detached, the same in every process). towers:
    zsclip.train.distributed.Towers, maybe DDP-wrapped."""
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive_backward(
        towers,
        micro_batches,
        logit_scale,
        world,
        autocast=autocast,
        backward=lambda value: scaler.scale(value).backward(),
    )
    if not torch.isfinite(loss):
        return loss  # the caller stops; no step is taken with a broken gradient
    scaler.step(optimizer)  # plain optimizer.step() unless fp16 scales the loss
    scaler.update()
    clamp_logit_scale(logit_scale)
    return loss


class Run:
    """A prepared training run (see `prepare`)."""

    def __init__(self, config: TrainConfig, hooks: Hooks, parts: dict[str, Any]) -> None:
        self.config, self.hooks = config, hooks
        self.out = Path(config.output)
        self.__dict__.update(
            parts
        )  # model, towers, world, source, epoch, position, optimizer, scaler, ...
        self.global_batch = self.world.world_size * config.accum_steps * config.batch_size
        self.steps_per_epoch = self.source.samples_per_epoch // self.global_batch
        if config.steps is not None:
            self.total_steps = config.steps
        else:  # from the saved position: right even when the global batch changed since the save
            self.total_steps = self.step + batches.steps_left(
                self.epoch,
                self.position,
                config.epochs or 1,
                self.global_batch,
                self.source.samples_per_epoch,
            )
        self.last_saved = self.step
        if self.total_steps < self.step:
            raise UserError(
                f"the run is at step {self.step}, past the end that --epochs "
                f"{config.epochs} sets ({self.total_steps}); give a larger --epochs or --steps"
            )
        if config.warmup > self.total_steps and self.step == 0:
            hooks.warn(
                f"--warmup {config.warmup} is longer than the run ({self.total_steps} steps): the "
                f"learning rate rises all the way and reaches --lr {config.lr:g} only at the last "
                "step, with no decay; lower --warmup"
            )

    # ---- the loop
    # ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config, hooks = self.config, self.hooks
        started, interrupted = time.perf_counter(), False
        record: dict = {}
        validation: dict = {}
        hooks.on_start(self.step, self.total_steps)
        if not ts.has_state(self.out):
            self.checkpoint(
                validate=False
            )  # from the first moment on, the folder holds a loadable model
        window_start, window_images = time.perf_counter(), 0
        for micro_batches in self._steps():
            epoch = self.epoch
            lr = lr_for(config, self.step, self.total_steps)
            set_lr(self.optimizer, lr)
            on_device = [
                (images.to(self.device), tokens.to(self.device)) for images, tokens in micro_batches
            ]
            loss = training_step(
                self.towers,
                self.optimizer,
                on_device,
                self.model.logit_scale,
                self.world,
                self.autocast,
                self.scaler,
            )
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at step {self.step + 1}; stopped. {self.out / ts.MODEL_FILE} "
                    f"keeps the last good checkpoint (step {self.last_saved}); lower --lr or use --precision fp32"
                )
            self.step += 1
            self.epoch, self.position = batches.advance(
                self.epoch, self.position, self.global_batch, self.source.samples_per_epoch
            )
            window_images += self.global_batch
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                record = self._log_step(epoch, loss.item(), lr, window_images / elapsed)
                window_start, window_images = time.perf_counter(), 0
            interrupted = self.world.any(
                hooks.should_stop(), self.device
            )  # every process stops at the same step
            if self.step % config.save_every == 0 or self.step == self.total_steps:
                validation = self.checkpoint(validate=True) or validation
            elif interrupted:
                self.checkpoint(validate=False)
            if interrupted:
                break
        self.world.barrier()  # the others wait for rank 0's last checkpoint
        return TrainResult(
            self.step,
            self.total_steps,
            interrupted,
            self.out,
            record,
            validation,
            time.perf_counter() - started,
        )

    def _steps(self) -> Any:
        """This process's micro-batches for steps [step, total_steps), a list of accum_steps per step.
        For a pairs file one loader serves the whole rest of the run, so its workers (and the pixels
        they keep) live as long."""
        return self.source.steps(self.epoch, self.position, self.total_steps - self.step)

    def _log_step(self, epoch: int, loss: float, lr: float, images_per_s: float) -> dict:
        record = {
            "event": "train",
            "step": self.step,
            "epoch": epoch,
            "loss": round(loss, 6),
            "logit_scale": round(scale(self.model.logit_scale.detach()).item(), 4),
            "lr": lr,
            "images_per_s": round(images_per_s, 1),
            "time": round(time.time(), 1),
        }
        if (
            self.skipped is not None
        ):  # tar shards: bad samples skipped so far, all processes together
            record["skipped"] = self.world.sum_int(self.skipped.value, self.device)
        self.log.write(record)
        self.hooks.on_step(record)
        return record

    # ---- checkpoints
    # ------------------------------------------------------------------------------------
    def checkpoint(self, validate: bool) -> dict:
        """Validate (optionally), then write model, state and report for the current step. Rank 0 only."""
        if not self.world.is_main:
            return {}
        from zsclip.atomic import atomic_write_text
        from zsclip.core.checkpoints import save_checkpoint
        from zsclip.train.report import render_report

        validation = self.validate() if validate else {}
        save_checkpoint(
            self.out / ts.MODEL_FILE,
            self.model,
            preprocess=self.preprocess,
            tokenizer=self.tokenizer,
            metadata=self.metadata(),
        )
        ts.save_state(
            self.out,
            {
                "step": self.step,
                "config": asdict(self.config),
                "model_config": self.model.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "tokenizer": self.tokenizer.to_metadata(),
                "preprocess": self.preprocess.to_dict(),
                "metadata": self.metadata(),
                "rng": ts.rng_states(),
                "scaler": self.scaler.state_dict(),
                # where the data stands, globally: a resume with another number of processes
                # continues from here
                "epoch": self.epoch,
                "position": self.position,
                "global_batch": self.global_batch,
                "world_size": self.world.world_size,
            },
        )
        self.last_saved = self.step
        atomic_write_text(
            self.out / ts.REPORT_FILE,
            render_report(self.log.records, f"zsclip run {self.out.name}"),
        )
        return validation

    def metadata(self) -> dict[str, str]:
        meta = dict(self.base_metadata)
        meta.update({"step": str(self.step), "trained_with": "zsclip train"})
        if self.config.templates:
            meta["templates"] = self.config.templates
        return meta

    def validate(self) -> dict:
        from zsclip.jobs import evaluate

        if self.val_pairs is None and self.zeroshot is None:
            return {}
        self.model.eval()
        try:
            run = evaluate.EvalRun(
                self.model, self.tokenizer, self.preprocess, self.device, autocast=self.autocast
            )
            result = evaluate.validation_metrics(run, self.val_pairs, self.zeroshot)
        finally:
            self.model.train()
        record = {"event": "val", "step": self.step, **result}
        self.log.write(record)
        self.hooks.on_validation(record)
        return result


def prepare(
    config: TrainConfig,
    *,
    resume: bool = False,
    hooks: Hooks | None = None,
    given: Collection[str] | None = None,
) -> Run:
    """Check the data, build or load the model, and set up the output folder; raises UserError on
    mistakes.

    With `resume`, the saved configuration is used, except for the runtime options (workers,
    device, accum_steps, ...) taken from `config`, and for the fields named in `given` (the options
    the user set on purpose) among steps, epochs, data, val, zeroshot_dir and skip_missing. Other
    fields in `given` whose value differs from the saved one are reported as ignored.
    """
    from zsclip.train import setup as train_setup

    return Run(*train_setup.setup(config, resume, hooks or Hooks(), given))


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    hooks: Hooks | None = None,
    given: Collection[str] | None = None,
) -> TrainResult:
    return prepare(config, resume=resume, hooks=hooks, given=given).train()
