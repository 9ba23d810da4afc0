"""The annotation web app (services/web.py) over a fake RPC gateway, without Ray.

The fake implements ``call_rpc`` over in-memory generations and keys, enforcing roles and
namespaces the way the Ingress does, and records every request it received, so each test can say
exactly which RPCs a page made (and that a refused form made none). The real server and a real
browser are tests/integration/services/test_web_browser.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from illume.v1 import illume_pb2 as pb
from services.config import WebSettings
from services.web import RpcFailed, create_web_app
from services.web_plot import ordered_versions, quality_plot_svg
from services.web_session import SESSION_COOKIE, SessionSecret

KEYS = {
    "annotator-key": ("ann-1", "annotator", ["default", "tenant-a"]),
    "admin-key": ("ops", "admin", ["default"]),
    "client-key": ("app", "client", ["default"]),
    "tenant-b-key": ("ann-b", "annotator", ["tenant-b"]),
}
ROLE_NEEDED = {
    "WhoAmI": "client",
    "NextItem": "annotator",
    "GetImage": "annotator",
    "GetGeneration": "annotator",
    "SubmitFeedback": "annotator",
    "GetFeedbackStats": "annotator",
}
RANK = {"client": 0, "annotator": 1, "admin": 2}
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
XSS = "<script>alert(1)</script>"


def _generation(gid: str, namespace: str, question: str, texts: list[str], sha: str) -> pb.Generation:
    return pb.Generation(
        generation_id=gid,
        namespace=namespace,
        image_sha256=sha,
        question=question,
        answer="red",
        answer_generated=True,
        adapter_version="base",
        candidates=[pb.Candidate(candidate_id=f"{gid}-c{i}", index=i, text=t) for i, t in enumerate(texts)],
    )


class FakeGateway:
    """The Ingress's ``call_rpc`` over memory: the same guard order (key, role, namespace)."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.calls: list[tuple[str, Any, str]] = []
        self.generations: dict[str, pb.Generation] = {}
        self.images: dict[tuple[str, str], bytes] = {}
        self.handed: dict[str, set[str]] = {}
        self.receipts: dict[tuple[str, str], tuple[bytes, pb.SubmitFeedbackResponse]] = {}
        self.revisions: dict[tuple[str, str], int] = {}
        self.fail: dict[str, RpcFailed] = {}
        self.by_adapter = [
            pb.AdapterFeedbackStats(
                adapter_version="2",
                generations=10,
                judged_candidates=20,
                accepted_candidates=15,
                answers_judged=10,
                answers_correct=9,
                first_generation_at="2026-01-03T00:00:00Z",
            ),
            pb.AdapterFeedbackStats(
                adapter_version="base",
                generations=10,
                judged_candidates=40,
                accepted_candidates=10,
                answers_judged=10,
                answers_correct=7,
                first_generation_at="2026-01-01T00:00:00Z",
            ),
            pb.AdapterFeedbackStats(
                adapter_version="1",
                generations=10,
                judged_candidates=30,
                accepted_candidates=15,
                answers_judged=10,
                answers_correct=8,
                first_generation_at="2026-01-02T00:00:00Z",
            ),
        ]

    def add(self, generation: pb.Generation, image: bytes = PNG) -> pb.Generation:
        self.generations[generation.generation_id] = generation
        self.images[(generation.namespace, generation.image_sha256)] = image
        return generation

    def methods(self, name: str) -> list[Any]:
        return [request for method, request, _ in self.calls if method == name]

    async def call_rpc(self, method: str, request: Any, api_key: str) -> Any:
        self.calls.append((method, copy.deepcopy(request), api_key))
        if api_key not in KEYS or api_key in self.revoked:
            raise RpcFailed("UNAUTHENTICATED", "unknown API key")
        principal, role, namespaces = KEYS[api_key]
        if RANK[role] < RANK[ROLE_NEEDED.get(method, "admin")]:
            raise RpcFailed("PERMISSION_DENIED", f"{method} needs another role than {role}")
        if "namespace" in request.DESCRIPTOR.fields_by_name:
            namespace = request.namespace or "default"
            if namespace not in namespaces:
                raise RpcFailed("PERMISSION_DENIED", f"this key may not use namespace {namespace!r}")
        if method in self.fail:
            raise self.fail.pop(method)
        return getattr(self, method)(request, principal, role, namespaces)

    # the RPCs

    def WhoAmI(self, request: Any, principal: str, role: str, namespaces: list[str]) -> Any:
        return pb.WhoAmIResponse(principal=principal, role=role, namespaces=namespaces, key_id="abcd1234")

    def NextItem(self, request: Any, principal: str, *_: Any) -> Any:
        handed = self.handed.setdefault(principal, set())
        for gid, generation in self.generations.items():
            if generation.namespace == request.namespace and gid not in handed:
                handed.add(gid)
                return pb.NextItemResponse(has_item=True, generation=generation, reason="active", remaining=0)
        return pb.NextItemResponse(has_item=False)

    def GetGeneration(self, request: Any, *_: Any) -> Any:
        generation = self.generations.get(request.generation_id)
        if generation is None or generation.namespace != request.namespace:
            raise RpcFailed("NOT_FOUND", f"no generation {request.generation_id}")
        return generation

    def GetImage(self, request: Any, *_: Any) -> Any:
        image = self.images.get((request.namespace, request.image_sha256))
        if image is None:
            raise RpcFailed("NOT_FOUND", "no such image in this namespace")
        return pb.GetImageResponse(image=image, media_type="image/png")

    def SubmitFeedback(self, request: Any, principal: str, *_: Any) -> Any:
        body = request.SerializeToString(deterministic=True)
        stored = self.receipts.get((request.namespace, request.idempotency_key))
        if stored is not None:
            if stored[0] != body:
                raise RpcFailed("ALREADY_EXISTS", "idempotency key reused with another body")
            return pb.SubmitFeedbackResponse(
                feedback_id=stored[1].feedback_id, duplicate=True, revision=stored[1].revision
            )
        if request.generation_id not in self.generations:
            raise RpcFailed("NOT_FOUND", "unknown generation")
        revision = self.revisions.get((request.generation_id, principal), 0) + 1
        self.revisions[(request.generation_id, principal)] = revision
        reply = pb.SubmitFeedbackResponse(feedback_id=f"f{len(self.receipts)}", revision=revision)
        self.receipts[(request.namespace, request.idempotency_key)] = (body, reply)
        return reply

    def GetFeedbackStats(self, request: Any, *_: Any) -> Any:
        return pb.FeedbackStats(
            namespace=request.namespace, generations=30, feedback=12, selected=7, none_fit=3, skipped=2,
            held_out_generations=4, by_adapter=self.by_adapter,
        )  # fmt: skip

    def ListTuningRounds(self, request: Any, *_: Any) -> Any:
        return pb.ListTuningRoundsResponse(
            rounds=[pb.TuningRound(round_id="r-1", state="rejected", reason=f"gate said no {XSS}")]
        )

    def ListAdapters(self, request: Any, *_: Any) -> Any:
        return pb.ListAdaptersResponse(
            adapters=[
                pb.Adapter(version=2, name="rationale-v2", aliases=["canary"], state="registered"),
                pb.Adapter(version=1, name="rationale-v1", aliases=["production"], state="registered"),
            ]
        )

    def ListAnnotators(self, request: Any, *_: Any) -> Any:
        return pb.ListAnnotatorsResponse(
            annotators=[
                pb.Annotator(annotator_id="ann-1", judgements=12, overlap_items=6, kappa=0.7, agreement=0.9),
                pb.Annotator(
                    annotator_id="<b>bad</b>", judgements=9, overlap_items=6, kappa=0.05, agreement=0.5,
                    flagged=True, flag_reason="kappa 0.050 < 0.2 on 6 overlap items",
                ),
            ],
            flag_below_kappa=0.2, min_overlap_items=5, min_annotators=2,
        )  # fmt: skip

    def PromoteAdapter(self, request: Any, *_: Any) -> Any:
        return pb.Adapter(version=int(request.adapter), aliases=[request.alias or "production"])

    def RollbackAdapter(self, request: Any, *_: Any) -> Any:
        return pb.Adapter(version=1, aliases=["production"])

    def StartTuningRound(self, request: Any, *_: Any) -> Any:
        raise RpcFailed("FAILED_PRECONDITION", "nothing new to train on")

    def ClearAnnotatorFlag(self, request: Any, *_: Any) -> Any:
        return pb.ClearAnnotatorFlagResponse(cleared=True, annotator_id=request.annotator_id)


