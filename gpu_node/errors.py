"""The node API's errors and its one exception handler, which gives every failure AUTOMATIC1111's JSON shape: FastAPI's
422 `{"detail": [{"loc", "msg", "type"}]}` for bad input, A1111's `{"error", "detail", "body", "errors"}` otherwise."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import set_rollback

from sd_core.errors import CheckpointRefusedError, DeviceOutOfMemoryError, InvalidInputError

log = logging.getLogger(__name__)

IMAGE_FIELDS = frozenset({"init_images", "mask", "image", "firstpass_image", "latent_mask"})
"""Request fields holding base64 images: a bad one is A1111's image error, not a validation error."""

OUT_OF_MEMORY_MESSAGE = "the GPU ran out of memory for this request; try a smaller size or batch"

Location = tuple[str | int, ...]

# DRF's error codes as FastAPI/pydantic v1 names them; our own fields fail with the pydantic names directly.
_FASTAPI_TYPES = {
    "required": "value_error.missing",
    "null": "type_error.none.not_allowed",
    "invalid": "value_error",
    "max_value": "value_error.number.not_le",
    "min_value": "value_error.number.not_ge",
    "max_length": "value_error.any_str.max_length",
    "not_a_dict": "type_error.dict",
    "not_a_list": "type_error.list",
}
_INDEX = re.compile(r"\[(\d+)\]")


# ----------------------------------------------------------------------------------------------------- errors


class RequestValidationError(exceptions.APIException):
    """FastAPI's RequestValidationError: 422 with entries `{"loc", "msg", "type"}` that name what is wrong."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "request validation failed"

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(detail="; ".join(str(error["msg"]) for error in errors))
        self.errors = [dict(error) for error in errors]

    @classmethod
    def at(cls, loc: Location, message: str, *, error_type: str = "value_error") -> RequestValidationError:
        return cls([{"loc": list(loc), "msg": message, "type": error_type}])

    @classmethod
    def body_missing(cls) -> RequestValidationError:
        return cls.at(("body",), "field required", error_type="value_error.missing")

    @classmethod
    def not_a_dict(cls, loc: Location = ("body",)) -> RequestValidationError:
        return cls.at(loc, "value is not a valid dict", error_type="type_error.dict")


class A1111HTTPException(exceptions.APIException):
    """An error A1111 answers with its four keys; `error_name` is what it shows as "error"."""

    error_name = "HTTPException"


class InitImageNotFoundError(A1111HTTPException):
    status_code = status.HTTP_404_NOT_FOUND
    default_detail = "Init image not found"


class ScriptNotFoundError(A1111HTTPException):
    """A selectable or always-on script the node does not have (it has none): A1111's 422."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY


class StaffRequiredError(A1111HTTPException):
    status_code = status.HTTP_403_FORBIDDEN
    default_detail = "this needs a staff user (SD_AUTH=token)"


class _RetryLaterError(A1111HTTPException):
    """A busy node: the client should come back after `retry_after` seconds (sent as Retry-After)."""

    def __init__(self, *, retry_after: int, detail: str | None = None) -> None:
        super().__init__(detail=detail)
        self.retry_after = retry_after


