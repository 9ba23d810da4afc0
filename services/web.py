"""The annotation web app: sign-in, the judging page and the admin page, over HTTP.

Contract:

- ``create_web_app(gateway, settings)`` returns a FastAPI app that the Ingress deployment serves
  (``serve.ingress``), so it shares the Ingress's single Serve application with the gRPC services.
  It is a thin adapter over the RPCs: every read and write is ``gateway.call_rpc(method, request,
  api_key)`` with the signed-in person's key, which runs the RPC exactly as a gRPC call would
  (authentication, role and namespace checks, audit). The app holds no store and decides no
  authorisation itself; it only hides what a role cannot do (the admin page needs role admin).
- Sessions, CSRF tokens and the sign-in rate limit are in services/web_session.py: the session
  lives only in an encrypted, HttpOnly, SameSite=Strict cookie. Every POST carries a CSRF token
  (403 and nothing done without it) and must come from this origin when the browser says where
  it came from (``Origin``, ``Sec-Fetch-Site``). A key revoked meanwhile ends the session: any RPC
  answering UNAUTHENTICATED clears the cookie and sends the person to sign in again.
- Pages (services/web_pages.py) escape every text; responses carry a strict
  Content-Security-Policy (scripts and styles only from /assets/), ``nosniff``,
  ``Referrer-Policy: same-origin``, and pages ``Cache-Control: no-store``.
- RPC errors become a page with the one-line reason: PERMISSION_DENIED 403, NOT_FOUND 404,
  INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, FAILED_PRECONDITION 409, anything
  else 500; never a stack trace.
- Judging follows post/redirect/get: ``POST /judge/submit`` stores one judgement (idempotent per
  the form's key) and redirects to ``GET /judge``. Items handed out and not yet judged are kept in
  the session, so reloading the page shows the same item. ``POST /judge/undo`` withdraws the last
  submission by storing a skipped revision of it, then shows that item again (one level).
- Admin actions (start round, promote, rollback, clear an annotator's flag) take two POSTs: the
  first (``/admin/confirm``) only shows "Are you sure?", the second (``/admin/act``) acts and its
  result or error is shown on the admin page as one line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from google.protobuf.message import Message

from illume.v1 import illume_pb2 as pb
from services import web_pages as pages
from services.config import WebSettings
from services.web_session import (
    PRE_SESSION_COOKIE,
    PRE_SESSION_TTL_S,
    SESSION_COOKIE,
    LastSubmission,
    Session,
    SessionCodec,
    SessionSecret,
    SignInLimiter,
    retry_after_header,
)

log = logging.getLogger("ray.serve")

MAX_FORM_BYTES = 64 * 1024
MAX_KEY_CHARS = 1024
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'"
)
STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}
TITLE_OF_STATUS = {
    400: "Bad request",
    401: "Signed out",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible now",
    413: "Too large",
    415: "Unsupported form",
    429: "Too many requests",
    500: "Server error",
    503: "Unavailable",
}
INTERNAL_REASON = "internal error; see the server log"
SIGN_IN_REASONS = {
    "revoked": "your key was revoked or expired",
    "expired": "your session ended; sign in again",
    "signed-out": "you are signed out",
}
ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,100}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ANNOTATOR_MAX_CHARS = 128
ADMIN_ACTIONS = ("start_round", "promote", "rollback", "clear_flag")
ALLOWED_FETCH_SITES = ("same-origin", "none")


class RpcFailed(Exception):
    """An RPC answered a non-OK status: ``code`` is the grpc status name, ``reason`` its one line."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason.splitlines()[0] if reason else code


class RpcGateway(Protocol):
    """Runs an RPC of the Ingress in-process, as a gRPC call with ``authorization: Bearer <key>``."""

    async def call_rpc(self, method: str, request: Message, api_key: str) -> Message: ...


class PageError(Exception):
    """Ends a request with an error page (or plain text for images)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SignInRequired(Exception):
    """Ends a request with a redirect to sign-in and the session cookie cleared."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def status_of(code: str) -> int:
    return STATUS_OF_CODE.get(code, 500)


