"""The decode memory budget on its own: bytes and large-image slots, waits bounded by the deadline."""
from __future__ import annotations

import asyncio

import pytest

from tuneserve.service.engine.decode_budget import LARGE_BYTES, DecodeBudget, DecodeBudgetExceeded

MB = 2**20


def test_large_images_take_turns_and_ordinary_ones_pass_them():
    async def main() -> list[str]:
        budget = DecodeBudget(total_bytes=1024 * MB, threads=2)  # one large-image slot
        order: list[str] = []

        async def decode(name: str, nbytes: int, seconds: float) -> None:
            async with budget.reserve(nbytes, timeout_s=5):
                order.append(f"{name} start")
                await asyncio.sleep(seconds)
            order.append(f"{name} end")

        big = 2 * LARGE_BYTES
        first = asyncio.create_task(decode("big1", big, 0.1))
        await asyncio.sleep(0)
        second = asyncio.create_task(decode("big2", big, 0.1))  # waits for the slot
        await asyncio.sleep(0)
        await decode("small", MB, 0.0)  # not held up by big2 waiting
        await asyncio.gather(first, second)
        assert budget.used == 0 and budget.large == 0
        return order

    order = asyncio.run(main())
    assert order.index("small end") < order.index("big1 end") < order.index("big2 start")


def test_waiting_past_the_deadline_is_refused_and_frees_its_place():
    async def main() -> None:
        budget = DecodeBudget(total_bytes=100 * MB, threads=4)
        async with budget.reserve(80 * MB, timeout_s=1):
            with pytest.raises(DecodeBudgetExceeded, match="80 of 100 MiB in use"):
                async with budget.reserve(50 * MB, timeout_s=0.05):
                    pass
            assert not budget._waiters
        async with budget.reserve(50 * MB, timeout_s=0.05):  # fits once the first is done
            assert budget.used == 50 * MB

    asyncio.run(main())


def test_a_lone_image_over_the_whole_budget_still_decodes():
    async def main() -> None:
        budget = DecodeBudget(total_bytes=10 * MB, threads=1)
        async with budget.reserve(30 * MB, timeout_s=0.05):
            assert budget.used == 30 * MB

    asyncio.run(main())
