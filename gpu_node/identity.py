"""Who is calling (DESIGN §2): API tokens, HTTP Basic logins, the balancer's signed X-SD-User header and, in open
mode, the X-User-Id header or `user_id` field; and NodeAPIView, the base class of every node API view."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import (
    BaseAuthentication,
    BasicAuthentication,
    SessionAuthentication,
    TokenAuthentication,
    get_authorization_header,
)
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gpu_node.errors import RequestValidationError, StaffRequiredError, a1111_exception_handler

ANONYMOUS = "anonymous"
USER_HEADER = "X-User-Id"
USER_FIELD = "user_id"
SIGNED_USER_HEADER = "X-SD-User"
NODE_SECRET_HEADER = "X-SD-Node-Secret"
SIGNATURE_MAX_AGE_S = 300
MAX_USER_NAME_LENGTH = 150
"""The length of Job.user and UserOptions.user."""

CREDENTIALS_CACHE_S = 60.0
"""How long a checked Basic login is remembered: Django's password hash costs ~0.5 s of CPU per check, and clients
send Basic credentials with every call (progress polling included)."""


@dataclass(frozen=True, kw_only=True)
class UserIdentity:
    name: str
    is_staff: bool = False


ANONYMOUS_USER = UserIdentity(name=ANONYMOUS)


# --------------------------------------------------------------------------------------- the balancer's header


def sign_user_header(user: str, *, is_staff: bool, secret: str, now: float | None = None) -> str:
    """The X-SD-User value vouching for `user`: `<user>|<is_staff 0/1>|<unix time>|<hex HMAC-SHA256 of the rest>`.
    The user name is percent-encoded, so names with `|` or non-ASCII characters survive the header."""
    timestamp = int(time.time() if now is None else now)
    signed = f"{quote(user, safe='')}|{int(is_staff)}|{timestamp}"
    return f"{signed}|{_signature(signed, secret)}"


def verify_user_header(value: str, *, secret: str, now: float | None = None) -> UserIdentity:
    """The user a valid X-SD-User value names; AuthenticationFailed when forged, malformed or older than 300 s."""
    parts = value.strip().split("|")
    if len(parts) != 4:
        raise AuthenticationFailed("malformed X-SD-User header")
    user, staff, timestamp, signature = parts
    if not hmac.compare_digest(signature.encode(), _signature(f"{user}|{staff}|{timestamp}", secret).encode()):
        raise AuthenticationFailed("invalid X-SD-User signature")
    if staff not in ("0", "1") or not timestamp.isdigit():
        raise AuthenticationFailed("malformed X-SD-User header")
    clock = time.time() if now is None else now
    if abs(clock - int(timestamp)) > SIGNATURE_MAX_AGE_S:
        raise AuthenticationFailed("expired X-SD-User header; are the balancer's and the node's clocks in sync?")
    return UserIdentity(name=checked_user_name(unquote(user), loc=("header", "x-sd-user")), is_staff=staff == "1")


def _signature(signed: str, secret: str) -> str:
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()


def has_node_secret(request: Request) -> bool:
    """The request carries SD_NODE_SECRET (the balancer's own calls)."""
    secret = settings.SD_NODE_SECRET
    given = request.headers.get(NODE_SECRET_HEADER, "")
    return bool(secret) and hmac.compare_digest(secret.encode(), given.encode())


# ------------------------------------------------------------------------------------------- authentication


@dataclass(frozen=True, kw_only=True)
class ForwardedUser:
    """DRF's `request.user` for a request the balancer vouched for in X-SD-User."""

    username: str
    is_staff: bool

    @property
    def is_authenticated(self) -> bool:
        return True

    def get_username(self) -> str:
        return self.username


class SignedUserAuthentication(BaseAuthentication):
    """X-SD-User, when this node has SD_NODE_SECRET; without a secret the header means nothing."""

    def authenticate(self, request: Request) -> tuple[ForwardedUser, None] | None:
        value = request.headers.get(SIGNED_USER_HEADER)
        if not value or not settings.SD_NODE_SECRET:
            return None
        identity = verify_user_header(value, secret=settings.SD_NODE_SECRET)
        return ForwardedUser(username=identity.name, is_staff=identity.is_staff), None


class BearerTokenAuthentication(TokenAuthentication):
    """DRF tokens sent as `Authorization: Bearer <key>` (DESIGN §2) or DRF's own `Token <key>`."""

    keyword = "Bearer"
    keywords = (b"bearer", b"token")

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        words = get_authorization_header(request).split()
        if not words or words[0].lower() not in self.keywords:
            return None
        if len(words) != 2:
            raise AuthenticationFailed("Invalid token header: expected 'Authorization: Bearer <token>'")
        try:
            key = words[1].decode()
        except UnicodeError:
            raise AuthenticationFailed("Invalid token") from None
        return self.authenticate_credentials(key)


class A1111BasicAuthentication(BasicAuthentication):
    """HTTP Basic with a Django user's name and password, as `webuiapi.set_auth` sends it (A1111's --api-auth)."""

    _verified: dict[str, tuple[Any, str, float]] = {}
    _lock = threading.Lock()

    def authenticate_credentials(self, userid: str, password: str, request: Any = None) -> tuple[Any, None]:
        digest = hmac.new(settings.SECRET_KEY.encode(), f"{userid}\0{password}".encode(), hashlib.sha256).hexdigest()
        user = self._remembered(digest)
        if user is None:
            user = authenticate(request=request, username=userid, password=password)
            if user is None or not user.is_active:
                raise AuthenticationFailed("Incorrect username or password")
            with self._lock:
                self._verified[digest] = (user.pk, user.password, time.monotonic() + CREDENTIALS_CACHE_S)
        return user, None

    def _remembered(self, digest: str) -> Any:
        with self._lock:
            entry = self._verified.get(digest)
            now = time.monotonic()
            for key in [key for key, (_, _, expiry) in self._verified.items() if expiry < now]:
                del self._verified[key]
        if entry is None or entry[2] < now:
            return None
        user = get_user_model().objects.filter(pk=entry[0], is_active=True).first()
        # A changed password (a new hash) invalidates what was remembered.
        return user if user is not None and user.password == entry[1] else None


class SignedUserScheme(OpenApiAuthenticationExtension):
    """The OpenAPI security schemes of our authentication classes (drf-spectacular does not know subclasses)."""

    target_class = SignedUserAuthentication
    name = "signedUser"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "apiKey", "in": "header", "name": SIGNED_USER_HEADER}