# -- helpers ---------------------------------------------------------------------------------------


def field_value(page: str, name: str) -> str:
    match = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', page)
    assert match, f"no field {name} on the page"
    return match.group(1)


def sign_in(client: TestClient, key: str) -> Any:
    token = field_value(client.get("/sign-in").text, "csrf_token")
    return client.post("/sign-in", data={"api_key": key, "csrf_token": token}, follow_redirects=False)


def judging_form(page: str) -> dict[str, str]:
    return {
        name: field_value(page, name)
        for name in ("csrf_token", "namespace", "generation_id", "idempotency_key")
    }


@pytest.fixture
def gateway() -> FakeGateway:
    fake = FakeGateway()
    fake.add(
        _generation("g1", "default", "What colour is the car?", ["it is red", "paint", "the sky"], "a" * 64)
    )
    fake.add(_generation("g2", "default", XSS, ["<img src=x onerror=alert(2)>", "plain"], "b" * 64))
    fake.add(_generation("gb", "tenant-b", "Tenant B's question", ["b0", "b1"], "c" * 64))
    return fake


@pytest.fixture
def settings() -> WebSettings:
    return WebSettings(sign_in_attempts_per_minute=5, session_ttl_s=3600)


@pytest.fixture
def client(gateway: FakeGateway, settings: WebSettings) -> Iterator[TestClient]:
    with TestClient(create_web_app(gateway, settings)) as test_client:
        yield test_client


