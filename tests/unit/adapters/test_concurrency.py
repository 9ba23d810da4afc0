"""Hot swaps while generating: a thread generating in a loop never sees a half-installed adapter."""

from __future__ import annotations

import threading
import time

import torch

from illume.adapters.cache import AdapterCache

from .conftest import make_request, signature

LOOP_LIMIT_S = 30.0


def _generate_loop(generator, requests, expected, stop: threading.Event, report: dict) -> None:
    deadline = time.monotonic() + LOOP_LIMIT_S
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            got = [signature(r) for r in generator.generate(requests)]
            report["runs"] += 1
            if got != expected:
                report["mismatches"] += 1
    except BaseException as exc:  # reported to the main thread
        report["error"] = exc


def _run_concurrently(generator, requests, swaps) -> dict:
    expected = [signature(r) for r in generator.generate(requests)]
    stop = threading.Event()
    report = {"runs": 0, "mismatches": 0, "error": None}
    worker = threading.Thread(target=_generate_loop, args=(generator, requests, expected, stop, report))
    worker.start()
    try:
        while report["runs"] < 1 and worker.is_alive():  # the loop is really running
            time.sleep(0.01)
        swaps()
        runs_at_end = report["runs"]
        while report["runs"] < runs_at_end + 1 and worker.is_alive():  # and still runs afterwards
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join(LOOP_LIMIT_S)
    assert report["error"] is None, repr(report["error"])
    assert report["mismatches"] == 0
    assert report["runs"] >= 2
    return report


def test_generating_while_adapters_are_installed_and_evicted(
    generator, adapter_store, adapters, images, tmp_path
):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _phases(generator, adapter_store, adapters, images, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _phases(generator, adapter_store, adapters, images, tmp_path):
    cache = AdapterCache(generator, adapter_store, capacity=2, work_dir=tmp_path / "cache")
    v1, v2, v3, v4 = (adapters[f"rationale-v{i}"] for i in (1, 2, 3, 4))

    # Phase 1: the base model serves while the first adapter wraps the model and others come and go
    # (evicting the last one unwraps it again).
    base_only = [make_request(images[0]), make_request(images[1], seed=3)]

    def churn_from_plain():
        for _ in range(2):
            for stored in (v1, v2, v3):
                cache.ensure(stored.name, stored.uri, stored.manifest)
            for name in cache.loaded():
                cache.evict(name)

    report = _run_concurrently(generator, base_only, churn_from_plain)
    print("phase 1 runs", report["runs"])
    assert generator.adapter_names() == []

    # Phase 2: production (v1) serves, pinned, while other versions are installed and evicted by LRU.
    cache.ensure(v1.name, v1.uri, v1.manifest)
    mixed = [
        make_request(images[0], adapter=v1.name),
        make_request(images[1]),
        make_request(images[2], v1.name),
    ]

    def churn_beside_production():
        for _ in range(2):
            for stored in (v2, v3, v4):
                cache.ensure(stored.name, stored.uri, stored.manifest, pinned={v1.name})
        cache.evict(v4.name)

    report = _run_concurrently(generator, mixed, churn_beside_production)
    print("phase 2 runs", report["runs"])
    assert v1.name in generator.adapter_names()