def create_web_app(gateway: RpcGateway, settings: WebSettings) -> FastAPI:
    """The web app over ``gateway``; reads ``settings.session_secret_file`` now (ValueError if bad)."""
    secret = SessionSecret.load(settings.session_secret_file)
    web = _WebApp(gateway, settings, secret)
    app = FastAPI(title="illume annotation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = web
    _add_security_headers(app, web)
    _add_error_handlers(app, web)
    _add_routes(app, web)
    return app


# -- plumbing -------------------------------------------------------------------------------------


class _WebApp:
    """The app's state (the gateway, the session codec, the limiter) and the helpers routes share."""

    def __init__(self, gateway: RpcGateway, settings: WebSettings, secret: SessionSecret) -> None:
        self.gateway = gateway
        self.settings = settings
        self.secret = secret
        self.codec = SessionCodec(secret, settings.session_ttl_s)
        self.limiter = SignInLimiter(settings.sign_in_attempts_per_minute)

    async def rpc(self, session: Session, method: str, request: Message) -> Any:
        """Call ``method`` as the session's key; UNAUTHENTICATED ends the session."""
        try:
            return await self.gateway.call_rpc(method, request, session.api_key)
        except RpcFailed as failed:
            if failed.code == "UNAUTHENTICATED":
                raise SignInRequired("revoked") from None
            raise

    # sessions

    def session_of(self, request: Request) -> Session | None:
        return self.codec.decode(request.cookies.get(SESSION_COOKIE))

    def require_session(self, request: Request) -> Session:
        session = self.session_of(request)
        if session is None:
            raise SignInRequired("expired" if request.cookies.get(SESSION_COOKIE) else "")
        return session

    def set_session_cookie(self, response: Response, session: Session) -> None:
        max_age = math.ceil(session.remaining_s(self.settings.session_ttl_s))
        response.set_cookie(
            SESSION_COOKIE,
            self.codec.encode(session),
            max_age=max(max_age, 1),
            path="/",
            secure=self.settings.cookie_secure,
            httponly=True,
            samesite="strict",
        )

    def clear_session_cookie(self, response: Response) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=self.settings.cookie_secure, httponly=True, samesite="strict"
        )

    def chrome(self, session: Session, namespace: str, page: str) -> pages.Chrome:
        return pages.Chrome(
            principal=session.principal,
            role=session.role,
            namespaces=session.namespaces,
            namespace=namespace,
            csrf_token=self.secret.csrf_token("session", session.nonce),
            page=page,
        )

    def error_response(self, request: Request, status: int, reason: str) -> Response:
        """The error page (plain text for images and assets) with the one-line reason."""
        if request.url.path.startswith(("/images/", "/assets/")):
            return Response(reason + "\n", status_code=status, media_type="text/plain")
        session = self.session_of(request)
        chrome = None
        if session is not None:
            requested = request.query_params.get("namespace", "")
            namespace = requested if NAMESPACE_RE.match(requested) else choose_namespace(session, None)
            chrome = self.chrome(session, namespace, "/judge")
        title = TITLE_OF_STATUS.get(status, "Error")
        return html(pages.error_page(status, title, reason, chrome), status)

    def client_address(self, request: Request) -> str:
        """Who signs in, for the rate limit: the peer, or the address the trusted proxies forwarded."""
        peer = request.client.host if request.client else "unknown"
        hops = self.settings.forwarded_for_hops
        forwarded = request.headers.get("x-forwarded-for")
        if hops <= 0 or not forwarded:
            return peer
        entries = [entry.strip() for entry in forwarded.split(",") if entry.strip()]
        # Each trusted proxy appends the address it received from; entries further left are
        # whatever the client claimed.
        return entries[-hops] if len(entries) >= hops else (entries[0] if entries else peer)

    # forms

    async def session_form(self, request: Request) -> tuple[Session, dict[str, list[str]]]:
        """A signed-in POST: its session and its form, once the form's CSRF token is the session's."""
        form = await read_form(request)
        session = self.require_session(request)
        if not self.secret.csrf_ok("session", session.nonce, _field(form, "csrf_token")):
            raise PageError(403, "missing or invalid CSRF token")
        return session, form


def _field(form: dict[str, list[str]], name: str, default: str = "") -> str:
    values = form.get(name)
    return values[0] if values else default