class A1111BasicScheme(OpenApiAuthenticationExtension):
    target_class = A1111BasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "basic"}


# ------------------------------------------------------------------------------------------------- identity


def checked_user_name(name: str, *, loc: tuple[str, ...]) -> str:
    """A user name as the node stores it (Job.user): 1-150 characters, no control characters."""
    cleaned = name.strip()
    if not cleaned or len(cleaned) > MAX_USER_NAME_LENGTH or any(ord(c) < 32 or ord(c) == 127 for c in cleaned):
        raise RequestValidationError.at(
            loc, f"a user id is 1 to {MAX_USER_NAME_LENGTH} characters without control characters"
        )
    return cleaned


def trusts_client_identity() -> bool:
    """Open mode takes the user a client names, except on a node behind a balancer that signs users: such a node
    (SD_ROLE=node with SD_NODE_SECRET) trusts only X-SD-User and real logins. In `all` the process is the front
    door, so it keeps trusting clients."""
    if settings.SD_AUTH != "open":
        return False
    return not (settings.SD_NODE_SECRET and settings.SD_ROLE == "node")


def current_user(request: Request) -> UserIdentity:
    """The caller: a login (token, Basic, X-SD-User) always wins; then, where clients are trusted, X-User-Id, then a
    `user_id` field in a JSON body; else `anonymous`."""
    user = request.user
    if user is not None and user.is_authenticated:
        return UserIdentity(name=user.get_username(), is_staff=bool(getattr(user, "is_staff", False)))
    if not trusts_client_identity():
        return ANONYMOUS_USER
    claimed = request.headers.get(USER_HEADER)
    if claimed:
        return UserIdentity(name=checked_user_name(claimed, loc=("header", USER_HEADER.lower())))
    data = request.data
    claimed_in_body = data.get(USER_FIELD) if isinstance(data, Mapping) else None
    if claimed_in_body not in (None, ""):
        return UserIdentity(name=checked_user_name(str(claimed_in_body), loc=("body", USER_FIELD)))
    return ANONYMOUS_USER


def may_administer(user: UserIdentity) -> bool:
    """Admin actions (rescans, unloading models, node-wide options) need a staff user in token mode."""
    return settings.SD_AUTH != "token" or user.is_staff


# ------------------------------------------------------------------------------------------ permissions, view


class TokenModePermission(BasePermission):
    """SD_AUTH=token: every call needs a login (token, Basic, X-SD-User) or the node secret; otherwise A1111's 401."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if settings.SD_AUTH != "token":
            return True
        return bool(request.user and request.user.is_authenticated) or has_node_secret(request)


class StaffPermission(BasePermission):
    """Admin endpoints: staff only in token mode (see may_administer)."""

    message = StaffRequiredError.default_detail

    def has_permission(self, request: Request, view: APIView) -> bool:
        return may_administer(current_user(request))


class A1111JSONRenderer(JSONRenderer):
    """JSON, with None written as `null`: A1111's control endpoints answer `null`, and clients decode every body."""

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        if data is None:
            return b"null"
        return super().render(data, accepted_media_type, renderer_context)


class NodeAPIView(APIView):
    """Base of every node API view: who may call (logins, token mode), JSON out, A1111's error shapes, and A1111's
    X-Process-Time header on every response."""

    # Sessions last: the /multi_demo/ page's logged-in browser (CSRF-checked on unsafe methods); API clients send none.
    authentication_classes = [
        SignedUserAuthentication,
        BearerTokenAuthentication,
        A1111BasicAuthentication,
        SessionAuthentication,
    ]
    permission_classes = [TokenModePermission]
    renderer_classes = [A1111JSONRenderer]
    _started = 0.0

    def get_exception_handler(self) -> Any:
        return a1111_exception_handler

    def get_authenticate_header(self, request: Request) -> str:
        # Any value keeps DRF answering 401 (not 403); like A1111, the handler sends no challenge header.
        return 'Basic realm="sd-multi"'

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Request:
        self._started = time.perf_counter()
        return super().initialize_request(request, *args, **kwargs)

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["X-Process-Time"] = f"{time.perf_counter() - self._started:.4f}"
        return response