class QueueFullError(_RetryLaterError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "the node's queue is full; retry later"
    error_name = "QueueFullError"


class UserQueueFullError(_RetryLaterError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = "you have too many queued jobs on this node; wait for one to finish"
    error_name = "UserQueueFullError"


class JobFailedError(A1111HTTPException):
    """A job that failed in the worker, answered with the status and message the worker recorded."""

    error_name = "JobFailedError"

    def __init__(self, *, status_code: int = status.HTTP_500_INTERNAL_SERVER_ERROR, detail: str = "") -> None:
        super().__init__(detail=detail or "the job failed")
        self.status_code = status_code


# ---------------------------------------------------------------------------------------------------- handler


def a1111_exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response:
    """The DRF exception handler of every node view (NodeAPIView.get_exception_handler)."""
    response = _response_for(exc)
    set_rollback()
    return response


def _response_for(exc: Exception) -> Response:
    if isinstance(exc, RequestValidationError):
        return Response({"detail": exc.errors}, status=exc.status_code)
    if isinstance(exc, exceptions.ValidationError):
        return Response({"detail": list(validation_entries(exc.detail))}, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
    if isinstance(exc, exceptions.ParseError):
        return Response({"detail": [_parse_error_entry(exc)]}, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
    if isinstance(exc, InvalidInputError):
        return _invalid_input(exc)
    if isinstance(exc, DeviceOutOfMemoryError):
        # The request's size caused it (4xx): a balancer must not count it against the node.
        return _four_keys(status.HTTP_422_UNPROCESSABLE_ENTITY, type(exc).__name__, OUT_OF_MEMORY_MESSAGE, str(exc))
    if isinstance(exc, CheckpointRefusedError):
        return _four_keys(status.HTTP_422_UNPROCESSABLE_ENTITY, type(exc).__name__, str(exc), str(exc))
    if isinstance(exc, exceptions.NotAuthenticated):
        return _four_keys(status.HTTP_401_UNAUTHORIZED, "HTTPException", "Not authenticated")
    if isinstance(exc, exceptions.AuthenticationFailed):
        return _four_keys(status.HTTP_401_UNAUTHORIZED, "HTTPException", str(exc.detail))
    if isinstance(exc, A1111HTTPException):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, _RetryLaterError) else None
        return _four_keys(exc.status_code, exc.error_name, str(exc.detail), headers=headers)
    if isinstance(exc, exceptions.NotFound | Http404):
        return Response({"detail": "Not Found"}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, exceptions.MethodNotAllowed):
        return Response({"detail": "Method Not Allowed"}, status=status.HTTP_405_METHOD_NOT_ALLOWED)
    if isinstance(exc, exceptions.Throttled):
        wait = getattr(exc, "wait", None)
        headers = {"Retry-After": str(int(wait))} if wait is not None else None
        return _four_keys(exc.status_code, "HTTPException", str(exc.detail), headers=headers)
    if isinstance(exc, exceptions.APIException):
        return _four_keys(exc.status_code, "HTTPException", str(exc.detail))
    if isinstance(exc, DjangoPermissionDenied):
        return _four_keys(status.HTTP_403_FORBIDDEN, "HTTPException", str(exc) or "Forbidden")
    if isinstance(exc, RequestDataTooBig):
        message = f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes (SD_MAX_REQUEST_BYTES)"
        return _four_keys(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "HTTPException", message)
    log.error("unexpected error in a node view", exc_info=exc)
    return _four_keys(status.HTTP_500_INTERNAL_SERVER_ERROR, type(exc).__name__, "", str(exc))


def _four_keys(
    status_code: int, error: str, detail: str, errors: str = "", *, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        {"error": error, "detail": detail, "body": "", "errors": errors}, status=status_code, headers=headers
    )


def _invalid_input(exc: InvalidInputError) -> Response:
    loc = field_location(exc.field)
    if loc[1:2] and loc[1] in IMAGE_FIELDS:
        return _four_keys(status.HTTP_422_UNPROCESSABLE_ENTITY, "InvalidImage", exc.message, exc.message)
    body: dict[str, Any] = {"detail": [{"loc": list(loc), "msg": exc.message, "type": "value_error"}]}
    if exc.valid_values:
        body["valid_values"] = list(exc.valid_values)
    return Response(body, status=status.HTTP_422_UNPROCESSABLE_ENTITY)


def field_location(field: str) -> Location:
    """An sd_core field name as a FastAPI location: "override_settings.sd_vae" -> ("body", "override_settings",
    "sd_vae"); "init_images[1]" -> ("body", "init_images", 1)."""
    loc: list[str | int] = ["body"]
    for part in field.split("."):
        name, *indexes = _INDEX.split(part)
        loc.append(name)
        loc.extend(int(index) for index in indexes if index)
    return tuple(loc)


def validation_entries(detail: Any, loc: Location = ("body",)) -> Iterator[dict[str, Any]]:
    """DRF's nested error detail (field -> messages, list index -> messages) as FastAPI's flat entries."""
    if isinstance(detail, Mapping):
        for key, value in detail.items():
            if key == api_settings.NON_FIELD_ERRORS_KEY:
                yield from validation_entries(value, loc)
            elif isinstance(key, int):
                yield from validation_entries(value, (*loc, key))
            else:
                yield from validation_entries(value, (*loc, *field_location(str(key))[1:]))
    elif isinstance(detail, list | tuple):
        for item in detail:
            yield from validation_entries(item, loc)
    else:
        code = getattr(detail, "code", None) or "invalid"
        yield {"loc": list(loc), "msg": str(detail), "type": _FASTAPI_TYPES.get(code, code)}


def _parse_error_entry(exc: exceptions.ParseError) -> dict[str, Any]:
    """FastAPI's entry for a body that is not JSON; DRF keeps the decoder's error as the exception's context."""
    cause = exc.__context__
    if isinstance(cause, json.JSONDecodeError):
        return {
            "loc": ["body", cause.pos],
            "msg": str(cause),
            "type": "value_error.jsondecode",
            "ctx": {"msg": cause.msg, "pos": cause.pos, "lineno": cause.lineno, "colno": cause.colno},
        }
    return {"loc": ["body", 0], "msg": str(exc.detail), "type": "value_error.jsondecode"}
