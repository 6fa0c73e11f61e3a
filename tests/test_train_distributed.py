"""Several processes (gloo on the CPU): the global-batch loss and gradients equal one process on the same batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from zsclip.train import distributed
from zsclip.train.distributed import World
from zsclip.train.state import load_state

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> World:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    world = distributed.world_from_env()
    distributed.init(world, torch.device("cpu"))
    return world


def float32_tolerance(reduction_length: int, scale: float) -> float:
    """How far two float32 sums of the same terms in different orders may drift apart.

    Each of K additions rounds by at most eps = 2^-23 ~ 1.19e-7 of the running sum; rounding errors
    of independent sign grow like sqrt(K), so the gap is about eps * sqrt(K) * (size of the terms),
    and the terms of a gradient are bounded by the size of the gradient itself. A factor of 4 covers
    the few reductions chained in a backward pass. Here the longest reduction is over every token of
    the global batch: K = 16 pairs x 77 tokens = 1232, so the bound is 4 * 1.19e-7 * 35.1 = 1.7e-5
    of the largest gradient entry (measured: at most 1.4e-6 of it, on Intel and AMD alike).
    """
    return 4 * torch.finfo(torch.float32).eps * math.sqrt(reduction_length) * scale


def _check_steps(rank: int, world_size: int, world: World, accum: int) -> None:
    """A few AdamW steps under DDP; before each, one process gets the same weights and the whole global
    batch, and the loss and every gradient must agree. Comparing at the same weights keeps Adam's
    amplification of float noise (it divides by sqrt(v)) out of the comparison."""
    from test_train_accumulate import make_batch, reference, tiny_model

    from zsclip.train.accumulate import contrastive_backward
    from zsclip.train.schedule import build_optimizer

    ddp_model, single = tiny_model(), tiny_model()
    towers = distributed.wrap(ddp_model, world, torch.device("cpu"))
    ddp_opt = build_optimizer(ddp_model, 1e-3, 0.2)
    local = 4  # per micro-batch
    for step in range(3):
        single.load_state_dict(ddp_model.state_dict())  # the weights the ranks have reached
        images, tokens = make_batch(world_size * accum * local, single.config, seed=step)
        want_loss, want = reference(single, images, tokens)  # the whole global batch
        mine = slice(rank * accum * local, (rank + 1) * accum * local)
        micro = list(zip(images[mine].chunk(accum), tokens[mine].chunk(accum)))
        ddp_opt.zero_grad(set_to_none=True)
        got_loss = contrastive_backward(towers, micro, ddp_model.logit_scale, world).item()
        reduction = images.shape[0] * tokens.shape[1]  # pairs x tokens: the longest sum
        loss_tol = float32_tolerance(reduction, max(1.0, abs(want_loss)))
        assert abs(got_loss - want_loss) <= loss_tol, (accum, step, got_loss, want_loss)
        for name, param in ddp_model.named_parameters():
            tol = float32_tolerance(reduction, want[name].abs().max().item())
            torch.testing.assert_close(
                param.grad,
                want[name],
                atol=tol,
                rtol=0,
                msg=lambda m, n=name: f"rank {rank} accum {accum} step {step} {n}: {m}",
            )
        ddp_opt.step()
    # DDP hands every rank the same averaged gradient, so the ranks' weights stay bit for bit equal
    flat = torch.cat([p.detach().reshape(-1) for p in ddp_model.parameters()])
    everyone = distributed.gather_no_grad(flat[None], world)  # [W, P]
    assert all(torch.equal(everyone[0], row) for row in everyone), "the ranks drifted apart"


def _check_gather(rank: int, world: World) -> None:
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(local, world)  # [4, 3]
    assert gathered[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    weights = torch.arange(4.0).unsqueeze(1) * (rank + 1)  # each rank weighs the rows differently
    (gathered * weights).sum().backward()
    # d/d(local of rank r) = sum over ranks s of (s + 1) * arange[r's rows] = 3 * arange[r's rows]
    expected = torch.arange(4.0)[rank * 2 : (rank + 1) * 2].unsqueeze(1).expand(2, 3) * 3
    torch.testing.assert_close(local.grad, expected)
    assert world.mean(torch.tensor(float(rank))).item() == 0.5
    assert world.any(rank == 1) and not world.any(False)
    assert world.sum_int(rank + 1) == 3


def _worker(rank: int, world_size: int, port: int) -> None:
    world = _join(rank, world_size, port)
    try:
        _check_gather(rank, world)
        _check_steps(rank, world_size, world, accum=1)
        _check_steps(rank, world_size, world, accum=2)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_ranks_match_one_process() -> None:
    """gather's backward sums over ranks; DDP + global loss == one process, with and without accumulation."""
    mp.spawn(_worker, args=(WORLD_SIZE, free_port()), nprocs=WORLD_SIZE, join=True)