@pytest.fixture
def annotator(client: TestClient) -> TestClient:
    assert sign_in(client, "annotator-key").status_code == 303
    return client


# -- sign-in and sessions --------------------------------------------------------------------------


def test_sign_in_sets_a_strict_http_only_session_cookie(client: TestClient, gateway: FakeGateway) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/sign-in"
    reply = sign_in(client, "annotator-key")
    assert reply.status_code == 303 and reply.headers["location"] == "/judge"
    cookie = next(c for c in reply.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/" and attributes["max-age"] == "Max-Age=3600"
    assert "secure" not in attributes
    assert "annotator-key" not in cookie  # the key travels encrypted only
    assert [request for method, request, _ in gateway.calls if method == "WhoAmI"]
    page = client.get("/judge")
    assert page.status_code == 200 and "ann-1" in page.text


def test_secure_cookie_when_configured(gateway: FakeGateway) -> None:
    app = create_web_app(gateway, WebSettings(cookie_secure=True))
    with TestClient(app, base_url="https://testserver") as client:
        token = field_value(client.get("/sign-in").text, "csrf_token")
        reply = client.post(
            "/sign-in", data={"api_key": "admin-key", "csrf_token": token}, follow_redirects=False
        )
        cookie = next(c for c in reply.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
        assert "secure" in cookie.lower()


def test_unknown_key_is_401_and_client_key_is_403(client: TestClient) -> None:
    unknown = sign_in(client, "no-such-key")
    assert unknown.status_code == 401 and "unknown or revoked key" in unknown.text
    assert SESSION_COOKIE not in unknown.cookies
    client_key = sign_in(client, "client-key")
    assert client_key.status_code == 403
    assert "client keys cannot sign in to the annotation app" in client_key.text


def test_sign_in_is_rate_limited_per_address(client: TestClient) -> None:
    statuses = [sign_in(client, "no-such-key").status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    limited = sign_in(client, "annotator-key")  # even the right key waits
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


def test_rate_limit_counts_per_forwarded_address_behind_a_trusted_proxy(gateway: FakeGateway) -> None:
    app = create_web_app(gateway, WebSettings(sign_in_attempts_per_minute=1, forwarded_for_hops=1))
    with TestClient(app) as client:

        def attempt(forwarded: str) -> int:
            token = field_value(client.get("/sign-in").text, "csrf_token")
            headers = {"x-forwarded-for": forwarded}
            return client.post(
                "/sign-in", data={"api_key": "nope", "csrf_token": token}, headers=headers
            ).status_code

        # The proxy appends the real peer; what the client put further left is not trusted.
        assert attempt("10.0.0.1") == 401
        assert attempt("10.0.0.2") == 401
        assert attempt("1.2.3.4, 10.0.0.1") == 429


def test_sign_in_form_needs_its_csrf_token(client: TestClient, gateway: FakeGateway) -> None:
    client.get("/sign-in")
    reply = client.post("/sign-in", data={"api_key": "annotator-key"}, follow_redirects=False)
    assert reply.status_code == 403 and "missing or invalid CSRF token" in reply.text
    fresh = TestClient(client.app)  # no pre-session cookie: a token of another browser is refused
    token = field_value(client.get("/sign-in").text, "csrf_token")
    assert fresh.post("/sign-in", data={"api_key": "annotator-key", "csrf_token": token}).status_code == 403
    assert not gateway.methods("WhoAmI")


def test_a_forged_expired_or_foreign_cookie_signs_out(gateway: FakeGateway, settings: WebSettings) -> None:
    forged = TestClient(create_web_app(gateway, settings), cookies={SESSION_COOKIE: "gAAAAA-not-a-session"})
    reply = forged.get("/judge", follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/sign-in?reason=expired"
    short = TestClient(create_web_app(gateway, settings.model_copy(update={"session_ttl_s": 1e-3})))
    assert sign_in(short, "annotator-key").status_code == 303
    assert short.get("/judge", follow_redirects=False).headers["location"] == "/sign-in?reason=expired"
    # Another app (another secret) cannot read a session cookie of this one.
    mine = TestClient(create_web_app(gateway, settings))
    sign_in(mine, "annotator-key")
    other = TestClient(
        create_web_app(gateway, settings), cookies={SESSION_COOKIE: mine.cookies[SESSION_COOKIE]}
    )
    assert mine.get("/judge").status_code == 200
    assert other.get("/judge", follow_redirects=False).status_code == 303


def test_session_secret_file_must_hold_32_bytes(tmp_path: Path, gateway: FakeGateway) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    with pytest.raises(ValueError, match="at least 32"):
        create_web_app(gateway, WebSettings(session_secret_file=short))
    with pytest.raises(ValueError, match="cannot read"):
        create_web_app(gateway, WebSettings(session_secret_file=tmp_path / "absent"))
    good = tmp_path / "good"
    good.write_bytes(b"s" * 32)
    # The same secret in two replicas: a session made by one is read by the other.
    first = TestClient(create_web_app(gateway, WebSettings(session_secret_file=good)))
    sign_in(first, "annotator-key")
    second = TestClient(create_web_app(gateway, WebSettings(session_secret_file=good)))
    second.cookies.set(SESSION_COOKIE, first.cookies[SESSION_COOKIE])
    assert second.get("/judge").status_code == 200


def test_revoked_key_ends_the_session(annotator: TestClient, gateway: FakeGateway) -> None:
    gateway.revoked.add("annotator-key")
    reply = annotator.get("/judge", follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/sign-in?reason=revoked"
    cleared = next(c for c in reply.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
    assert 'illume_session=""' in cleared and "Max-Age=0" in cleared
    assert "your key was revoked or expired" in annotator.get("/sign-in?reason=revoked").text
    assert SESSION_COOKIE not in annotator.cookies


def test_sign_out_clears_the_cookie(annotator: TestClient) -> None:
    token = field_value(annotator.get("/judge").text, "csrf_token")
    assert annotator.post("/sign-out", data={}).status_code == 403  # CSRF applies here too
    reply = annotator.post("/sign-out", data={"csrf_token": token}, follow_redirects=False)
    assert reply.status_code == 303 and SESSION_COOKIE not in annotator.cookies


# -- judging ---------------------------------------------------------------------------------------


def test_pages_carry_the_security_headers(annotator: TestClient) -> None:
    page = annotator.get("/judge")
    assert page.headers["content-security-policy"] == (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
    for asset in ("/assets/illume.js", "/assets/illume.css"):
        reply = annotator.get(asset)
        assert reply.status_code == 200 and reply.content
    assert annotator.get("/assets/../web.py").status_code == 404


def test_judging_page_shows_the_item_and_the_keys(annotator: TestClient, gateway: FakeGateway) -> None:
    page = annotator.get("/judge").text
    assert "What colour is the car?" in page and 'src="/images/' + "a" * 64 + '?namespace=default"' in page
    assert "the model&#x27;s answer" in page
    for key, cid in (("1", "g1-c0"), ("2", "g1-c1"), ("3", "g1-c2")):
        assert re.search(rf'value="{cid}" id="fit-\d"><kbd>{key}</kbd>', page)
    for documented in ("R then 1-4", "Enter", "Esc", ">U<", ">N<", ">S<", ">A<", ">C<"):
        assert documented in page
    # A reload shows the same item: it is not handed out a second time.
    again = annotator.get("/judge").text
    assert field_value(again, "generation_id") == "g1" and len(gateway.methods("NextItem")) == 1


def test_judging_post_sends_the_right_feedback(annotator: TestClient, gateway: FakeGateway) -> None:
    form = judging_form(annotator.get("/judge").text)
    body = {
        **form,
        "fitting": ["g1-c0", "g1-c2"],
        "rating.g1-c1": "3",
        "rating.g1-c0": "",
        "answer_wrong": "1",
        "correction": "  it is a red sports car ",
        "verdict": "submit",
    }
    reply = annotator.post("/judge/submit", data=body, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/judge?namespace=default"
    (sent,) = gateway.methods("SubmitFeedback")
    assert sent.verdict == pb.VERDICT_SELECTED and sent.generation_id == "g1" and sent.namespace == "default"
    assert list(sent.fitting_candidate_ids) == ["g1-c0", "g1-c2"]
    assert [(r.candidate_id, r.rating) for r in sent.ratings] == [("g1-c1", 3)]
    assert sent.HasField("answer_correct") and sent.answer_correct is False
    assert sent.corrected_rationale == "it is a red sports car"
    assert sent.idempotency_key == form["idempotency_key"]
    # A double submit of the same form is the same judgement.
    annotator.post("/judge/submit", data=body, follow_redirects=False)
    first, repeat = gateway.methods("SubmitFeedback")
    assert repeat.idempotency_key == first.idempotency_key and repeat == first
    assert "already saved" in annotator.get("/judge").text
    # The next item comes after the submission.
    assert field_value(annotator.get("/judge").text, "generation_id") == "g2"


@pytest.mark.parametrize(
    ("extra", "verdict", "fitting"),
    [
        ({"verdict": "submit"}, pb.VERDICT_NONE_FIT, []),  # Enter with nothing checked
        ({"verdict": "none_fit", "fitting": "g1-c0"}, pb.VERDICT_NONE_FIT, []),  # N drops the checks
        ({"verdict": "skipped", "fitting": "g1-c0", "rating.g1-c0": "2"}, pb.VERDICT_SKIPPED, []),
    ],
)
def test_none_fit_and_skip(
    annotator: TestClient, gateway: FakeGateway, extra: dict, verdict: int, fitting: list
) -> None:
    form = judging_form(annotator.get("/judge").text)
    assert annotator.post("/judge/submit", data={**form, **extra}, follow_redirects=False).status_code == 303
    (sent,) = gateway.methods("SubmitFeedback")
    assert sent.verdict == verdict and list(sent.fitting_candidate_ids) == fitting
    if verdict == pb.VERDICT_SKIPPED:
        assert not sent.HasField("answer_correct") and not sent.ratings
    else:
        assert sent.answer_correct is True  # "answer is wrong" left unchecked


@pytest.mark.parametrize("token", [None, "", "0" * 64])
def test_post_without_a_valid_csrf_token_is_refused(
    annotator: TestClient, gateway: FakeGateway, token: str | None
) -> None:
    form = judging_form(annotator.get("/judge").text)
    form.pop("csrf_token")
    if token is not None:
        form["csrf_token"] = token
    for path in ("/judge/submit", "/judge/undo"):
        reply = annotator.post(path, data={**form, "fitting": "g1-c0"}, follow_redirects=False)
        assert reply.status_code == 403 and "missing or invalid CSRF token" in reply.text
    assert not gateway.methods("SubmitFeedback")


def test_cross_site_post_is_refused_even_with_the_token(annotator: TestClient, gateway: FakeGateway) -> None:
    form = judging_form(annotator.get("/judge").text)
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}):
        reply = annotator.post("/judge/submit", data=form, headers=headers, follow_redirects=False)
        assert reply.status_code == 403
    same = annotator.post(
        "/judge/submit", data=form, headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
        follow_redirects=False,
    )  # fmt: skip
    assert same.status_code == 303 and len(gateway.methods("SubmitFeedback")) == 1


def test_undo_stores_a_skipped_revision_and_shows_the_item_again(
    annotator: TestClient, gateway: FakeGateway
) -> None:
    form = judging_form(annotator.get("/judge").text)
    annotator.post("/judge/submit", data={**form, "fitting": "g1-c1"})  # now on g2
    undo_token = field_value(annotator.get("/judge").text, "csrf_token")
    reply = annotator.post("/judge/undo", data={"csrf_token": undo_token}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/judge?namespace=default"
    judged, undone = gateway.methods("SubmitFeedback")
    assert (
        undone.verdict == pb.VERDICT_SKIPPED
        and undone.generation_id == "g1"
        and not undone.fitting_candidate_ids
    )
    assert undone.idempotency_key == f"undo-{judged.idempotency_key}"
    assert gateway.revisions[("g1", "ann-1")] == 2
    page = annotator.get("/judge").text
    assert field_value(page, "generation_id") == "g1" and "Withdrew your last judgement" in page
    assert gateway.methods("GetGeneration")  # shown again from the store, not handed out anew
    assert 'id="undo-form"' not in page  # one level of undo
    annotator.post("/judge/undo", data={"csrf_token": undo_token})
    assert len(gateway.methods("SubmitFeedback")) == 2
    # Judging it anew stores one more revision; then g2, which was handed out before, comes back.
    again = judging_form(page)
    annotator.post("/judge/submit", data={**again, "verdict": "none_fit"})
    assert gateway.revisions[("g1", "ann-1")] == 3
    assert field_value(annotator.get("/judge").text, "generation_id") == "g2"


def test_markup_from_users_and_models_renders_as_text(annotator: TestClient, gateway: FakeGateway) -> None:
    form = judging_form(annotator.get("/judge").text)
    annotator.post("/judge/submit", data={**form, "verdict": "skipped"})
    page = annotator.get("/judge").text
    assert field_value(page, "generation_id") == "g2"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and XSS not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "<img src=x" not in page


def test_nothing_left_page(annotator: TestClient) -> None:
    page = annotator.get("/judge?namespace=tenant-a")
    assert page.status_code == 200 and "Nothing left to judge in tenant-a" in page.text


def test_another_namespace_is_refused_by_the_rpc(client: TestClient, gateway: FakeGateway) -> None:
    sign_in(client, "tenant-b-key")
    page = client.get("/judge")  # the key's only namespace is the default choice
    assert field_value(page.text, "generation_id") == "gb"
    refused = client.get("/judge?namespace=default")
    assert refused.status_code == 403 and "may not use namespace" in refused.text
    assert client.get("/images/" + "a" * 64 + "?namespace=default").status_code == 403
    assert client.get("/images/" + "a" * 64 + "?namespace=tenant-b").status_code == 404
    assert client.get("/judge?namespace=bad name!").status_code == 400


def test_images(annotator: TestClient) -> None:
    reply = annotator.get("/images/" + "a" * 64 + "?namespace=default")
    assert reply.status_code == 200 and reply.content == PNG
    assert reply.headers["content-type"] == "image/png" and reply.headers["cache-control"].startswith(
        "private"
    )
    missing = annotator.get("/images/" + "f" * 64 + "?namespace=default")
    assert missing.status_code == 404 and "Traceback" not in missing.text
    assert annotator.get("/images/not-a-sha").status_code == 404
    annotator.cookies.clear()
    assert annotator.get("/images/" + "a" * 64).status_code == 401


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("PERMISSION_DENIED", 403),
        ("NOT_FOUND", 404),
        ("INVALID_ARGUMENT", 400),
        ("RESOURCE_EXHAUSTED", 429),
        ("UNAVAILABLE", 503),
        ("FAILED_PRECONDITION", 409),
        ("INTERNAL", 500),
    ],
)
def test_rpc_errors_become_pages_with_the_reason(
    annotator: TestClient, gateway: FakeGateway, code: str, status: int
) -> None:
    gateway.fail["NextItem"] = RpcFailed(code, f"one line about {code}\nsecond line")
    page = annotator.get("/judge")
    assert page.status_code == status and f"one line about {code}" in page.text
    assert "second line" not in page.text


def test_an_unexpected_error_is_a_500_without_a_trace(annotator: TestClient, gateway: FakeGateway) -> None:
    gateway.fail["NextItem"] = ZeroDivisionError("secret detail")  # type: ignore[assignment]
    with TestClient(annotator.app, cookies=annotator.cookies) as client:  # nothing escapes the app
        page = client.get("/judge")
    assert page.status_code == 500 and "secret detail" not in page.text and "Traceback" not in page.text


def test_forms_are_bounded(annotator: TestClient, gateway: FakeGateway) -> None:
    form = judging_form(annotator.get("/judge").text)
    reply = annotator.post("/judge/submit", data={**form, "correction": "x" * 70_000})
    assert reply.status_code == 413 and not gateway.methods("SubmitFeedback")


# -- admin -----------------------------------------------------------------------------------------


def test_admin_page_needs_an_admin(annotator: TestClient) -> None:
    reply = annotator.get("/admin")
    assert reply.status_code == 403 and "needs an admin key" in reply.text
    assert 'href="/admin' not in annotator.get("/judge").text  # not offered either


@pytest.fixture
def admin(client: TestClient) -> TestClient:
    reply = sign_in(client, "admin-key")
    # Everyone lands on the judging page: /admin is not routed on the public gateway listener.
    assert reply.status_code == 303 and reply.headers["location"] == "/judge"
    return client


def test_admin_page_shows_queue_rounds_adapters_annotators_and_plot(admin: TestClient) -> None:
    page = admin.get("/admin").text
    for text in ("Feedback queue", "rationale-v2", "canary", "rejected", "ann-1", "0.700", "kappa 0.050"):
        assert text in page
    assert "gate said no &lt;script&gt;" in page and XSS not in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad</b>" not in page
    assert page.count("Clear flag") == 1
    points = re.findall(r'class="point acceptance" data-version="([^"]+)"', page)
    assert points == ["base", "1", "2"]  # one per version, in order of first generation
    assert len(re.findall(r'class="point accuracy"', page)) == 3


def test_confirmation_flow_promotes_only_on_the_second_post(admin: TestClient, gateway: FakeGateway) -> None:
    token = field_value(admin.get("/admin").text, "csrf_token")
    first = admin.post(
        "/admin/confirm?action=promote",
        data={"csrf_token": token, "namespace": "default", "version": "2", "alias": "production"},
    )
    assert (
        first.status_code == 200 and "Are you sure?" in first.text and "production at version 2" in first.text
    )
    assert not gateway.methods("PromoteAdapter")
    assert (
        admin.post("/admin/act?action=promote", data={"csrf_token": token, "version": "2"}).status_code == 400
    )
    second = {
        name: field_value(first.text, name)
        for name in ("csrf_token", "namespace", "version", "alias", "confirm")
    }
    reply = admin.post("/admin/act?action=promote", data=second, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/admin?namespace=default"
    (promote,) = gateway.methods("PromoteAdapter")
    assert (promote.adapter, promote.alias, promote.namespace) == ("2", "production", "default")
    assert "production now names version 2." in admin.get("/admin").text


def test_admin_action_errors_are_one_line_messages(admin: TestClient, gateway: FakeGateway) -> None:
    token = field_value(admin.get("/admin").text, "csrf_token")
    confirm = admin.post(
        "/admin/confirm?action=start_round", data={"csrf_token": token, "namespace": "default"}
    )
    assert not gateway.methods("StartTuningRound")
    second = {
        name: field_value(confirm.text, name) for name in ("csrf_token", "namespace", "force", "confirm")
    }
    page = admin.post("/admin/act?action=start_round", data=second).text
    assert "Could not start a round: nothing new to train on (FAILED_PRECONDITION)." in page
    assert (
        admin.post("/admin/act?action=rollback", data={"csrf_token": "x", "confirm": "yes"}).status_code
        == 403
    )
    assert not gateway.methods("RollbackAdapter")


def test_clear_flag_goes_through_the_confirmation(admin: TestClient, gateway: FakeGateway) -> None:
    page = admin.get("/admin").text
    token = field_value(page, "csrf_token")
    confirm = admin.post(
        "/admin/confirm?action=clear_flag",
        data={"csrf_token": token, "namespace": "default", "annotator_id": "<b>bad</b>"},
    )
    assert "Clear the reliability flag of &lt;b&gt;bad&lt;/b&gt;?" in confirm.text
    second = {
        name: field_value(confirm.text, name)
        for name in ("csrf_token", "namespace", "annotator_id", "confirm")
    }
    assert second["annotator_id"] == "&lt;b&gt;bad&lt;/b&gt;"
    second["annotator_id"] = "<b>bad</b>"  # what the browser sends back after unescaping
    admin.post("/admin/act?action=clear_flag", data=second)
    (cleared,) = gateway.methods("ClearAnnotatorFlag")
    assert cleared.annotator_id == "<b>bad</b>"


# -- the plot --------------------------------------------------------------------------------------


def test_plot_orders_versions_and_skips_undefined_points() -> None:
    stats = [
        pb.AdapterFeedbackStats(adapter_version="3", first_generation_at="2026-02-01T00:00:00Z"),
        pb.AdapterFeedbackStats(
            adapter_version="base", judged_candidates=4, accepted_candidates=1,
            first_generation_at="2026-03-01T00:00:00Z",
        ),
        pb.AdapterFeedbackStats(
            adapter_version="<v>", judged_candidates=2, accepted_candidates=2, answers_judged=1,
            answers_correct=1, first_generation_at="2026-01-01T00:00:00Z",
        ),
    ]  # fmt: skip
    assert [s.adapter_version for s in ordered_versions(stats)] == ["base", "<v>", "3"]
    svg = quality_plot_svg(stats)
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "<v>" not in svg
    assert re.findall(r'class="point acceptance" data-version="([^"]+)"', svg) == ["base", "&lt;v&gt;"]
    assert re.findall(r'class="point accuracy" data-version="([^"]+)"', svg) == ["&lt;v&gt;"]
    assert "25.0 %" in svg and "100.0 %" in svg  # the tooltips' shares
    assert "no generations yet" in quality_plot_svg([])


def test_csrf_tokens_are_bound_to_the_secret_and_nonce() -> None:
    one, two = SessionSecret.from_bytes(b"1" * 32), SessionSecret.from_bytes(b"2" * 32)
    token = one.csrf_token("session", "nonce")
    assert one.csrf_ok("session", "nonce", token)
    assert not two.csrf_ok("session", "nonce", token)
    assert not one.csrf_ok("sign-in", "nonce", token) and not one.csrf_ok("session", "other", token)
    assert not one.csrf_ok("session", "", token) and not one.csrf_ok("session", "nonce", "")
