"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): mutations of valid files, and a guard that
fails an example which hangs or whose memory runs away, instead of letting it take the test run down.

The tests are deterministic (`derandomize=True`: the same examples on every run, so CI cannot turn red
by luck) and keep no example database in the checkout.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import sys
from pathlib import Path
from typing import Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,  # the guard below bounds each example; deadlines would be timing assertions
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Integers that make size fields interesting: zero, one, the sign boundaries, the largest values.
_EDGES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def mutations(draw, base: bytes, max_edits: int = 6) -> bytes:
    """`base` with a few random edits: bytes flipped, overwritten, inserted or deleted, a 16- or
    32-bit field set to an edge value (either byte order), or the file cut short."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "field", "cut"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "field":
            layout = draw(st.sampled_from(["<H", ">H", "<I", ">I"]))
            value = draw(st.sampled_from(_EDGES)) & (0xFFFF if layout.endswith("H") else 0xFFFFFFFF)
            field = struct.pack(layout, value)
            data[at : at + len(field)] = field
        elif kind == "cut":
            del data[at:]
    return bytes(data)


def files_from(bases: dict[str, bytes]):
    """(suffix, bytes): random bytes, or a mutation of one of the valid files."""
    names = sorted(bases)
    raw = st.tuples(st.sampled_from(names), st.binary(max_size=512))
    mutated = st.sampled_from(names).flatmap(
        lambda name: st.tuples(st.just(name), mutations(bases[name]))
    )
    return st.one_of(raw, mutated)


class Runaway(Exception):
    """An example that hung or used far more memory than its input justifies."""


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS becomes the current RSS
        return True
    except OSError:
        return False


@contextlib.contextmanager
def bounded(seconds: float = 20.0, memory_mib: int = 1024) -> Iterator[None]:
    """Raise Runaway when the block runs longer than `seconds` (a hang: SIGALRM, main thread only) or
    raises the process's peak resident memory by more than `memory_mib` (Linux; elsewhere unchecked)."""
    measured = sys.platform == "linux" and _reset_peak()
    start = _rss_kib("VmRSS") if measured else None

    def hung(signum, frame):
        raise Runaway(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    peak = _rss_kib("VmHWM") if measured else None
    if start is not None and peak is not None and peak - start > memory_mib * 1024:
        raise Runaway(f"peak memory grew by {(peak - start) // 1024} MiB")
