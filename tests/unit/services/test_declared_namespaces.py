"""DeclaredNamespaces (services/servicers/base.py): the namespace guard's cache of declared names."""

from __future__ import annotations

import asyncio
import threading
import time

from services.servicers.base import DeclaredNamespaces


def test_a_burst_of_first_calls_waits_for_the_one_read():
    reads = []
    release = threading.Event()

    def load() -> frozenset[str]:
        reads.append(1)
        release.wait(5)  # the store answers only once every caller has asked
        return frozenset({"default"})

    async def burst() -> list[bool]:
        declared = DeclaredNamespaces(load, refresh_s=60)
        calls = [asyncio.ensure_future(declared.contains("default")) for _ in range(20)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*calls)

    assert asyncio.run(burst()) == [True] * 20
    assert len(reads) == 1


def test_an_undeclared_name_is_read_again_only_after_refresh():
    names = {"default"}
    reads = []

    def load() -> frozenset[str]:
        reads.append(time.monotonic())
        return frozenset(names)

    async def calls() -> tuple[bool, bool, bool]:
        declared = DeclaredNamespaces(load, refresh_s=0.2)
        first = await declared.contains("tenant")
        names.add("tenant")
        cached = await declared.contains("tenant")  # within refresh_s: not read again
        await asyncio.sleep(0.25)
        return first, cached, await declared.contains("tenant")

    assert asyncio.run(calls()) == (False, False, True)
    assert len(reads) == 2
