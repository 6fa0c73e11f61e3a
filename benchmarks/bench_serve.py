"""`zsclip serve` under load, against the CLI (a script, not a test; loopback only, stops by itself).

    python benchmarks/bench_serve.py [--workdir DIR] [--model builtin|vitb32] [--only CASE ...]

Set-up (kept in --workdir, so reruns skip it): 96 JPEGs of 640x480 with photo-like content
(benchmarks/photos.py), the 100 labels of examples/labels.txt, and for --model vitb32 a ViT-B/32 with
random weights in zsclip's own format (the same cost as real weights).

Cases, each server in its own process on 127.0.0.1 with a port the system picks:
  load-batched   16 client threads, one image per request, --requests in all (1,000 by default),
                 against `zsclip serve` with dynamic batching (--max-batch 32, --batch-wait-ms 50)
  load-greedy    the same with --batch-wait-ms 0 (batch what is queued, never wait)
  load-single    the same with --max-batch 1 (no dynamic batching: one image per forward pass)
  cli-folder     `zsclip classify -` reading the same --requests paths from stdin, --no-cache: the
                 CLI's folder throughput (its image loop, start-up reported apart)
  per-image      the 96 images one process at a time: `zsclip classify IMG --server URL` against a
                 fresh `zsclip classify IMG` (classifier cache warm for both, as after a first run),
                 wall time per image, launch to exit, and whether the rows agree
Throughput is images (= requests) per second from the first request to the last answer; latency is
one request's, send to answer, in the client. Peak memory is the server's VmHWM. The load average is
read before and after each case: the machine is shared, so say how busy it was with each figure.
Every request loop is bounded by count (--requests) and time (--max-seconds).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
CLIENTS = 16
IMAGES = 96
LABELS = 100  # --labels


# ------------------------------------------------------------------------------------------- set-up


def setup(work: Path, model: str) -> tuple[list[Path], Path, list[str]]:
    """(the 96 photos, the labels file, the --model arguments)."""
    from photos import write_photos

    photos = write_photos(work / "photos-640x480", IMAGES, (640, 480), processes=2)
    labels = work / f"labels-{LABELS}.txt"
    labels.write_text("\n".join(label_list(ROOT / "examples" / "labels.txt")[:LABELS]) + "\n")
    if model == "builtin":
        return photos, labels, []
    path = work / "model" / "vitb32-random.safetensors"
    if not path.is_file():
        make_vitb32(path)
    return photos, labels, ["--model", str(path)]


def make_vitb32(path: Path) -> None:
    """ViT-B/32 with random weights, saved as zsclip's format with the built-in model's tokenizer
    (its ids fit ViT-B/32's larger embedding table; only the cost matters here)."""
    import torch

    from zsclip.core.checkpoints import load_model, save_checkpoint
    from zsclip.core.model import build_model
    from zsclip.core.presets import get_preset
    from zsclip.core.transform import PreprocessConfig

    torch.manual_seed(0)
    model = build_model(get_preset("ViT-B/32")).eval()
    tokenizer = load_model(None).tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, preprocess=PreprocessConfig(), tokenizer=tokenizer)


