"""The architecture matrix, served: every family over real gRPC, through a LoRA round and a hot reload.

Issue 22, Build item 5 (the in-process half is tests/unit/generation/test_architectures.py). For
each family of ``tests/unit/generation/architectures.py`` the module builds the tiny random
checkpoint, deploys the real Serve application (``services.app.build_app``: Ingress, Generator,
FeedbackLog) on it, behind Serve's gRPC proxy on the session's Ray cluster, with an SQLite store
and a local artifact store of the family's own, and then, through the public gRPC API with the
session's API keys:

1. Generate (one request without an answer, one with): the candidates are exactly those of an
   in-process ``Generator`` on the same checkpoint (same request, same seed), labelled "base";
2. SubmitFeedback selects two candidates of each generation (answer correct), and the stored
   generation carries that judgement;
3. one LoRA round (``services.tuner.run_round``: the snapshot from that feedback, training with
   ``max_steps`` 2, the gate as a Ray task, the registry) promotes version 1 (the gate is
   configured to pass every candidate: the store has no held-out split, and ``allow_empty``; the
   gate's decisions are tested elsewhere, this is about the architecture). For the families in
   ``RAY_TRAIN_FAMILIES`` the training is a real Ray Train run of one worker; for the others the
   same trainer body (``services.tuner.train_from_artifacts``: the snapshot fetched from the
   artifact store by URI, ``train_round``) runs in the test's process. Ray Train does nothing
   family-specific with one worker, and its start-up is 25-50 s of each round here; the other
   families save that time (tests/integration/services/test_tuner_rounds.py covers Ray Train's
   resumption and placement);
4. the Generator hot-reloads it: requests on the namespace's default routing are served by
   ``rationale-v1`` within ``RELOAD_TIMEOUT_S``;
5. the served candidates with the new adapter are exactly those of an in-process ``Generator``
   carrying the adapter fetched from the artifact store (same request, same seed), differ from
   the base model's, and ``adapter="base"`` still serves the base model's.

Per-family timings (build, deploy, generate, round, reload, compare) are printed after each
family. The module redeploys the session's application (tests/integration/services/conftest.py)
when it found one running, and deletes its own otherwise.
"""

from __future__ import annotations

import importlib.util
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from illume.adapters import served_name
from illume.adapters.artifacts import open_artifact_store
from illume.evaluation.gate import GateConfig
from illume.generation.generator import GenerateRequest, GenerateResult, Generator, SamplingParams
from illume.images import decode_image
from illume.models import ModelSettings, load_model
from illume.store import AdapterRegistry
from illume.store.settings import StoreSettings
from illume.store.types import RoundRecord
from illume.training.round import TrainConfig, load_adapter_model
from illume.training.snapshot import SnapshotConfig
from services.config import AppConfig, IngressSettings, TuningSettings
from tests.unit.generation.architectures import ARCHITECTURES, Architecture

from .conftest import app_config, client_for, deploy

pytestmark = pytest.mark.slow

NAMESPACE = "default"
RELOAD_TIMEOUT_S = 30.0
# Families whose round trains in a real Ray Train run; the others train in the test's process.
RAY_TRAIN_FAMILIES = frozenset({"llava", "qwen2_vl"})
# The tokenizers' training text (the words of the requests below are in every vocabulary).
TEXTS = [
    "q: what colour is the square? a: red, seeing that the square is red",
    "q: is there a blue circle? a: yes, seeing that there is a blue circle left of the square",
    "q: how many triangles are there? a: 2, seeing that two green triangles are above the circle",
    "the small yellow square is right of the large purple triangle and below the circle",
] * 4
SAMPLING = {"n": 4, "temperatures": (0.5, 1.0), "top_k_fraction": 0.5, "max_new_tokens": 8}
TRAIN = TrainConfig(epochs=1, max_steps=2, batch_size=2, learning_rate=5e-2, seed=0)


@dataclass(frozen=True)
class Ask:
    """One Generate request of the test: an image (colour, width, height), a question, an answer."""

    colour: str
    size: tuple[int, int]
    question: str
    answer: str | None
    seed: int

    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", self.size, self.colour).save(buffer, format="PNG")
        return buffer.getvalue()

    def core(self, adapter: str | None = None) -> GenerateRequest:
        """The same request for an in-process ``Generator`` (the image decoded as the server does)."""
        return GenerateRequest(
            image=decode_image(self.png()),
            question=self.question,
            answer=self.answer,
            adapter=adapter,
            sampling=SamplingParams(**SAMPLING, seed=self.seed),
        )


ASKS = (
    Ask("red", (32, 32), "what colour is the square?", None, 11),
    Ask("blue", (40, 32), "is there a blue circle?", "yes", 12),
)


def _signature(answer: str, answer_generated: bool, candidates) -> tuple:
    """What a reply says: the answer and each candidate but its mean log-probability."""
    return (
        answer,
        answer_generated,
        tuple((c.index, c.text, round(float(c.temperature), 4), c.token_count) for c in candidates),
    )


def served_signature(reply) -> tuple:
    return _signature(reply.answer, reply.answer_generated, reply.candidates)


