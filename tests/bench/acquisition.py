"""The judging queue's choice of items: active against random selection, through the server.

    python -m tests.bench.acquisition --seeds 11 12 13 --traffic 60 --budget 20 --n 6

The embedded default model served on a local Ray cluster (tuning off). For each world seed and
each selection mode, in a namespace of its own: ``--traffic`` train questions of that world are
sent as client traffic (Generate with the gold answer, ``--n`` candidates, logged), then one
simulated annotator takes ``--budget`` items from NextItem with that selection and judges them
with the world's fact critic (``illume.simulate.Simulator``, the code ``illume simulate
--select`` runs). It prints, per seed and mode: fitting candidates found per judgement, the share
of judged items with a fitting candidate, the per-candidate acceptance of the judged items against
that of all the traffic, and how many distinct question types the judgements covered; then the
mean and spread (min-max) over seeds of active minus random.

What this measures is what a judgement yields right away (training rows per judgement) and what
it covers. Whether the rows the active choice yields train a better adapter than as many random
ones needs tuning rounds on both (``illume simulate --select active|random --rounds K``) and is
not measured here. Figures, not assertions; they go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODES = ("active", "random")


def run_mode(client, world_items, seed: int, mode: str, args: argparse.Namespace) -> dict:
    from illume.critics import critic_input
    from illume.selection import question_type
    from illume.simulate import Simulator

    namespace = f"acq-{seed}-{mode}"
    client.declare_namespace(namespace)
    simulator = Simulator(
        client, critic="fact", n=args.n, namespace=namespace, select=mode, log=lambda _: None
    )
    began = time.perf_counter()
    simulator.log_traffic(world_items)
    generated = time.perf_counter() - began
    judged_types: set[str] = set()
    verdicts_all = []
    judged = fitting = with_fit = candidates = 0
    for _ in range(args.budget):
        handed = client.next_item(namespace, selection=mode)
        if not handed.has_item:
            break
        item = simulator.generated[handed.generation.generation_id]
        found = simulator._judge(handed.generation, item, 1)
        judged += 1
        fitting += found
        with_fit += found > 0
        candidates += len(handed.generation.candidates)
        judged_types.add(question_type(item.question))
    # Acceptance of all the traffic, from the store's view of it (the critic on every generation).
    for generation_id, item in simulator.generated.items():
        generation = client.get_generation(generation_id, namespace)
        verdicts_all += [
            v.accepted
            for v in simulator.critic.judge_all([c.text for c in generation.candidates], critic_input(item))
        ]
    return {
        "judged": judged,
        "fitting_per_judgement": fitting / judged if judged else 0.0,
        "items_with_fit": with_fit / judged if judged else 0.0,
        "acceptance_judged": fitting / candidates if candidates else 0.0,
        "acceptance_traffic": sum(verdicts_all) / len(verdicts_all) if verdicts_all else 0.0,
        "question_types": len(judged_types),
        "traffic_s": generated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--traffic", type=int, default=60, help="generations logged per seed and mode")
    parser.add_argument("--budget", type=int, default=20, help="judgements per seed and mode")
    parser.add_argument("--n", type=int, default=6, help="candidates per generation")
    parser.add_argument("--num-cpus", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    from illume.client import IllumeClient
    from illume.data import load_vqax
    from illume.world import build_world
    from services.config import TuningSettings
    from services.local import local_config, local_only_ray, start
    from tests.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="illume-bench-acquisition-"))
    config = local_config(work / "data", None, None)
    config = config.model_copy(update={"tuning": TuningSettings(enabled=False)})
    port = free_port()
    local_only_ray()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results: dict[int, dict[str, dict]] = {}
    try:
        start(config, port, args.num_cpus, dashboard=False, http_port=free_port())
        key = (work / "data" / "keys" / "admin.key").read_text().strip()
        with IllumeClient(f"127.0.0.1:{port}", api_key=key) as client:
            for seed in args.seeds:
                world = work / f"world-{seed}"
                build_world(world, {"train": args.traffic, "val": 0, "test": 0}, seed=seed)
                items = load_vqax(world / "train.json")[: args.traffic]
                results[seed] = {}
                for mode in MODES:
                    results[seed][mode] = row = run_mode(client, items, seed, mode, args)
                    print(f"seed {seed} {mode}: {row}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.traffic} generations of n={args.n} logged, {args.budget} judged, per seed and mode")
    print(
        "| seed | mode | fitting per judgement | judged items with a fit | acceptance of judged "
        "candidates | acceptance of all traffic | question types judged |"
    )
    print("|---|---|---|---|---|---|---|")
    for seed, modes in results.items():
        for mode, r in modes.items():
            print(
                f"| {seed} | {mode} | {r['fitting_per_judgement']:.2f} | {100 * r['items_with_fit']:.0f}% | "
                f"{100 * r['acceptance_judged']:.1f}% | {100 * r['acceptance_traffic']:.1f}% | "
                f"{r['question_types']} |"
            )
    for key in ("fitting_per_judgement", "items_with_fit", "question_types"):
        gains = [modes["active"][key] - modes["random"][key] for modes in results.values()]
        print(
            f"active - random, {key}: mean {statistics.mean(gains):+.3f}, "
            f"min {min(gains):+.3f}, max {max(gains):+.3f} over seeds {list(results)}"
        )


if __name__ == "__main__":
    main()
