"""HTML of the annotation web app's pages (services/web.py decides which one and with what data).

Contract: every function returns a complete HTML document as a string. Every piece of text that
comes from a person, a model or an RPC (questions, answers, candidates, reasons, annotator ids,
namespaces, versions, messages) goes through ``e()`` (``html.escape`` with quotes) exactly once,
here, so a question ``<script>alert(1)</script>`` renders as text. Pages carry no inline script or
style: behaviour comes from /assets/illume.js and looks from /assets/illume.css, which the
Content-Security-Policy allows and nothing else. Every form that changes state is a POST with the
``csrf_token`` field; the judging page works with script off (buttons submit the same form the
keyboard shortcuts drive).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from illume.v1 import illume_pb2 as pb
from services.web_plot import quality_plot_svg

CANDIDATE_KEYS = "1234567890"  # key of candidate i (the 10th is 0)
MAX_CORRECTION_CHARS = 2000
RATING_LABELS = {1: "does not fit", 2: "barely fits", 3: "fits", 4: "fits perfectly"}

KEY_HELP = (
    ("1-9, 0", "check or uncheck candidate 1-10 (and focus it)"),
    ("↑ ↓ or J K", "move the focus between candidates"),
    ("R then 1-4", "rate the focused candidate"),
    ("A", "toggle “the answer is wrong”"),
    ("C", "open the correction box (Esc closes it; keys typed in it are text)"),
    ("Enter", "submit: the checked candidates fit, or none fits when none is checked"),
    ("N", "submit “none of the candidates fits”"),
    ("S", "skip this item"),
    ("U", "undo your last submission"),
)


def e(value: Any) -> str:
    """Escape text for HTML content and attribute values."""
    return escape(str(value), quote=True)


@dataclass(frozen=True)
class Chrome:
    """What the header shows: who is signed in, where, and the tokens its forms need."""

    principal: str
    role: str
    namespaces: Sequence[str]
    namespace: str
    csrf_token: str
    page: str  # "/judge" or "/admin": where the namespace selector goes


def _csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf_token" value="{e(token)}">'


def _namespace_selector(chrome: Chrome) -> str:
    names = list(chrome.namespaces)
    if chrome.namespace not in names:
        names.insert(0, chrome.namespace)
    options = "".join(
        f'<option value="{e(n)}"{" selected" if n == chrome.namespace else ""}>{e(n)}</option>' for n in names
    )
    return (
        f'<form class="namespace" method="get" action="{e(chrome.page)}">'
        f'<label>namespace <select name="namespace" id="namespace-select">{options}</select></label>'
        '<button type="submit" class="small">Go</button></form>'
    )


def _header(chrome: Chrome | None) -> str:
    if chrome is None:
        return '<header class="top"><span class="brand">illume</span></header>'
    links = ['<a href="/judge?namespace=' + e(chrome.namespace) + '">Judge</a>']
    if chrome.role == "admin":
        links.append('<a href="/admin?namespace=' + e(chrome.namespace) + '">Admin</a>')
    return (
        '<header class="top"><span class="brand">illume</span>'
        f"<nav>{' '.join(links)}</nav>"
        f"{_namespace_selector(chrome)}"
        f'<span class="who">signed in as <strong id="principal">{e(chrome.principal)}</strong> '
        f"({e(chrome.role)})</span>"
        f'<form method="post" action="/sign-out" class="sign-out">{_csrf(chrome.csrf_token)}'
        '<button type="submit" class="small">Sign out</button></form>'
        "</header>"
    )


def _flash(message: str, kind: str = "info") -> str:
    if not message:
        return ""
    return f'<p class="flash {e(kind)}" id="flash" role="status">{e(message)}</p>'


def document(title: str, body: str, chrome: Chrome | None = None, page_class: str = "") -> str:
    """A full page: head with the app's stylesheet and script, the header, then ``body``."""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · illume</title>"
        '<link rel="stylesheet" href="/assets/illume.css">'
        '<script src="/assets/illume.js" defer></script>'
        f'</head><body class="{e(page_class)}">{_header(chrome)}<main>{body}</main></body></html>'
    )


# -- sign-in and errors ---------------------------------------------------------------------------


