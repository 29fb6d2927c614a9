"""The A1111 API through the balancer: each call goes to the caller's pinned node (or a chosen one), listings are the
union over healthy nodes, and transport failures become A1111-shaped 502/503 answers, never a hang.

Views hand a `ProxyCall` to `proxy()` and turn the `ProxyResult` into an HTTP response.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import TextChoices

from balancer import metrics, pinning, routing
from balancer.health import RISE
from balancer.node_client import (
    HOP_BY_HOP_HEADERS,
    ForwardedResponse,
    NodeUnreachable,
    get_node_client,
    user_headers,
)
from balancer.pinning import Caller, PinState
from balancer.routing import NodeState

log = logging.getLogger(__name__)

GENERATION_READ_TIMEOUT = 3600.0  # a blocking generation may wait behind a long queue; node deaths are watched
CONTROL_READ_TIMEOUT = 5.0  # progress, interrupt, skip: a node answers them at once unless it hangs
LISTING_READ_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 300.0  # options (a model load), extras, interrogate

GENERATION_PATHS = frozenset({"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/txt2img_v2/", "/img2img_v2/"})
LISTING_PATHS = frozenset(
    f"/sdapi/v1/{name}"
    for name in (
        "sd-models", "sd-vae", "sd-modules", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "loras",
        "embeddings", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles", "scripts",
    )
)  # fmt: skip
REFRESH_PATHS = frozenset(
    f"/sdapi/v1/{name}" for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings")
)

# Request headers a node must not see from the client: the connection's own, and identity, which the balancer
# states itself (X-User-Id / signed X-SD-User) after authenticating the caller.
DROPPED_REQUEST_HEADERS = HOP_BY_HOP_HEADERS | {
    "host", "content-length", "authorization", "cookie", "x-sd-user", "x-sd-node-secret", "x-user-id",
    "x-forwarded-for", "expect",
}  # fmt: skip
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {"content-length", "set-cookie", "x-sd-node"}


class CallKind(TextChoices):
    GENERATION = "generation"
    PROGRESS = "progress"
    INTERRUPT = "interrupt"
    SKIP = "skip"
    OPTIONS = "options"
    LISTING = "listing"
    REFRESH = "refresh"
    OTHER = "other"


def call_kind(path: str) -> CallKind:
    if path in GENERATION_PATHS:
        return CallKind.GENERATION
    if path in LISTING_PATHS:
        return CallKind.LISTING
    if path in REFRESH_PATHS:
        return CallKind.REFRESH
    return {
        "/sdapi/v1/progress": CallKind.PROGRESS,
        "/sdapi/v1/interrupt": CallKind.INTERRUPT,
        "/sdapi/v1/skip": CallKind.SKIP,
        "/sdapi/v1/options": CallKind.OPTIONS,
    }.get(path, CallKind.OTHER)


@dataclass(frozen=True, kw_only=True)
class ProxyCall:
    """One incoming API call: who, what, and the headers it came with."""

    caller: Caller
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client_address: str

    @property
    def kind(self) -> CallKind:
        return call_kind(self.path)

    def header(self, name: str) -> str:
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), "")


@dataclass(frozen=True, kw_only=True)
class ProxyResult:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    node_id: str = ""


class ProxyError(Exception):
    """An answer the balancer gives itself, in A1111's four-key error shape."""

    status = 502
    error = "BalancerError"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def result(self) -> ProxyResult:
        return error_result(self.status, self.error, self.detail)


class NoNodeAvailable(ProxyError):
    status = 503
    error = "NoNodeAvailable"

    def __init__(self) -> None:
        super().__init__("no GPU node is available (all are down or draining); retry later")

    def result(self) -> ProxyResult:
        retry_after = str(max(1, math.ceil(RISE * settings.SD_HEALTH_INTERVAL)))
        plain = super().result()
        return ProxyResult(status=plain.status, body=plain.body, headers=(*plain.headers, ("Retry-After", retry_after)))


class NodeFailed(ProxyError):
    status = 502
    error = "NodeUnreachable"

    def __init__(self, node: NodeState, failure: NodeUnreachable) -> None:
        after = "it was not retried elsewhere" if not failure.retry_safe else "no other node could take it"
        super().__init__(f"node {node.node_id or node.url} ({node.url}) failed: {failure.reason}; {after}")
        self.node = node
        self.failure = failure


def error_result(status: int, error: str, detail: str) -> ProxyResult:
    body = {"error": error, "detail": detail, "body": "", "errors": ""}
    return ProxyResult(status=status, body=json.dumps(body).encode())


