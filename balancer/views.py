"""The balancer's HTTP edge: the A1111 API proxy, `/balancer/status`, node self-registration, drain/undrain, and
metrics. Views identify the caller, make one call, and serialize."""

from __future__ import annotations

import hmac
import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import APIException, NotAuthenticated, ParseError, UnsupportedMediaType
from rest_framework.parsers import JSONParser
from rest_framework.request import Request

from balancer import dispatcher, metrics, pinning, proxy, registry, routing
from balancer.models import Node
from balancer.pinning import Caller
from balancer.proxy import ProxyCall, ProxyResult
from gpu_node.errors import StaffRequiredError, a1111_exception_handler
from gpu_node.identity import (
    ANONYMOUS,
    ANONYMOUS_USER,
    NODE_SECRET_HEADER,
    SIGNED_USER_HEADER,
    USER_HEADER,
    NodeAPIView,
    checked_user_name,
    current_user,
    trusts_client_identity,
)

# Set on every call the balancer forwards: a call that comes back to a balancer (the local node of `all`, or a
# misconfigured SD_NODES pointing at a balancer) is answered as an unknown route instead of looping.
VIA_HEADER = "X-SD-Via"
CREDENTIAL_HEADERS = ("Authorization", SIGNED_USER_HEADER)


def _error_response(error: APIException) -> JsonResponse:
    """The node API's answer to the same error (A1111's shapes), so clients see one API whoever answers."""
    answer = a1111_exception_handler(error, {})
    return JsonResponse(answer.data, status=answer.status_code, safe=False)