def sign_in_page(csrf_token: str, message: str = "") -> str:
    body = (
        '<section class="card narrow"><h1>Sign in</h1>'
        "<p>Sign in with your annotator or admin API key.</p>"
        f"{_flash(message, 'error')}"
        f'<form method="post" action="/sign-in" id="sign-in-form">{_csrf(csrf_token)}'
        '<label for="api-key">API key</label>'
        '<input type="password" name="api_key" id="api-key" autocomplete="current-password" '
        'required autofocus maxlength="1024">'
        '<button type="submit" class="primary">Sign in</button></form></section>'
    )
    return document("Sign in", body, None, "sign-in")


def error_page(status: int, title: str, reason: str, chrome: Chrome | None, back: str = "/judge") -> str:
    body = (
        f'<section class="card narrow error-page"><h1>{e(title)}</h1>'
        f'<p class="reason" id="reason">{e(reason)}</p>'
        f'<p><a href="{e(back)}">Back</a></p></section>'
    )
    return document(f"{status} {title}", body, chrome, "error")


# -- judging --------------------------------------------------------------------------------------


def _undo_form(chrome: Chrome, can_undo: bool) -> str:
    if not can_undo:
        return ""
    return (
        f'<form method="post" action="/judge/undo" id="undo-form" class="undo">{_csrf(chrome.csrf_token)}'
        '<button type="submit" id="undo-button">Undo my last submission <kbd>U</kbd></button></form>'
    )


def _key_help() -> str:
    rows = "".join(f"<tr><th><kbd>{e(k)}</kbd></th><td>{e(v)}</td></tr>" for k, v in KEY_HELP)
    return f'<aside class="keys" id="key-help"><h2>Keyboard</h2><table>{rows}</table></aside>'


def _rating_controls(candidate: pb.Candidate, number: int) -> str:
    name = f"rating.{candidate.candidate_id}"
    options = [
        f'<label class="rate" title="no rating">'
        f'<input type="radio" name="{e(name)}" value="" checked>–</label>'
    ]
    for value, label in RATING_LABELS.items():
        options.append(
            f'<label class="rate" title="{e(label)}">'
            f'<input type="radio" name="{e(name)}" value="{value}" data-rating="{value}">{value}</label>'
        )
    return (
        f'<span class="rating" role="radiogroup" aria-label="rating of candidate {number}">'
        f'<span class="rating-label">rating</span>{"".join(options)}</span>'
    )


def _candidate(candidate: pb.Candidate, i: int) -> str:
    key = CANDIDATE_KEYS[i] if i < len(CANDIDATE_KEYS) else ""
    key_html = f"<kbd>{key}</kbd>" if key else '<kbd class="none">·</kbd>'
    return (
        f'<li class="candidate" id="candidate-{i}" tabindex="-1" data-index="{i}" data-key="{e(key)}" '
        f'data-candidate-id="{e(candidate.candidate_id)}">'
        f'<label class="fit"><input type="checkbox" name="fitting" value="{e(candidate.candidate_id)}" '
        f'id="fit-{i}">{key_html}<span class="text">{e(candidate.text)}</span></label>'
        f"{_rating_controls(candidate, i + 1)}</li>"
    )