def json_result(document: Any, *, node_id: str = "") -> ProxyResult:
    return ProxyResult(status=200, body=json.dumps(document).encode(), node_id=node_id)


# ------------------------------------------------------------------------------------------------------ dispatch


def proxy(call: ProxyCall) -> ProxyResult:
    """Serve one API call through the nodes, counting it in the metrics."""
    started = time.perf_counter()
    kind = call.kind
    try:
        result = HANDLERS[kind](call)
    except ProxyError as error:
        result = error.result()
    metrics.PROXIED_REQUESTS.labels(kind=kind.value, status=str(result.status)).inc()
    metrics.PROXY_SECONDS.labels(kind=kind.value).observe(time.perf_counter() - started)
    return result


def _generation(call: ProxyCall) -> ProxyResult:
    """txt2img / img2img: start (or continue) the caller's cycle and wait for the node's answer.

    1. The model: the body's override_settings.sd_model_checkpoint, else the caller's remembered choice, which is
       then injected into the body so whichever node serves applies it.
    2. The pinned node serves (or a new pin is made for the model); a refused connection re-pins once elsewhere.
    3. While the node works, its health is watched: a node going down ends the wait with a 502 at once, and the pin
       is marked lost so the next progress call says so.
    """
    key = call.caller.pin_key
    body, model = with_user_model(call.body, routing.user_model(key))

    def choose(excluded: frozenset[str]) -> NodeState | None:
        decision, _ = pinning.start_cycle(key, model=model, exclude=excluded)
        if decision is not None:
            pinning.mark(key, generating=True)
        return decision.node if decision else None

    try:
        node, response = attempt(choose, lambda node: _forward_watched(node, call, body))
    except NodeFailed as failure:
        if failure.failure.retry_safe:
            pinning.unpin(key)
        else:
            pinning.mark(key, lost=True)
        raise
    pinning.mark(key, generating=False)
    return relay(response, node)


def _progress(call: ProxyCall) -> ProxyResult:
    found = pinning.lookup(call.caller.pin_key)
    if found.state is PinState.LOST:
        return json_result(progress_document(textinfo=pinning.LOST_JOB_TEXT))
    if found.state is PinState.NONE or found.node is None:
        return json_result(progress_document())
    pinning.refresh(call.caller.pin_key)
    try:
        response = forward(found.node, call, timeout=CONTROL_READ_TIMEOUT)
    except NodeUnreachable as error:
        routing.report_failure(found.node.url)
        if error.reason == "read timeout":
            # A slow answer is not a lost job yet: the health checks decide whether the node is down.
            return json_result(progress_document(textinfo="the node serving your job is not answering"))
        pinning.unpin(call.caller.pin_key)
        return json_result(progress_document(textinfo=pinning.LOST_JOB_TEXT if found.pin else None))
    return relay(response, found.node)


def _control(call: ProxyCall) -> ProxyResult:
    """interrupt -> {} and skip -> null (A1111's answers), sent to the pinned node; without one, nothing runs."""
    idle_answer: dict[str, Any] | None = {} if call.kind is CallKind.INTERRUPT else None
    found = pinning.lookup(call.caller.pin_key)
    if found.state is not PinState.LIVE or found.node is None:
        return json_result(idle_answer)
    pinning.refresh(call.caller.pin_key)
    try:
        return relay(forward(found.node, call, timeout=CONTROL_READ_TIMEOUT), found.node)
    except NodeUnreachable:
        routing.report_failure(found.node.url)
        return json_result(idle_answer)


def _options(call: ProxyCall) -> ProxyResult:
    """GET shows the caller's remembered model; POST with sd_model_checkpoint pins the caller to a node for that
    model, must succeed there (a 422 passes through), and is then remembered for every node."""
    key = call.caller.pin_key
    remembered = routing.user_model(key)
    if call.method != "POST":
        node, response = attempt(lambda excluded: pinned_or_chosen(key, remembered, excluded), _send(call))
        return relay(_with_model_shown(response, remembered), node)
    model = _requested_model(call.body)
    if model is None:
        node, response = attempt(lambda excluded: pinned_or_chosen(key, remembered, excluded), _send(call))
        return relay(response, node)

    new_pin = False
    before: pinning.PinLookup | None = None

    def choose(excluded: frozenset[str]) -> NodeState | None:
        nonlocal new_pin, before
        decision, previous = pinning.start_cycle(key, model=model, exclude=excluded)
        before = before or previous
        new_pin = decision is not None and not decision.reused
        return decision.node if decision else None

    node, response = attempt(choose, _send(call))
    if response.status == 200:
        routing.remember_user_model(key, model)
    elif new_pin:
        # A refused choice starts no cycle: the caller keeps the pin they had (their job may be running there).
        if before is not None and before.state is PinState.LIVE and before.pin is not None:
            pinning.restore(key, before.pin)
        else:
            pinning.unpin(key)
    return relay(response, node)