def local_signature(result: GenerateResult) -> tuple:
    return _signature(result.answer, result.answer_generated, result.candidates)


def assert_same(reply, expected: GenerateResult, what: str) -> None:
    """Candidate for candidate the same; mean log-probabilities up to float32 rounding (1e-4)."""
    assert served_signature(reply) == local_signature(expected), what
    logprobs = [c.mean_logprob for c in reply.candidates]
    assert logprobs == pytest.approx([c.mean_logprob for c in expected.candidates], abs=1e-4), what


def texts(result: GenerateResult) -> tuple[str, ...]:
    return tuple(c.text for c in result.candidates)


# --- the application of one family -------------------------------------------------------------


@dataclass
class Served:
    arch: Architecture
    checkpoint: Path
    config: AppConfig
    port: int
    timings: dict[str, float] = field(default_factory=dict)

    def client(self, role: str):
        return client_for(self.port, role)

    def generate(self, ask: Ask, adapter: str = "", ephemeral: bool = True):
        with self.client("client") as c:
            return c.generate(
                ask.png(),
                ask.question,
                ask.answer,
                seed=ask.seed,
                adapter=adapter,
                ephemeral=ephemeral,
                timeout=120,
                **SAMPLING,
            )


def _param(arch: Architecture):
    missing = [m for m in arch.requires if importlib.util.find_spec(m) is None]
    reason = f"{arch.name} needs {', '.join(missing)} (not installed); see docs/ARCHITECTURES.md"
    return pytest.param(arch, id=arch.name, marks=[pytest.mark.skip(reason=reason)] if missing else [])


@pytest.fixture(scope="module")
def session_app_restored(request, grpc_port):
    """Put the session's application back afterwards if one was running (else remove ours)."""
    from ray import serve

    running = "illume" in serve.status().applications
    yield
    if running:
        deploy(request.getfixturevalue("sqlite_app"))
    else:
        serve.delete("illume")


def family_config(checkpoint: Path, data: Path) -> AppConfig:
    """The session app's settings (keys, batching) with a store, artifacts and tuning of its own."""
    store = StoreSettings(
        url=f"sqlite:///{data / 'feedback.db'}",
        image_dir=data / "images",
        held_out_fraction=0.0,  # every judged generation trains; the gate has nothing to score
    )
    config = app_config(checkpoint, store, adapter_poll_interval_s=0.2)
    return config.model_copy(
        update={
            "artifact_uri": str(data / "artifacts"),
            "shared_filesystem": True,  # one machine
            "ingress": IngressSettings(shutdown_grace_s=2.0),  # the next family replaces it at once
            "tuning": TuningSettings(
                enabled=False,  # the round runs from the test (services.tuner.run_round)
                num_workers=1,
                cpus_per_worker=1,
                schedule_timeout_s=120,
                max_failures=0,
                storage_path=str(data / "ray-train"),
                train=TRAIN,
                snapshot=SnapshotConfig(replay_ratio=1),
                # No held-out items and allow_empty: the gate runs and skips its empty set, so the
                # round promotes deterministically whatever a random model's candidate says.
                gate=GateConfig(min_items=1, allow_empty=True, tokenize=False, max_new_tokens=4),
            ),
        }
    )


@pytest.fixture(scope="module", params=[_param(a) for a in ARCHITECTURES])
def served(request, session_app_restored, grpc_port, tmp_path_factory) -> Served:
    arch: Architecture = request.param
    timings: dict[str, float] = {}
    start = time.perf_counter()
    import torch

    torch.manual_seed(0)
    checkpoint = arch.build(tmp_path_factory.mktemp(f"served-{arch.name}-model"), TEXTS)
    timings["build"] = time.perf_counter() - start
    config = family_config(checkpoint, tmp_path_factory.mktemp(f"served-{arch.name}-data"))
    start = time.perf_counter()
    deploy(config)
    timings["deploy"] = time.perf_counter() - start
    return Served(arch, checkpoint, config, grpc_port, timings)


@pytest.fixture(scope="module")
def base_expected(served) -> list[GenerateResult]:
    """In-process candidates of the base model for each request."""
    generator = Generator(load_model(ModelSettings(path=served.checkpoint)))
    return generator.generate([a.core() for a in ASKS])