def judge_page(
    chrome: Chrome,
    generation: pb.Generation,
    *,
    flash: str = "",
    can_undo: bool = False,
    remaining: int | None = None,
    reason: str = "",
) -> str:
    """The judging page of one generation (its judgements, if any, are not shown)."""
    image_url = f"/images/{generation.image_sha256}?namespace={chrome.namespace}"
    origin = "the model's answer" if generation.answer_generated else "the answer given with the question"
    candidates = "".join(_candidate(c, i) for i, c in enumerate(generation.candidates))
    meta = [f"adapter {e(generation.adapter_version or 'base')}"]
    if reason:
        meta.append(f"picked: {e(reason)}")
    if remaining is not None:
        meta.append(f"{remaining} more to judge")
    body = (
        f"{_flash(flash)}"
        '<div class="judge-layout"><div class="judge-main">'
        '<section class="item card">'
        f'<div class="image"><img src="{e(image_url)}" alt="the image the question is about" '
        'id="item-image"></div>'
        '<div class="item-text"><p class="label">Question</p>'
        f'<h1 class="question" id="question">{e(generation.question)}</h1>'
        '<p class="label">Answer</p>'
        f'<p class="answer"><strong id="answer">{e(generation.answer)}</strong> '
        f'<span class="badge" id="answer-origin">{e(origin)}</span></p>'
        f'<p class="meta">{" · ".join(meta)}</p></div></section>'
        f'<form method="post" action="/judge/submit" id="judge-form" class="card" '
        f'data-generation-id="{e(generation.generation_id)}">'
        f"{_csrf(chrome.csrf_token)}"
        f'<input type="hidden" name="namespace" value="{e(chrome.namespace)}">'
        f'<input type="hidden" name="generation_id" value="{e(generation.generation_id)}">'
        f'<input type="hidden" name="idempotency_key" value="{secrets.token_urlsafe(18)}" '
        'id="idempotency-key">'
        '<label class="answer-wrong"><input type="checkbox" name="answer_wrong" value="1" id="answer-wrong">'
        " The answer is wrong <kbd>A</kbd></label>"
        '<fieldset class="candidates-box">'
        "<legend>Which rationales explain the answer? Check every one that fits.</legend>"
        f'<ol class="candidates" id="candidates">{candidates}</ol></fieldset>'
        '<details id="correction-box"><summary>Write a better rationale <kbd>C</kbd></summary>'
        f'<textarea name="correction" id="correction" rows="3" maxlength="{MAX_CORRECTION_CHARS}" '
        'placeholder="…seeing that"></textarea></details>'
        '<p class="key-status" id="key-status" aria-live="polite"></p>'
        '<div class="actions">'
        '<button type="submit" name="verdict" value="submit" id="submit-button" class="primary">'
        "Submit <kbd>Enter</kbd></button>"
        '<button type="submit" name="verdict" value="none_fit" id="none-fit-button">'
        "None fits <kbd>N</kbd></button>"
        '<button type="submit" name="verdict" value="skipped" id="skip-button">Skip <kbd>S</kbd></button>'
        "</div></form>"
        f"{_undo_form(chrome, can_undo)}</div>{_key_help()}</div>"
    )
    return document("Judge", body, chrome, "judge")


def nothing_left_page(chrome: Chrome, *, flash: str = "", can_undo: bool = False) -> str:
    body = (
        f"{_flash(flash)}"
        '<section class="card narrow">'
        f'<h1 id="nothing-left">Nothing left to judge in {e(chrome.namespace)}</h1>'
        "<p>New items arrive as client apps generate rationales or an admin adds a pool.</p>"
        f'<p><a href="/judge?namespace={e(chrome.namespace)}">Look again</a></p>'
        f"{_undo_form(chrome, can_undo)}</section>"
    )
    return document("Nothing left", body, chrome, "judge nothing-left")


# -- admin ----------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, empty: str) -> str:
    if not rows:
        return f'<p class="empty" id="{e(table_id)}-empty">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<table class="data" id="{e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _queue(stats: pb.FeedbackStats) -> str:
    judged = sum(a.judged_generations for a in stats.by_adapter)
    cells = (
        ("generations", stats.generations),
        ("judged", judged),
        ("selected", stats.selected),
        ("none fit", stats.none_fit),
        ("skipped", stats.skipped),
        ("held out", stats.held_out_generations),
        ("submissions (revisions included)", stats.feedback),
    )
    items = "".join(
        f'<div class="stat"><span class="n">{e(v)}</span><span>{e(k)}</span></div>' for k, v in cells
    )
    return f'<div class="stats" id="queue">{items}</div>'


def _rounds(rounds: Sequence[pb.TuningRound]) -> str:
    rows = [
        (
            f"<code>{e(r.round_id)}</code>",
            f'<span class="state {e(r.state)}">{e(r.state)}</span>',
            e(r.reason),
            e(r.adapter_version or ""),
            e(r.started_at),
            e(r.finished_at),
        )
        for r in rounds
    ]
    return _table(
        ("round", "state", "reason", "version", "started", "finished"), rows, "rounds", "No rounds yet."
    )


def _adapters(adapters: Sequence[pb.Adapter]) -> str:
    rows = [
        (
            e(a.version),
            e(a.name),
            e(", ".join(a.aliases)),
            e(a.state),
            f"<code>{e(a.round_id)}</code>",
            e(a.parent_version or "base"),
            e(a.created_at),
        )
        for a in adapters
    ]
    return _table(
        ("version", "name", "aliases", "state", "round", "from", "registered"),
        rows,
        "adapters",
        "No adapter versions yet: the base model serves.",
    )


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _confirm_form(chrome: Chrome, action: str, fields: dict[str, str], label: str, cls: str = "") -> str:
    hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items())
    return (
        f'<form method="post" action="/admin/confirm?action={e(action)}" class="inline {e(cls)}">'
        f'{_csrf(chrome.csrf_token)}<input type="hidden" name="namespace" value="{e(chrome.namespace)}">'
        f'{hidden}<button type="submit">{e(label)}</button></form>'
    )