def _a1111_error(status: int, error: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": error, "detail": detail, "body": "", "errors": ""}, status=status)


# ---------------------------------------------------------------------------------------------------- callers


def client_address(request: HttpRequest) -> str:
    """The client's address (it tells apart callers naming no user). Behind Apache (SD_BEHIND_PROXY) the last hop
    of X-Forwarded-For, which Apache appended: the hops before it are whatever the client sent. Without a proxy
    the header is the client's own claim and only the peer address counts."""
    if settings.SD_BEHIND_PROXY:
        hops = [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return str(request.META.get("REMOTE_ADDR", ""))


def identify(request: HttpRequest) -> Caller:
    """Who calls, by the node's own rules (gpu_node.identity: token, Basic, X-SD-User; in open mode X-User-Id or the
    body's user_id). A caller naming no user is known by address. Raises NotAuthenticated in token mode without
    credentials, AuthenticationFailed for bad ones, RequestValidationError for an unusable user id."""
    body = request.body  # read before DRF parses, so the proxy can still forward the raw bytes
    address = client_address(request)
    if not body and settings.SD_AUTH == "open" and not any(name in request.headers for name in CREDENTIAL_HEADERS):
        # The common progress poll: no credentials and no body, so only X-User-Id can name the caller. Skipping
        # DRF's request machinery here is a tenth of the balancer's time per poll.
        claimed = request.headers.get(USER_HEADER, "")
        if claimed and trusts_client_identity():
            return Caller(user=checked_user_name(claimed, loc=("header", USER_HEADER.lower())), address=address)
        return Caller(user=None, address=address)
    drf_request = Request(
        request, parsers=[JSONParser()], authenticators=[kind() for kind in NodeAPIView.authentication_classes]
    )
    try:
        user = current_user(drf_request)
    except (ParseError, UnsupportedMediaType):
        user = ANONYMOUS_USER  # a body the node will refuse has no user_id to read
    logged_in = bool(drf_request.user and drf_request.user.is_authenticated)
    if settings.SD_AUTH == "token" and not logged_in:
        raise NotAuthenticated()
    if not logged_in and user.name == ANONYMOUS:
        return Caller(user=None, address=address)
    return Caller(user=user.name, is_staff=user.is_staff, address=address)


def _caller_or_none(request: HttpRequest) -> Caller | None:
    try:
        return identify(request)
    except APIException:
        return None


# ------------------------------------------------------------------------------------------------------ proxy


@csrf_exempt
def api_proxy(request: HttpRequest) -> HttpResponse:
    """Every /sdapi/v1/* endpoint and the /txt2img_v2/, /img2img_v2/ aliases, through the nodes."""
    if request.headers.get(VIA_HEADER):
        return JsonResponse({"detail": "Not Found"}, status=404)
    dispatcher.ensure_balancer_threads()
    try:
        caller = identify(request)
    except APIException as error:
        return _error_response(error)
    call = ProxyCall(
        caller=caller,
        method=request.method or "GET",
        path=request.path,
        query=request.META.get("QUERY_STRING", ""),
        headers=(*request.headers.items(), (VIA_HEADER, "balancer")),
        body=request.body,
        client_address=str(request.META.get("REMOTE_ADDR", "")),
    )
    return _response(proxy.proxy(call))


def _response(result: ProxyResult) -> HttpResponse:
    response = HttpResponse(result.body, status=result.status)
    for key, value in result.headers:
        response[key] = value
    if result.node_id:
        response["X-SD-Node"] = result.node_id
    return response


# ----------------------------------------------------------------------------------------------- status, nodes


def status(request: HttpRequest) -> JsonResponse:
    """GET /balancer/status: the nodes with their health, how many are up, the caller's pin, total queue depth."""
    dispatcher.ensure_balancer_threads()
    nodes = routing.known_nodes(fresh=True)
    caller = _caller_or_none(request)
    pin = pinning.current_pin(caller.pin_key, fresh=True) if caller else None
    return JsonResponse({
        "nodes": [_node_document(node) for node in nodes],
        "up": sum(node.healthy for node in nodes),
        "total": len(nodes),
        "draining": sum(node.draining for node in nodes),
        "queue_depth": sum(node.queue_depth for node in nodes),
        "pin": {"node_id": pin.node_id, "url": pin.node_url, "lost": pin.lost} if pin else None,
        "user": caller.user if caller else None,
    })  # fmt: skip


def _node_document(node: routing.NodeState) -> dict[str, Any]:
    return {
        "id": node.id, "url": node.url, "name": node.name, "node_id": node.node_id, "status": node.status,
        "healthy": node.healthy, "draining": node.draining, "queue_depth": node.queue_depth,
        "capacity": node.capacity, "loaded_models": list(node.loaded_models), "models": list(node.models),
        "checked_at": node.checked_at,
    }  # fmt: skip


@csrf_exempt
def register_node(request: HttpRequest) -> JsonResponse:
    """POST /balancer/nodes/register {"url", "node_id"} with X-SD-Node-Secret: a node announces itself (and
    heartbeats the same way). Without SD_NODE_SECRET only an open-mode balancer accepts registrations."""
    if request.method != "POST":
        return JsonResponse({"detail": "Method Not Allowed"}, status=405)
    secret = settings.SD_NODE_SECRET
    if not secret and settings.SD_AUTH == "token":
        return _a1111_error(403, "PermissionDenied", "set SD_NODE_SECRET on balancer and nodes to allow registration")
    given = request.headers.get(NODE_SECRET_HEADER, "")
    if secret and not hmac.compare_digest(secret.encode(), given.encode()):
        return _a1111_error(403, "PermissionDenied", f"a valid {NODE_SECRET_HEADER} header is required")
    try:
        document = json.loads(request.body or b"null")
        url = registry.checked_node_url(document.get("url") if isinstance(document, dict) else None)
    except ValueError as error:
        entry = {"loc": ["body", "url"], "msg": str(error), "type": "value_error"}
        return JsonResponse({"detail": [entry]}, status=422)
    node = registry.register(url, node_id=str(document.get("node_id") or ""))
    return JsonResponse({"id": node.id, "url": node.url, "draining": node.draining})


@csrf_exempt
def drain_node(request: HttpRequest, node_id: int, *, draining: bool) -> JsonResponse:
    """POST /balancer/nodes/<id>/drain and /undrain (staff only in token mode)."""
    if request.method != "POST":
        return JsonResponse({"detail": "Method Not Allowed"}, status=405)
    try:
        caller = identify(request)
    except APIException as error:
        return _error_response(error)
    if settings.SD_AUTH == "token" and not caller.is_staff:
        return _error_response(StaffRequiredError())
    node = get_object_or_404(Node, pk=node_id)
    if draining:
        node.drain()
    else:
        node.undrain()
    state = routing.node_state(node.url, fresh=True)
    return JsonResponse(_node_document(state) if state else {"id": node.id, "url": node.url, "draining": draining})


def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)