def _listing(call: ProxyCall) -> ProxyResult:
    """The union of a listing over healthy nodes (each item once, by title or name)."""
    nodes = [node for node in routing.known_nodes() if node.healthy]
    if not nodes:
        raise NoNodeAvailable()
    answers = list(_pool.map(lambda node: _try_forward(node, call, LISTING_READ_TIMEOUT), nodes))
    documents = []
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, NodeUnreachable):
            routing.report_failure(node.url)
        elif answer.status == 200:
            documents.append(json.loads(answer.body))
    if not documents:
        first = next((answer for answer in answers if isinstance(answer, ForwardedResponse)), None)
        if first is None:
            raise NodeFailed(nodes[0], answers[0]) if isinstance(answers[0], NodeUnreachable) else NoNodeAvailable()
        return relay(first, nodes[answers.index(first)])
    return json_result(merge_listings(documents), node_id=",".join(node.node_id or node.url for node in nodes))


def _refresh(call: ProxyCall) -> ProxyResult:
    """refresh-checkpoints & co. rescan folders: every healthy node does it; the first failure is the answer."""
    nodes = [node for node in routing.known_nodes() if node.healthy]
    if not nodes:
        raise NoNodeAvailable()
    answers = list(_pool.map(lambda node: _try_forward(node, call, DEFAULT_READ_TIMEOUT), nodes))
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, NodeUnreachable):
            routing.report_failure(node.url)
            raise NodeFailed(node, answer)
        if answer.status >= 400:
            return relay(answer, node)
    first = answers[0]
    assert isinstance(first, ForwardedResponse)
    return relay(first, nodes[0])


def _other(call: ProxyCall) -> ProxyResult:
    """Every other endpoint: the pinned node when there is one (its state is the caller's), else a chosen one."""
    key = call.caller.pin_key
    remembered = routing.user_model(key)
    node, response = attempt(lambda excluded: pinned_or_chosen(key, remembered, excluded), _send(call))
    return relay(response, node)


HANDLERS: dict[CallKind, Callable[[ProxyCall], ProxyResult]] = {
    CallKind.GENERATION: _generation,
    CallKind.PROGRESS: _progress,
    CallKind.INTERRUPT: _control,
    CallKind.SKIP: _control,
    CallKind.OPTIONS: _options,
    CallKind.LISTING: _listing,
    CallKind.REFRESH: _refresh,
    CallKind.OTHER: _other,
}


# ----------------------------------------------------------------------------------------------- node choice


def attempt(
    choose: Callable[[frozenset[str]], NodeState | None], send: Callable[[NodeState], ForwardedResponse]
) -> tuple[NodeState, ForwardedResponse]:
    """Send a call to a chosen node, failing over once when that is safe.

    1. Choose a node (NoNodeAvailable when none qualifies).
    2. Send. A transport failure counts against the node at once (a passive failure).
    3. A failure before the request reached the node (refused, connect timeout) is sent once more to another
       node; any other failure, or a second one, is a NodeFailed (502): the call may have run there.
    """
    excluded: frozenset[str] = frozenset()
    while True:
        node = choose(excluded)
        if node is None:
            raise NoNodeAvailable()
        try:
            return node, send(node)
        except NodeUnreachable as failure:
            routing.report_failure(node.url)
            if not failure.retry_safe or excluded:
                raise NodeFailed(node, failure) from failure
            log.warning("node %s refused a call (%s); trying another node", node.url, failure.reason)
            excluded = excluded | {node.url}


def pinned_or_chosen(pin_key: str, model: str | None, excluded: frozenset[str]) -> NodeState | None:
    """The pinned node when the pin is live, else the node a new cycle would get (without pinning)."""
    found = pinning.lookup(pin_key)
    if found.state is PinState.LIVE and found.node is not None and found.node.url not in excluded:
        pinning.refresh(pin_key)
        return found.node
    return routing.choose_node(user_key=pin_key, model=model, exclude=excluded)


# --------------------------------------------------------------------------------------------------- sending