def label_list(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# ------------------------------------------------------------------------------------------- server


class Server:
    """`zsclip serve --port 0` in its own process."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zsclip", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.port = 0
        for line in self.process.stderr:  # the line that says where it listens
            if " serving " in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                break
        if not self.port:
            raise SystemExit(f"the server did not start (exit {self.process.wait()})")
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (user + system, all its threads)."""
        fields = open(f"/proc/{self.process.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_memory_mb(self) -> float:
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


def multipart(labels: list[str], image: bytes) -> tuple[bytes, str]:
    from zsclip.cli._remote import _multipart

    return _multipart({"labels": labels}, [image])  # as `classify --server` sends it


def post(connection: http.client.HTTPConnection, body: bytes, kind: str) -> tuple[int, bytes]:
    connection.request("POST", "/v1/classify", body=body, headers={"Content-Type": kind})
    response = connection.getresponse()
    return response.status, response.read()


# ------------------------------------------------------------------------------------------- cases


def case_load(work: Path, args, server_args: list[str], env: dict[str, str]) -> dict:
    photos, labels_file, model_args = setup(work, args.model)
    labels = label_list(labels_file)
    bodies = [multipart(labels, photo.read_bytes()) for photo in photos]
    server = Server([*model_args, "-q", *server_args], env)
    try:
        warm = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        for body, kind in bodies[:4]:  # builds the classifier; first touches of the weights
            for _ in range(20):  # 408 while a large classifier is still being built
                status, _ = post(warm, body, kind)
                if status != 408:
                    break
            assert status == 200, status
        warm.close()
        server_cpu, client_cpu = server.cpu_s(), _own_cpu_s()
        result = drive(server.port, bodies, args.requests, args.max_seconds)
        server_cpu, client_cpu = server.cpu_s() - server_cpu, _own_cpu_s() - client_cpu
        # CPU per image does not depend on how busy the shared machine is; throughput does
        result["server_cpu_ms_per_image"] = round(1000 * server_cpu / result["requests"], 2)
        result["client_cpu_ms_per_image"] = round(1000 * client_cpu / result["requests"], 2)
        result["peak_server_mb"] = round(server.peak_memory_mb(), 1)
        health = json.loads(_get(server.port, "/v1/health"))
        result["batches"] = health["batches"]
    finally:
        result_code = server.stop()
    result["server_exit"] = result_code
    return result


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    data = connection.getresponse().read()
    connection.close()
    return data


def drive(port: int, bodies: list, requests: int, max_seconds: float) -> dict:
    """CLIENTS threads, keep-alive connections, `requests` in all (or until `max_seconds`)."""
    counter = itertools.count()
    latencies: list[float] = []
    failures: dict[int, int] = {}
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.monotonic() < deadline:
            index = next(counter)
            if index >= requests:
                break
            body, kind = bodies[index % len(bodies)]
            began = time.perf_counter()
            status, _ = post(connection, body, kind)
            latencies.append(time.perf_counter() - began)
            if status != 200:
                failures[status] = failures.get(status, 0) + 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "failed": failures,
        "wall_s": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def case_cli_folder(work: Path, args, env: dict[str, str]) -> dict:
    """The CLI on the same paths, timed from inside (its image loop) by a small wrapper process."""
    photos, labels_file, model_args = setup(work, args.model)
    paths = "".join(f"{photos[i % len(photos)]}\n" for i in range(args.requests))
    launch = time.time()
    process = subprocess.run(
        [
            sys.executable,
            __file__,
            "--timed-cli",
            "classify",
            "-",
            "-L",
            str(labels_file),
            *model_args,
            "--no-cache",
            "--format",
            "jsonl",
            "-q",
            "--output",
            str(work / "cli.jsonl"),
        ],
        input=paths,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.time() - launch
    marks = json.loads(process.stdout.strip().splitlines()[-1])
    loop = marks["done"] - marks["ready"]
    cpu = marks["cpu_done"] - marks["cpu_ready"]
    return {
        "images": args.requests,
        "startup_s": round(marks["ready"] - launch, 2),
        "loop_s": round(loop, 2),
        "images_per_s": round(args.requests / loop, 1),
        "cpu_ms_per_image": round(1000 * cpu / args.requests, 2),
        "wall_s": round(wall, 2),
        "peak_mb": marks["peak_mb"],
    }


def timed_cli() -> None:
    """`zsclip ARGS` with marks at the start and end of the image loop (printed last on stdout)."""
    import atexit
    import resource

    import zsclip.jobs.classify
    from zsclip.cli import run

    marks: dict[str, float] = {}
    classify_images = zsclip.jobs.classify.classify_images

    def timed(*args, **kwargs):
        marks["ready"], marks["cpu_ready"] = time.time(), _own_cpu_s()
        yield from classify_images(*args, **kwargs)
        marks["done"], marks["cpu_done"] = time.time(), _own_cpu_s()

    def report() -> None:
        marks["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(marks), flush=True)

    zsclip.jobs.classify.classify_images = timed
    atexit.register(report)
    sys.argv = ["zsclip", *sys.argv[2:]]
    run()


def case_per_image(work: Path, args, env: dict[str, str]) -> dict:
    """Each image in its own process: through the server, and with a fresh local classify."""
    photos, labels_file, model_args = setup(work, args.model)
    photos = photos[: args.per_image]
    base = ["classify", "-L", str(labels_file), "--format", "jsonl", "-q"]
    local_cmd = [sys.executable, "-m", "zsclip", *base, *model_args]
    server = Server([*model_args, "-q"], env)
    try:
        remote_cmd = [sys.executable, "-m", "zsclip", *base, "--server", server.url]
        for command in (local_cmd, remote_cmd):  # warm: the classifier cache, the page cache
            subprocess.run([*command, str(photos[0])], capture_output=True, env=env, check=True)
        local, remote, agree, differ = [], [], 0, []
        for photo in photos:  # interleaved, so both see the same load
            began = time.perf_counter()
            here = subprocess.run([*local_cmd, str(photo)], capture_output=True, env=env)
            local.append(time.perf_counter() - began)
            began = time.perf_counter()
            there = subprocess.run([*remote_cmd, str(photo)], capture_output=True, env=env)
            remote.append(time.perf_counter() - began)
            same = here.stdout == there.stdout and here.returncode == there.returncode == 0
            agree += same
            if not same:
                differ.append(
                    {
                        "image": photo.name,
                        "local": here.stdout[:300],
                        "server": there.stdout[:300],
                        "codes": [here.returncode, there.returncode],
                    }
                )
    finally:
        server.stop()
    return {
        "images": len(photos),
        "local_median_s": round(statistics.median(local), 3),
        "server_median_s": round(statistics.median(remote), 3),
        "speedup_median": round(statistics.median(local) / statistics.median(remote), 1),
        "local_total_s": round(sum(local), 1),
        "server_total_s": round(sum(remote), 1),
        "identical_rows": agree,
        "differing": differ[:3],
    }


CASES = {
    "load-batched": lambda w, a, e: case_load(
        w, a, ["--max-batch", "32", "--batch-wait-ms", "50"], e
    ),
    "load-greedy": lambda w, a, e: case_load(
        w, a, ["--max-batch", "32", "--batch-wait-ms", "0"], e
    ),
    "load-single": lambda w, a, e: case_load(w, a, ["--max-batch", "1"], e),
    "cli-folder": case_cli_folder,
    "per-image": case_per_image,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--timed-cli":
        timed_cli()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zsclip-bench-serve"))
    parser.add_argument("--model", choices=("builtin", "vitb32"), default="builtin")
    parser.add_argument("--requests", type=int, default=1000, help="requests per load case")
    parser.add_argument("--per-image", type=int, default=IMAGES, help="images in per-image")
    parser.add_argument(
        "--labels", type=int, default=100, help="the first N labels of examples/labels.txt"
    )
    parser.add_argument("--max-seconds", type=float, default=600, help="cap on each load loop")
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the cases, interleaved")
    args = parser.parse_args()
    global LABELS
    LABELS = args.labels
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZSCLIP_")}
    env["ZSCLIP_CACHE"] = str(args.workdir / f"cache-{args.model}")
    env["XDG_CONFIG_HOME"] = str(args.workdir / "config")  # no `zsclip config` default model
    setup(args.workdir, args.model)
    for name in [name for _ in range(args.repeat) for name in args.only]:
        load_before = os.getloadavg()[0]
        result = CASES[name](args.workdir, args, env)
        result["load"] = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"
        print(json.dumps({"case": name, "model": args.model, **result}), flush=True)


if __name__ == "__main__":
    main()
