"""The decode pipeline's memory budget: concurrent decodes never hold more than it, in arrival order,
and one image larger than the whole budget runs alone. Costs are set by the tests, so nothing here
depends on timing or on how much memory the machine has."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from PIL import Image

from zsclip.core import transform
from zsclip.core.transform import PreprocessConfig
from zsclip.jobs import pipeline
from zsclip.jobs.inputs import InputItem
from zsclip.jobs.pipeline import DecodeOptions, MemoryBudget, decoded_batches


def _wait_until(condition, what: str) -> None:
    """Poll a condition another thread will make true (a hang guard, not a timing assertion)."""
    done = threading.Event()
    for _ in range(2000):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError(f"never happened: {what}")


def test_concurrent_holders_never_exceed_the_budget() -> None:
    budget = MemoryBudget(100)
    held, lock, errors = [0], threading.Lock(), []
    rng = random.Random(5)
    costs = [rng.randrange(1, 61) for _ in range(64)]

    def worker(cost: int) -> None:
        with budget.holding() as reserve:
            reserve(cost)
            with lock:
                held[0] += cost
                if held[0] > 100:
                    errors.append(held[0])
            threading.Event().wait(0.001)  # let the others run while this one holds
            with lock:
                held[0] -= cost

    threads = [threading.Thread(target=worker, args=(cost,)) for cost in costs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and budget.used == 0
    assert max(costs) <= budget.peak <= 100


def test_requests_are_served_in_arrival_order() -> None:
    budget = MemoryBudget(100)
    first = budget.acquire(80)
    order: list[str] = []

    def request(name: str, cost: int) -> None:
        budget.acquire(cost)
        order.append(name)

    big = threading.Thread(target=request, args=("big", 50))
    big.start()
    _wait_until(lambda: budget.waiting == 1, "the 50-byte request waits")
    small = threading.Thread(target=request, args=("small", 10))
    small.start()
    # 10 bytes would fit beside the 80, but it came after the 50-byte request: it must not overtake it
    _wait_until(lambda: budget.waiting == 2, "the 10-byte request waits behind it")
    assert order == []
    budget.release(first)
    big.join()
    small.join()
    assert order == ["big", "small"] and budget.used == 60


def test_one_request_larger_than_the_budget_runs_alone() -> None:
    budget = MemoryBudget(100)
    taken = budget.acquire(500)  # larger than everything: granted when nothing else is held
    assert taken == 100 and budget.used == 100
    granted = threading.Event()
    other = threading.Thread(target=lambda: (budget.acquire(1), granted.set()))
    other.start()
    _wait_until(lambda: budget.waiting == 1, "a one-byte request waits")
    assert not granted.is_set()
    budget.release(taken)
    other.join()
    assert granted.is_set() and budget.used == 1


def test_a_hold_is_given_back_when_the_decode_fails() -> None:
    budget = MemoryBudget(100)
    with pytest.raises(RuntimeError, match="decoder"):
        with budget.holding() as reserve:
            reserve(70)
            raise RuntimeError("decoder broke")
    assert budget.used == 0


@pytest.fixture
def images(tmp_path: Path) -> list[InputItem]:
    items = []
    for index in range(12):
        path = tmp_path / f"{index:02}.png"
        Image.new("RGBA", (64 + index, 48), (index * 20, 90, 200, 128)).save(path)
        items.append(InputItem(str(path)))
    return items


@pytest.mark.parametrize(("cost", "most_at_once"), [(60, 1), (30, 3), (250, 1)])
def test_decoding_threads_share_one_budget(
    images: list[InputItem], monkeypatch: pytest.MonkeyPatch, cost: int, most_at_once: int
) -> None:
    """Every image is said to cost `cost` bytes of a 100-byte budget: however the four threads are
    scheduled, the decodes held at once never add up to more (an image above the budget alone)."""
    budgets: list[MemoryBudget] = []

    class Recorded(MemoryBudget):
        def __init__(self, total: int) -> None:
            super().__init__(total)
            budgets.append(self)

    monkeypatch.setattr(pipeline, "MemoryBudget", Recorded)
    monkeypatch.setattr(transform, "decode_cost", lambda size, mode, draft=None: cost)
    options = DecodeOptions(draft_size=None, memory_budget=100)
    batches = list(
        decoded_batches(
            images, PreprocessConfig(image_size=32), batch_size=4, workers=4, options=options
        )
    )
    decoded = [entry for batch in batches for entry in batch]
    assert [entry.path for entry in decoded] == [item.path for item in images]
    assert all(entry.pixels is not None and entry.pixels.shape == (3, 32, 32) for entry in decoded)
    [budget] = budgets
    assert budget.used == 0
    assert min(cost, 100) <= budget.peak <= min(100, most_at_once * cost)


def test_the_default_budget_is_bounded() -> None:
    budget = pipeline.default_memory_budget()
    assert 256 << 20 <= budget <= 2048 << 20