async def read_form(request: Request) -> dict[str, list[str]]:
    """The url-encoded form of a POST: same-origin only, at most ``MAX_FORM_BYTES``."""
    check_same_origin(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/x-www-form-urlencoded", ""):
        raise PageError(415, "forms must be sent as application/x-www-form-urlencoded")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
        raise PageError(413, f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "the form could not be read") from None


def check_same_origin(request: Request) -> None:
    """Refuse a POST the browser says came from another site (when it says so at all)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ALLOWED_FETCH_SITES:
        raise PageError(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            raise PageError(403, "cross-origin request refused")


def choose_namespace(session: Session, requested: str | None) -> str:
    """The namespace asked for, else "default" when the key may use it, else the key's first.
    Whether the key may use it is the RPC's to decide."""
    if requested:
        if not NAMESPACE_RE.match(requested):
            raise PageError(400, "bad namespace name")
        return requested
    if "default" in session.namespaces or not session.namespaces:
        return "default"
    return session.namespaces[0]


def html(page: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(page, status_code=status)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _ns_query(namespace: str) -> str:
    return "namespace=" + quote(namespace, safe="")


def _add_security_headers(app: FastAPI, web: _WebApp) -> None:
    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:
            # Caught here rather than by an exception handler, which Starlette re-raises into the
            # server after answering: nothing unexpected leaves the app, and no trace reaches a page.
            log.exception("unexpected error in the web app", exc_info=exc)
            response = web.error_response(request, 500, INTERNAL_REASON)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response


def _add_error_handlers(app: FastAPI, web: _WebApp) -> None:
    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        return web.error_response(request, exc.status, exc.reason)

    @app.exception_handler(RpcFailed)
    async def rpc_failed(request: Request, exc: RpcFailed) -> Response:
        return web.error_response(request, status_of(exc.code), exc.reason)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired) -> Response:
        if request.url.path.startswith("/images/"):
            response: Response = Response("sign in first\n", status_code=401, media_type="text/plain")
        else:
            response = redirect("/sign-in" + (f"?reason={exc.reason}" if exc.reason else ""))
        if request.cookies.get(SESSION_COOKIE):
            web.clear_session_cookie(response)
        return response


# -- routes ---------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, web: _WebApp) -> None:
    _add_sign_in_routes(app, web)
    _add_judge_routes(app, web)
    _add_admin_routes(app, web)
    _add_asset_routes(app)


def _add_sign_in_routes(app: FastAPI, web: _WebApp) -> None:
    def sign_in_form(request: Request, message: str, status: int) -> HTMLResponse:
        nonce = request.cookies.get(PRE_SESSION_COOKIE, "")
        fresh = not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", nonce)
        if fresh:
            nonce = secrets.token_urlsafe(32)
        response = html(pages.sign_in_page(web.secret.csrf_token("sign-in", nonce), message), status)
        if fresh:
            response.set_cookie(
                PRE_SESSION_COOKIE,
                nonce,
                max_age=PRE_SESSION_TTL_S,
                path="/",
                secure=web.settings.cookie_secure,
                httponly=True,
                samesite="strict",
            )
        return response

    @app.get("/")
    async def root(request: Request) -> Response:
        return redirect("/judge" if web.session_of(request) else "/sign-in")

    @app.get("/sign-in")
    async def sign_in_get(request: Request, reason: str = "") -> Response:
        if web.session_of(request) is not None:
            return redirect("/judge")
        return sign_in_form(request, SIGN_IN_REASONS.get(reason, ""), 200)

    @app.post("/sign-in")
    async def sign_in_post(request: Request) -> Response:
        wait_s = web.limiter.attempt(web.client_address(request))
        if wait_s > 0:
            response = sign_in_form(request, "too many sign-in attempts; wait a minute and try again", 429)
            response.headers["Retry-After"] = retry_after_header(wait_s)
            return response
        form = await read_form(request)
        nonce = request.cookies.get(PRE_SESSION_COOKIE, "")
        if not web.secret.csrf_ok("sign-in", nonce, _field(form, "csrf_token")):
            raise PageError(403, "missing or invalid CSRF token")
        key = _field(form, "api_key").strip()
        if not key or len(key) > MAX_KEY_CHARS:
            return sign_in_form(request, "unknown or revoked key", 401)
        try:
            who = await web.gateway.call_rpc("WhoAmI", pb.WhoAmIRequest(), key)
        except RpcFailed as failed:
            if failed.code == "UNAUTHENTICATED":
                return sign_in_form(request, "unknown or revoked key", 401)
            return sign_in_form(request, failed.reason, status_of(failed.code))
        if who.role not in ("annotator", "admin"):
            return sign_in_form(request, "client keys cannot sign in to the annotation app", 403)
        session = Session.start(key, who.principal, who.role, list(who.namespaces), who.key_id)
        # Admins too: the public gateway does not route /admin (docs/DEPLOY.md), /judge is everywhere.
        response = redirect("/judge")
        web.set_session_cookie(response, session)
        response.delete_cookie(PRE_SESSION_COOKIE, path="/")
        return response

    @app.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        await web.session_form(request)  # signed in, and the form is this session's
        response = redirect("/sign-in?reason=signed-out")
        web.clear_session_cookie(response)
        return response


# -- judging --------------------------------------------------------------------------------------

VERDICT_CHOICES = ("submit", "none_fit", "skipped")


def _ratings(form: dict[str, list[str]]) -> list[pb.CandidateRating]:
    ratings = []
    for name, values in form.items():
        if not name.startswith("rating.") or not values or values[0] in ("", "0"):
            continue
        if values[0] not in ("1", "2", "3", "4"):
            raise PageError(400, "a rating must be 1-4")
        ratings.append(pb.CandidateRating(candidate_id=name.removeprefix("rating."), rating=int(values[0])))
    return ratings


def submission_from_form(form: dict[str, list[str]], namespace: str) -> pb.SubmitFeedbackRequest:
    """The SubmitFeedbackRequest a judging form asks for (its checks are the RPC's)."""
    generation_id = _field(form, "generation_id")
    key = _field(form, "idempotency_key")
    if not generation_id:
        raise PageError(400, "the form names no generation")
    if not IDEMPOTENCY_KEY_RE.match(key):
        raise PageError(400, "the form's idempotency key is missing or malformed")
    choice = _field(form, "verdict", "submit") or "submit"
    if choice not in VERDICT_CHOICES:
        raise PageError(400, "unknown verdict")
    request = pb.SubmitFeedbackRequest(generation_id=generation_id, namespace=namespace, idempotency_key=key)
    if choice == "skipped":
        # A skip says nothing about the item: no ratings, no answer check, no correction.
        request.verdict = pb.VERDICT_SKIPPED
        return request
    fitting = list(dict.fromkeys(form.get("fitting", [])))
    if choice == "submit" and fitting:
        request.verdict = pb.VERDICT_SELECTED
        request.fitting_candidate_ids.extend(fitting)
    else:
        request.verdict = pb.VERDICT_NONE_FIT
    request.ratings.extend(_ratings(form))
    request.answer_correct = _field(form, "answer_wrong") != "1"
    request.corrected_rationale = _field(form, "correction").strip()
    return request


def _saved_message(request: pb.SubmitFeedbackRequest, reply: pb.SubmitFeedbackResponse) -> str:
    if reply.duplicate:
        return "That judgement was already saved."
    if request.verdict == pb.VERDICT_SKIPPED:
        what = "Skipped the item"
    elif request.verdict == pb.VERDICT_NONE_FIT:
        what = "Saved: no candidate fits"
    else:
        n = len(request.fitting_candidate_ids)
        what = f"Saved: {n} fitting candidate{'s' if n != 1 else ''}"
    revision = f" (revision {reply.revision})" if reply.revision > 1 else ""
    return f"{what}{revision}."


def _add_judge_routes(app: FastAPI, web: _WebApp) -> None:
    async def pending_generation(session: Session, namespace: str) -> tuple[Session, pb.Generation | None]:
        """The item handed out earlier and not judged yet, if it still exists."""
        while (generation_id := session.pending_in(namespace)) is not None:
            try:
                request = pb.GetGenerationRequest(generation_id=generation_id, namespace=namespace)
                return session, await web.rpc(session, "GetGeneration", request)
            except RpcFailed as failed:
                if failed.code != "NOT_FOUND":
                    raise
                session = session.without_pending(namespace, generation_id)
        return session, None

    @app.get("/judge")
    async def judge(request: Request, namespace: str = "") -> Response:
        session = web.require_session(request)
        before = session
        ns = choose_namespace(session, namespace)
        session, generation = await pending_generation(session, ns)
        remaining, reason = None, ""
        if generation is None:
            reply = await web.rpc(session, "NextItem", pb.NextItemRequest(namespace=ns))
            if reply.has_item:
                generation, remaining, reason = reply.generation, reply.remaining, reply.reason
                session = session.with_pending(ns, generation.generation_id)
        flash, session = session.flash, session.with_flash("")
        chrome = web.chrome(session, ns, "/judge")
        can_undo = session.last is not None
        if generation is None:
            page = pages.nothing_left_page(chrome, flash=flash, can_undo=can_undo)
        else:
            page = pages.judge_page(
                chrome, generation, flash=flash, can_undo=can_undo, remaining=remaining, reason=reason
            )
        response = html(page)
        if session != before:
            web.set_session_cookie(response, session)
        return response

    @app.post("/judge/submit")
    async def submit(request: Request) -> Response:
        session, form = await web.session_form(request)
        ns = choose_namespace(session, _field(form, "namespace"))
        feedback = submission_from_form(form, ns)
        reply = await web.rpc(session, "SubmitFeedback", feedback)
        last = LastSubmission(ns, feedback.generation_id, feedback.idempotency_key)
        session = session.without_pending(ns, feedback.generation_id).with_last(last)
        response = redirect(f"/judge?{_ns_query(ns)}")
        web.set_session_cookie(response, session.with_flash(_saved_message(feedback, reply)))
        return response

    @app.post("/judge/undo")
    async def undo(request: Request) -> Response:
        session, form = await web.session_form(request)
        last = session.last
        if last is None:
            response = redirect(f"/judge?{_ns_query(choose_namespace(session, _field(form, 'namespace')))}")
            web.set_session_cookie(response, session.with_flash("Nothing to undo."))
            return response
        # A skipped revision withdraws the judgement from training and keeps both in the log; its
        # key derives from the undone submission's, so a repeated undo is one revision.
        withdraw = pb.SubmitFeedbackRequest(
            generation_id=last.generation_id,
            namespace=last.namespace,
            verdict=pb.VERDICT_SKIPPED,
            idempotency_key=f"undo-{last.idempotency_key}",
        )
        reply = await web.rpc(session, "SubmitFeedback", withdraw)
        session = session.with_last(None).with_pending(last.namespace, last.generation_id, first=True)
        message = (
            f"Withdrew your last judgement (now a skipped revision {reply.revision}); judge this item again."
        )
        response = redirect(f"/judge?{_ns_query(last.namespace)}")
        web.set_session_cookie(response, session.with_flash(message))
        return response

    @app.get("/images/{sha}")
    async def image(request: Request, sha: str, namespace: str = "") -> Response:
        session = web.require_session(request)
        if not SHA256_RE.match(sha):
            raise PageError(404, "no such image")
        ns = choose_namespace(session, namespace)
        reply = await web.rpc(session, "GetImage", pb.GetImageRequest(image_sha256=sha, namespace=ns))
        media_type = reply.media_type if reply.media_type.startswith("image/") else "application/octet-stream"
        headers = {"Cache-Control": "private, max-age=3600"}
        return Response(reply.image, media_type=media_type, headers=headers)


# -- admin ----------------------------------------------------------------------------------------


def _require_admin(session: Session) -> None:
    if session.role != "admin":
        raise PageError(403, "the admin page needs an admin key")


def _admin_fields(action: str, form: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """The confirmation question and the fields the second POST carries, checked for shape."""
    if action == "start_round":
        force = _field(form, "force") == "1"
        return ("Start a tuning round now" + (", even with few new judgements?" if force else "?")), {
            "force": "1" if force else ""
        }
    if action == "promote":
        version = _field(form, "version").strip()
        alias = _field(form, "alias", "production") or "production"
        if not VERSION_RE.match(version):
            raise PageError(400, "give the version to promote (a number or rationale-vN)")
        if alias not in ("production", "canary"):
            raise PageError(400, "alias must be production or canary")
        share = _field(form, "canary_share", "0.1") or "0.1"
        try:
            share_value = float(share)
        except ValueError:
            raise PageError(400, "canary share must be a number from 0 to 1") from None
        if not 0.0 <= share_value <= 1.0:
            raise PageError(400, "canary share must be a number from 0 to 1")
        question = f"Point {alias} at version {version}"
        if alias == "canary":
            question += f" with {share_value:.0%} of unpinned traffic"
        return question + "?", {"version": version, "alias": alias, "canary_share": f"{share_value:g}"}
    if action == "rollback":
        return "Point production back at the version it named before the last promotion?", {}
    if action == "clear_flag":
        annotator = _field(form, "annotator_id").strip()
        if not annotator or len(annotator) > ANNOTATOR_MAX_CHARS:
            raise PageError(400, "name the annotator whose flag to clear")
        return f"Clear the reliability flag of {annotator}?", {"annotator_id": annotator}
    raise PageError(400, "unknown action")


async def _act(web: _WebApp, session: Session, action: str, ns: str, fields: dict[str, str]) -> str:
    """Run an admin action; its one-line result."""
    if action == "start_round":
        request = pb.StartTuningRoundRequest(namespace=ns, force=fields.get("force") == "1")
        started = await web.rpc(session, "StartTuningRound", request)
        return f"Started tuning round {started.round_id} ({started.state})."
    if action == "promote":
        alias = fields["alias"]
        share = float(fields.get("canary_share") or 0) if alias == "canary" else 0.0
        request = pb.PromoteAdapterRequest(
            namespace=ns, adapter=fields["version"], alias=alias, canary_share=share
        )
        adapter = await web.rpc(session, "PromoteAdapter", request)
        return f"{alias} now names version {adapter.version}."
    if action == "rollback":
        adapter = await web.rpc(session, "RollbackAdapter", pb.RollbackAdapterRequest(namespace=ns))
        return f"production rolled back to version {adapter.version}."
    request = pb.ClearAnnotatorFlagRequest(namespace=ns, annotator_id=fields["annotator_id"])
    cleared = await web.rpc(session, "ClearAnnotatorFlag", request)
    return f"Cleared the flag of {cleared.annotator_id}."


ACTION_NAMES = {
    "start_round": "start a round",
    "promote": "promote",
    "rollback": "roll back",
    "clear_flag": "clear the flag",
}


def _add_admin_routes(app: FastAPI, web: _WebApp) -> None:
    @app.get("/admin")
    async def admin(request: Request, namespace: str = "") -> Response:
        session = web.require_session(request)
        _require_admin(session)
        ns = choose_namespace(session, namespace)
        stats, rounds, adapters, annotators = await asyncio.gather(
            web.rpc(session, "GetFeedbackStats", pb.GetFeedbackStatsRequest(namespace=ns)),
            web.rpc(session, "ListTuningRounds", pb.ListTuningRoundsRequest(namespace=ns, page_size=20)),
            web.rpc(session, "ListAdapters", pb.ListAdaptersRequest(namespace=ns, page_size=50)),
            web.rpc(session, "ListAnnotators", pb.ListAnnotatorsRequest(namespace=ns)),
        )
        flash = session.flash
        page = pages.admin_page(
            web.chrome(session, ns, "/admin"),
            stats,
            list(rounds.rounds),
            list(adapters.adapters),
            annotators,
            flash=flash,
        )
        response = html(page)
        if flash:
            web.set_session_cookie(response, session.with_flash(""))
        return response

    async def admin_form(request: Request) -> tuple[Session, dict[str, list[str]], str, str]:
        session, form = await web.session_form(request)
        _require_admin(session)
        action = request.query_params.get("action", "")
        if action not in ADMIN_ACTIONS:
            raise PageError(400, "unknown action")
        return session, form, action, choose_namespace(session, _field(form, "namespace"))

    @app.post("/admin/confirm")
    async def confirm(request: Request) -> Response:
        session, form, action, ns = await admin_form(request)
        question, fields = _admin_fields(action, form)
        chrome = web.chrome(session, ns, "/admin")
        return html(pages.confirm_page(chrome, action, f"{question} ({ns})", fields))

    @app.post("/admin/act")
    async def act(request: Request) -> Response:
        session, form, action, ns = await admin_form(request)
        if _field(form, "confirm") != "yes":
            raise PageError(400, "the action was not confirmed")
        _question, fields = _admin_fields(action, form)
        try:
            message = await _act(web, session, action, ns, fields)
        except RpcFailed as failed:
            message = f"Could not {ACTION_NAMES[action]}: {failed.reason} ({failed.code})."
        response = redirect(f"/admin?{_ns_query(ns)}")
        web.set_session_cookie(response, session.with_flash(message))
        return response


# -- assets ---------------------------------------------------------------------------------------


def _load_assets() -> dict[str, bytes]:
    folder = resources.files("services").joinpath("web_assets")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in ASSET_TYPES)
    }


def _add_asset_routes(app: FastAPI) -> None:
    assets = _load_assets()  # read once: the package's files do not change while it runs

    @app.get("/assets/{name}")
    async def asset(name: str) -> Response:
        data = assets.get(name)
        if data is None:
            raise PageError(404, "no such asset")
        media_type = ASSET_TYPES["." + name.rsplit(".", 1)[-1]]
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})