def _annotators(chrome: Chrome, reply: pb.ListAnnotatorsResponse) -> str:
    rows = []
    for a in reply.annotators:
        kappa = a.kappa if a.HasField("kappa") else None
        agreement = a.agreement if a.HasField("agreement") else None
        action = ""
        if a.flagged:
            action = _confirm_form(chrome, "clear_flag", {"annotator_id": a.annotator_id}, "Clear flag")
        rows.append(
            (
                e(a.annotator_id),
                e(a.judgements),
                e(a.overlap_items),
                _share(kappa),
                _share(agreement),
                '<span class="flagged">flagged</span>' if a.flagged else ("cleared" if a.cleared else "no"),
                e(a.flag_reason or a.assessment),
                action,
            )
        )
    table = _table(
        ("annotator", "judgements", "overlap", "kappa", "agreement", "flagged", "reason", ""),
        rows,
        "annotators",
        "No annotator has judged anything yet.",
    )
    rule = (
        f'<p class="note">Flagged when kappa &lt; {reply.flag_below_kappa:g} on at least '
        f"{reply.min_overlap_items} overlap items with at least {reply.min_annotators} annotators.</p>"
    )
    return table + rule


def _actions(chrome: Chrome) -> str:
    csrf = _csrf(chrome.csrf_token)
    ns = f'<input type="hidden" name="namespace" value="{e(chrome.namespace)}">'
    return (
        '<div class="admin-actions">'
        f'<form method="post" action="/admin/confirm?action=start_round" id="start-round-form">{csrf}{ns}'
        '<label><input type="checkbox" name="force" value="1"> even with few new judgements</label>'
        '<button type="submit">Start round…</button></form>'
        f'<form method="post" action="/admin/confirm?action=promote" id="promote-form">{csrf}{ns}'
        '<label>version <input type="text" name="version" required size="6" '
        'pattern="[A-Za-z0-9._\\-]+"></label>'
        '<label>alias <select name="alias"><option value="production">production</option>'
        '<option value="canary">canary</option></select></label>'
        "<label>canary share "
        '<input type="number" name="canary_share" min="0" max="1" step="0.01" value="0.1">'
        '</label><button type="submit">Promote…</button></form>'
        f'<form method="post" action="/admin/confirm?action=rollback" id="rollback-form">{csrf}{ns}'
        '<button type="submit">Roll production back…</button></form>'
        "</div>"
    )


def admin_page(
    chrome: Chrome,
    stats: pb.FeedbackStats,
    rounds: Sequence[pb.TuningRound],
    adapters: Sequence[pb.Adapter],
    annotators: pb.ListAnnotatorsResponse,
    *,
    flash: str = "",
) -> str:
    body = (
        f"{_flash(flash)}"
        f"<h1>Admin · {e(chrome.namespace)}</h1>"
        f'<section class="card"><h2>Feedback queue</h2>{_queue(stats)}</section>'
        '<section class="card"><h2>Acceptance and answer accuracy per adapter version</h2>'
        f'<div class="plot-box" id="plot">{quality_plot_svg(stats.by_adapter)}</div></section>'
        f'<section class="card"><h2>Actions</h2>{_actions(chrome)}</section>'
        f'<section class="card"><h2>Tuning rounds</h2>{_rounds(rounds)}</section>'
        f'<section class="card"><h2>Adapter versions</h2>{_adapters(adapters)}</section>'
        f'<section class="card"><h2>Annotators</h2>{_annotators(chrome, annotators)}</section>'
    )
    return document("Admin", body, chrome, "admin")


def confirm_page(chrome: Chrome, action: str, question: str, fields: dict[str, str]) -> str:
    """The "Are you sure?" step: only its form's POST to /admin/act does anything."""
    hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items())
    body = (
        '<section class="card narrow confirm"><h1>Are you sure?</h1>'
        f'<p id="confirm-question">{e(question)}</p>'
        f'<form method="post" action="/admin/act?action={e(action)}" id="confirm-form">'
        f'{_csrf(chrome.csrf_token)}<input type="hidden" name="namespace" value="{e(chrome.namespace)}">'
        f'{hidden}<input type="hidden" name="confirm" value="yes">'
        '<button type="submit" class="primary danger" id="confirm-button">Yes, do it</button> '
        f'<a href="/admin?namespace={e(chrome.namespace)}">Cancel</a></form></section>'
    )
    return document("Are you sure?", body, chrome, "admin confirm")