def test_world_from_env() -> None:
    assert distributed.world_from_env({}) == World(0, 1, 0)
    assert distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(
        3, 4, 1
    )
    from zsclip.errors import UserError

    with pytest.raises(UserError, match="torchrun"):
        distributed.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="integers"):
        distributed.world_from_env({"RANK": "x"})


# ---- the training job under torchrun's environment -------------------------------------------------------------


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """A small shapes world at 32 px: 48 training pairs."""
    from zsclip.train import shapes

    out = tmp_path_factory.mktemp("world")
    shapes.generate(out, 48, seed=5, image_size=32, val_count=8, eval_per_class=1)
    return out


def train_config(data, out, **overrides):
    from zsclip.train.loop import TrainConfig

    base = dict(
        data=str(data / "train.tsv"),
        output=str(out),
        model="tiny",
        vocab_size=600,
        batch_size=8,
        steps=4,
        warmup=1,
        lr=1e-3,
        save_every=2,
        log_every=1,
        device="cpu",
        seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def load_params(path):
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_params(a, b, atol=2e-4):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


def _train_worker(
    rank: int,
    world_size: int,
    port: int,
    config,
    resume: bool,
    stop_at: int | None,
    report_dir: str,
) -> None:
    """Run zsclip.train.loop.train as torchrun's process `rank`; report how often this process wrote files."""
    import json
    from pathlib import Path

    import zsclip.core.checkpoints
    from zsclip.train import state as train_state
    from zsclip.train.loop import Hooks, train

    world = _join(rank, world_size, port)
    writes = {"model": 0, "state": 0}
    real_model, real_state = zsclip.core.checkpoints.save_checkpoint, train_state.save_state

    def count_model(*args, **kwargs):
        writes["model"] += 1
        return real_model(*args, **kwargs)

    def count_state(*args, **kwargs):
        writes["state"] += 1
        return real_state(*args, **kwargs)

    zsclip.core.checkpoints.save_checkpoint, train_state.save_state = count_model, count_state
    steps = {"n": 0}

    def should_stop() -> bool:  # only rank 1 asks to stop: every rank must stop at the same step
        steps["n"] += 1
        return stop_at is not None and rank == 1 and steps["n"] == stop_at

    try:
        result = train(config, resume=resume, hooks=Hooks(should_stop=should_stop))
        Path(report_dir, f"rank{rank}.json").write_text(
            json.dumps({**writes, "step": result.step, "world": world.world_size})
        )
    finally:
        distributed.shutdown()


def spawn_training(config, tmp_path, *, resume=False, stop_at=None) -> list[dict]:
    import json

    reports = tmp_path / f"reports-{len(list(tmp_path.glob('reports-*')))}"
    reports.mkdir()
    mp.spawn(
        _train_worker,
        args=(WORLD_SIZE, free_port(), config, resume, stop_at, str(reports)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.slow
def test_two_process_training_stops_together_and_resumes_at_another_world_size(
    world_data, tmp_path
) -> None:
    """2 ranks x batch 4 train like 1 process x batch 8: a stop asked by rank 1 alone stops both after step 3,
    only rank 0 wrote files, and the run resumes in one process with --accum-steps 2 (the same global batch of 8)
    to end where an uninterrupted single process ends."""
    import json

    from zsclip.train.loop import train

    single = train(train_config(world_data, tmp_path / "single"))
    assert single.step == 4

    reports = spawn_training(
        train_config(world_data, tmp_path / "cut", batch_size=4), tmp_path, stop_at=3
    )
    assert [r["step"] for r in reports] == [3, 3] and reports[0]["world"] == 2
    assert (
        reports[0]["model"] >= 2 and reports[0]["state"] >= 2
    )  # at the start, step 2 and the stop
    assert reports[1] == {"model": 0, "state": 0, "step": 3, "world": 2}
    state = load_state(tmp_path / "cut")
    assert (state["step"], state["epoch"], state["position"], state["world_size"]) == (3, 0, 24, 2)

    resumed = train(
        train_config(world_data, tmp_path / "cut", batch_size=4, accum_steps=2), resume=True
    )
    assert resumed.step == 4
    assert_same_params(
        load_params(tmp_path / "cut" / "model.safetensors"),
        load_params(tmp_path / "single" / "model.safetensors"),
    )
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "config" and log[0]["world_size"] == 2
    assert [r["step"] for r in log if r["event"] == "train"] == [
        1,
        2,
        3,
        4,
    ]  # one writer: no duplicates
    single_log = [
        json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()
    ]
    losses = [
        [r["loss"] for r in records if r["event"] == "train"] for records in (log, single_log)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the global-batch loss, step by step


def test_accum_steps_in_the_trainer_equal_a_larger_batch(world_data, tmp_path) -> None:
    from zsclip.train.loop import train

    train(train_config(world_data, tmp_path / "big", steps=3))
    train(
        train_config(
            world_data,
            tmp_path / "acc",
            steps=3,
            batch_size=2,
            accum_steps=4,
            grad_checkpointing=True,
        )
    )
    assert_same_params(
        load_params(tmp_path / "acc" / "model.safetensors"),
        load_params(tmp_path / "big" / "model.safetensors"),
    )


def test_precision_choices_on_the_cpu(world_data, tmp_path) -> None:
    from zsclip.errors import UserError
    from zsclip.train.loop import prepare

    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        prepare(train_config(world_data, tmp_path / "fp16", precision="fp16"))


def test_bf16_training_learns(tmp_path) -> None:
    """bf16 autocast (with --accum-steps) learns the colour task as fp32 does, and saves fp32 weights."""
    import json

    from safetensors import safe_open
    from test_train_loop import COLOURS, colour_config, colour_world_at, hand_scores

    from zsclip.train.loop import train

    root = colour_world_at(tmp_path / "colours")
    out = tmp_path / "bf16"
    result = train(colour_config(root, out, precision="bf16", accum_steps=2, batch_size=4))
    assert result.step == 40
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    # ln 8 = 2.08 is a model that tells nothing apart; ln 2 = 0.69 the floor (two of each colour)
    assert sum(losses[:5]) / 5 > 1.9 and sum(losses[-5:]) / 5 < 1.2, losses
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} <= {"F32", "I64"}
    labels = list(COLOURS)
    images = sorted((root / "images").rglob("*.png"))
    right = sum(
        labels[int(hand_scores(out / "model.safetensors", image, labels).argmax())]
        == image.parent.name
        for image in images
    )
    assert right >= 40, right  # of 48; chance: 12


def test_global_batch_larger_than_the_data_is_refused(world_data, tmp_path) -> None:
    from zsclip.errors import UserError
    from zsclip.train.loop import prepare

    with pytest.raises(UserError, match="global batch of 64"):
        prepare(train_config(world_data, tmp_path / "big", batch_size=16, accum_steps=4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_with_loss_scaling_on_cuda(world_data, tmp_path) -> None:
    from zsclip.train.loop import train

    result = train(
        train_config(
            world_data,
            tmp_path / "cuda",
            device="cuda",
            precision="fp16",
            steps=3,
            accum_steps=2,
            batch_size=4,
            grad_checkpointing=True,
        )
    )
    assert result.step == 3 and math.isfinite(result.last_record["loss"])
    state = load_state(tmp_path / "cuda")
    assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state is saved for --resume


def torchrun(args: list[str], tmp_path, extra_env: dict | None = None):
    """`torchrun --nproc_per_node 2 -m zsclip ARGS` as a user types it (CPU, gloo)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "zsclip", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def without_numpy(folder) -> dict:
    """An environment in which `import numpy` fails as on an install without it (torch then runs
    without numpy, as on a `pip install torch==2.13.0 zsclip` machine)."""
    stub = folder / "numpy"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'numpy\' (test stub)", name="numpy")\n'
    )
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    }


@pytest.mark.slow
def test_torchrun_without_numpy_trains_like_one_process(world_data, tmp_path) -> None:
    """The real launch on an install without numpy (which torch.distributed's object broadcast
    needs): two processes x batch 4 end where one process with batch 8 ends, step for step."""
    import json

    from zsclip.train.loop import train

    single = train(train_config(world_data, tmp_path / "single", steps=3, save_every=3))
    out = tmp_path / "run"
    args = ["train", "--data", str(world_data / "train.tsv"), "--output", str(out)]
    args += ["--model", "tiny", "--vocab-size", "600", "--batch-size", "4", "--steps", "3"]
    args += ["--warmup", "1", "--lr", "1e-3", "--seed", "3", "--log-every", "1", "--device", "cpu"]
    done = torchrun(args, tmp_path, without_numpy(tmp_path / "stub"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("done: 3 steps") == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "config" and log[0]["world_size"] == 2
    steps = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    single_log = [
        json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()
    ]
    single_losses = [r["loss"] for r in single_log if r["event"] == "train"]
    assert single.step == 3
    assert [r["loss"] for r in steps] == pytest.approx(single_losses, abs=1e-5)
    assert_same_params(
        load_params(out / "model.safetensors"),
        load_params(tmp_path / "single" / "model.safetensors"),
    )


@pytest.mark.slow
def test_torchrun_cli_on_tar_shards(tmp_path) -> None:
    """The real launch on tar shards with an undecodable sample: both ranks take 3 steps of the
    global batch, the bad sample is counted and skipped, the schedule is the one asked for, and only
    rank 0 talks and writes."""
    import json

    from test_train_shards import write_shards

    from zsclip.core.checkpoints import load_path
    from zsclip.train.schedule import lr_at

    write_shards(tmp_path / "shards", n_shards=4, per_shard=6, broken={"000020003": "image"})
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "shards" / "{00000..00003}.tar")]
    args += ["--output", str(out), "--model", "tiny", "--vocab-size", "600", "--batch-size", "2"]
    args += ["--accum-steps", "2", "--steps", "3", "--warmup", "1", "--log-every", "1"]
    args += ["--device", "cpu", "--workers", "1"]
    done = torchrun(args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("done: 3 steps") == 1 and "Traceback" not in done.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2 and log[0]["config"]["accum_steps"] == 2
    assert log[0]["pairs"] == 24  # counted from the tar headers; the bad image shows when decoded
    train = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s, 5e-4, 1, 3) for s in range(3)])
    # the bad sample is met once per pass over its rank's shards: 11 good samples where 12 are
    # drawn send the rank that holds it into a second pass (zsclip.train.shards.epoch_stream)
    assert 1 <= train[-1]["skipped"] <= 2
    loaded = load_path(out / "model.safetensors")
    assert loaded.metadata["step"] == "3"
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values())


@pytest.mark.slow
def test_torchrun_data_error_is_said_once_and_no_process_waits(world_data, tmp_path) -> None:
    """Rank 0 checks the pairs file for everyone; its problems are listed once, and the other
    process, which waits for rank 0's answer, exits too instead of hanging in the process group."""
    rows = (world_data / "train.tsv").read_text().splitlines()
    rows[5] = "nowhere.png\ta red circle."
    (world_data / "bad.tsv").write_text("\n".join(rows) + "\n")  # image paths are relative to it
    args = ["train", "--data", str(world_data / "bad.tsv"), "--output", str(tmp_path / "run")]
    args += ["--model", "tiny", "--vocab-size", "600", "--batch-size", "4", "--steps", "2"]
    done = torchrun(args, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert done.returncode != 0 and done.stderr.count("exitcode  : 2") == 2  # both ranks, status 2
    assert errors == [
        f"zsclip: error: bad.tsv:6: image not found: {world_data / 'nowhere.png'}",
        f"zsclip: error: 1 problem(s) in {world_data / 'bad.tsv'} (listed above); fix them or pass "
        "--skip-missing to train without those rows",
    ], done.stderr
    # torchrun itself reports a failed process with its own traceback; none comes from zsclip
    frames = [line for line in done.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [frame for frame in frames if "/zsclip/" in frame], done.stderr
    assert not (tmp_path / "run").exists()