@pytest.fixture(scope="module")
def judged(served) -> list:
    """Each request generated once (logged) and two of its candidates selected by the annotator."""
    start = time.perf_counter()
    replies = [served.generate(ask, ephemeral=False) for ask in ASKS]
    served.timings["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    with served.client("annotator") as annotator:
        for k, reply in enumerate(replies):
            fitting = [c.candidate_id for c in reply.candidates[:2]]
            annotator.submit_feedback(
                reply.generation_id,
                fitting=fitting,
                answer_correct=True,
                idempotency_key=f"served-{served.arch.name}-{k}",
                timeout=60,
            )
    served.timings["feedback"] = time.perf_counter() - start
    return replies


def train_in_this_process(config: AppConfig, snapshot_uri: str, round_id: str, out_dir: Path, parent_uri):
    """``services.tuner.train_with_ray``'s contract, with the trainer's body run here."""
    import tempfile

    from services.tuner import train_from_artifacts, train_loop_config

    with tempfile.TemporaryDirectory(prefix="illume-test-trainer-") as work:
        result = train_from_artifacts(
            train_loop_config(config, snapshot_uri, parent_uri), Path(work), out_dir
        )
    return {"final_loss": result.final_loss, "steps": result.steps}


@pytest.fixture(scope="module")
def promoted(served, judged) -> RoundRecord:
    """One round from that feedback, then the first served reply of its adapter (hot reload)."""
    from services import tuner

    registry = AdapterRegistry.open(served.config.feedback_log.store)
    try:
        record = registry.create_round(NAMESPACE, "pending")
    finally:
        registry.close()
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        if served.arch.name not in RAY_TRAIN_FAMILIES:
            patch.setattr(tuner, "train_with_ray", train_in_this_process)
        final = tuner.run_round(served.config, NAMESPACE, record.round_id)
    served.timings["round"] = time.perf_counter() - start
    for phase, seconds in (final.scores or {}).get("timings", {}).items():
        served.timings[f"round.{phase.removesuffix('_s')}"] = seconds
    return final


@pytest.fixture(scope="module")
def reloaded(served, promoted) -> str:
    """The version label the namespace's default routing serves once the round's adapter is in."""
    assert promoted.state == "promoted", promoted.reason
    start = time.perf_counter()
    want = f"rationale-v{promoted.adapter_version}"
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    label = served.generate(ASKS[0]).adapter_version
    while label != want and time.monotonic() < deadline:
        time.sleep(0.2)
        label = served.generate(ASKS[0]).adapter_version
    served.timings["reload"] = time.perf_counter() - start
    return label


@pytest.fixture(scope="module")
def adapter_expected(served, promoted, tmp_path_factory) -> list[GenerateResult]:
    """In-process candidates with the promoted adapter, fetched from the artifact store."""
    registry = AdapterRegistry.open(served.config.feedback_log.store)
    try:
        record = registry.get(NAMESPACE, "production")
    finally:
        registry.close()
    assert record.version == promoted.adapter_version
    local = tmp_path_factory.mktemp(f"served-{served.arch.name}-adapter") / "adapter"
    open_artifact_store(served.config.artifact_uri).get_dir(record.artifact_uri, local)
    name = served_name(NAMESPACE, record.version)
    loaded = load_model(ModelSettings(path=served.checkpoint))
    loaded.model = load_adapter_model(loaded.model, local, adapter_name=name)
    loaded.model.eval()
    generator = Generator(loaded)
    return generator.generate([a.core(name) for a in ASKS])


# --- the tests, in the order a user goes --------------------------------------------------------


def test_served_generate_is_the_in_process_base_model(served, judged, base_expected):
    for ask, reply, expected in zip(ASKS, judged, base_expected, strict=True):
        assert reply.adapter_version == "base" and reply.generation_id
        assert reply.answer_generated == (ask.answer is None)
        assert len(reply.candidates) >= 1
        assert_same(reply, expected, ask.question)


def test_feedback_selecting_candidates_is_stored(served, judged):
    with served.client("admin") as admin:
        for reply in judged:
            stored = admin.get_generation(reply.generation_id, timeout=60)
            [judgement] = stored.judgements
            assert list(judgement.fitting_candidate_ids) == [c.candidate_id for c in reply.candidates[:2]]


def test_one_round_promotes_and_is_hot_reloaded(served, promoted, reloaded):
    assert promoted.state == "promoted", promoted.reason
    assert promoted.adapter_version == 1 and promoted.rationale_rows >= 2
    assert promoted.scores["train"]["steps"] == TRAIN.max_steps
    assert reloaded == "rationale-v1", f"not served within {RELOAD_TIMEOUT_S}s"
    with served.client("admin") as admin:
        assert "production" in admin.get_adapter("rationale-v1", timeout=30).aliases


def test_served_adapter_is_the_in_process_adapter_and_not_the_base(
    served, reloaded, adapter_expected, base_expected, capsys
):
    start = time.perf_counter()
    tuned = [served.generate(ask) for ask in ASKS]
    base = [served.generate(ask, adapter="base") for ask in ASKS]
    served.timings["compare"] = time.perf_counter() - start
    for ask, reply, expected in zip(ASKS, tuned, adapter_expected, strict=True):
        assert reply.adapter_version == "rationale-v1"
        assert_same(reply, expected, ask.question)
    for ask, reply, expected in zip(ASKS, base, base_expected, strict=True):
        assert reply.adapter_version == "base"
        assert_same(reply, expected, ask.question)
    # The round's adapter changes what is generated (the candidates' texts, not only log-probs).
    assert [texts(r) for r in adapter_expected] != [texts(r) for r in base_expected]
    with capsys.disabled():
        total = sum(v for k, v in served.timings.items() if "." not in k)
        parts = " ".join(f"{k}={v:.1f}s" for k, v in served.timings.items())
        print(f"\n[served architecture] {served.arch.name}: {parts} total={total:.1f}s")