def outgoing_headers(call: ProxyCall) -> dict[str, str]:
    headers = {key: value for key, value in call.headers if key.lower() not in DROPPED_REQUEST_HEADERS}
    earlier = call.header("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{earlier}, {call.client_address}" if earlier else call.client_address
    if call.caller.user:
        headers.update(user_headers(call.caller.user, is_staff=call.caller.is_staff))
    return headers


def forward(node: NodeState, call: ProxyCall, *, timeout: float, body: bytes | None = None) -> ForwardedResponse:
    return get_node_client().forward(
        node.url,
        call.method,
        call.path,
        headers=outgoing_headers(call),
        body=call.body if body is None else body,
        query=call.query,
        timeout=timeout,
    )


def _send(call: ProxyCall) -> Callable[[NodeState], ForwardedResponse]:
    return lambda node: forward(node, call, timeout=DEFAULT_READ_TIMEOUT)


def _try_forward(node: NodeState, call: ProxyCall, timeout: float) -> ForwardedResponse | NodeUnreachable:
    try:
        return forward(node, call, timeout=timeout)
    except NodeUnreachable as error:
        return error


_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="balancer-fanout")


def _forward_watched(node: NodeState, call: ProxyCall, body: bytes) -> ForwardedResponse:
    """Forward a long call on a helper thread while watching the node's health: when the node goes down (failed
    checks or passive failures) or restarts, give up at once instead of waiting for a read timeout."""
    outcome: list[ForwardedResponse | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(forward(node, call, timeout=GENERATION_READ_TIMEOUT, body=body))
        except BaseException as error:  # handed to the waiting thread, which raises it
            outcome.append(error)
        finally:
            done.set()

    threading.Thread(target=run, name=f"generation-{node.node_id}", daemon=True).start()
    watch_every = min(0.5, settings.SD_HEALTH_INTERVAL / 2)
    while not done.wait(watch_every):
        now = routing.node_state(node.url)
        if now is None or not now.healthy or now.boot_id != node.boot_id:
            raise NodeUnreachable(node.url, "the node went down during the call", retry_safe=False)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def relay(response: ForwardedResponse, node: NodeState) -> ProxyResult:
    headers = tuple((key, value) for key, value in response.headers if key.lower() not in DROPPED_RESPONSE_HEADERS)
    return ProxyResult(status=response.status, body=response.body, headers=headers, node_id=node.node_id or node.url)


# ------------------------------------------------------------------------------------------------ documents


def progress_document(*, textinfo: str | None = None) -> dict[str, Any]:
    """A1111's idle progress (webuiapi's util_wait_for_ready reads progress 0 and job_count 0 as idle)."""
    state = {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
    }  # fmt: skip
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": textinfo}


def _requested_model(body: bytes) -> str | None:
    document = _json_object(body)
    model = document.get("sd_model_checkpoint") if document else None
    return model if isinstance(model, str) and model else None


def with_user_model(body: bytes, remembered: str | None) -> tuple[bytes, str | None]:
    """The generation body with the caller's remembered model as override_settings.sd_model_checkpoint (unless the
    body names one), and the model the call asks for."""
    document = _json_object(body)
    if document is None:
        return body, remembered
    overrides = document.get("override_settings")
    overrides = overrides if isinstance(overrides, dict) else {}
    requested = overrides.get("sd_model_checkpoint")
    if isinstance(requested, str) and requested:
        return body, requested
    if remembered is None:
        return body, None
    document["override_settings"] = {**overrides, "sd_model_checkpoint": remembered}
    return json.dumps(document).encode(), remembered


def _with_model_shown(response: ForwardedResponse, remembered: str | None) -> ForwardedResponse:
    """GET options from any node shows the model the caller chose (the node serving now may not know it)."""
    document = _json_object(response.body) if response.status == 200 and remembered else None
    if document is None:
        return response
    document["sd_model_checkpoint"] = remembered
    return ForwardedResponse(
        status=response.status, headers=response.headers, body=json.dumps(document).encode(), node_url=response.node_url
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def merge_listings(documents: Iterable[Any]) -> Any:
    """Lists: every item once (by title, name or model_name, else its JSON); objects: merged key by key."""
    documents = list(documents)
    first = documents[0]
    if isinstance(first, list):
        seen: set[str] = set()
        merged = []
        for document in documents:
            for item in document if isinstance(document, list) else ():
                identity = _item_identity(item)
                if identity not in seen:
                    seen.add(identity)
                    merged.append(item)
        return merged
    if isinstance(first, dict):
        keys = list(dict.fromkeys(key for document in documents if isinstance(document, Mapping) for key in document))
        return {
            key: merge_listings([document[key] for document in documents if isinstance(document, Mapping)
                                 and key in document])
            for key in keys
        }  # fmt: skip
    return first


def _item_identity(item: Any) -> str:
    if isinstance(item, Mapping):
        for field in ("title", "name", "model_name"):
            if isinstance(item.get(field), str):
                return f"{field}:{item[field]}"
    return json.dumps(item, sort_keys=True)
