"""Per-user A1111 options (DESIGN §3): A1111's defaults (gpu_node/data/a1111_options_defaults.tsv), the node's defaults
on top, node-wide and per-user values stored in UserOptions, and a request's override_settings on top of those."""

from __future__ import annotations

import ast
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from django.db import transaction
from rest_framework import serializers

from gpu_node.errors import RequestValidationError, StaffRequiredError, field_location
from gpu_node.identity import UserIdentity, may_administer
from gpu_node.models import UserOptions
from gpu_node.runtime import get_engine
from gpu_node.serializers import A1111BooleanField, A1111FloatField, A1111IntegerField, A1111StringField
from sd_core.errors import CheckpointNotFoundError, InvalidInputError
from sd_core.infotext import IMAGE_FORMATS
from sd_core.prompts import Emphasis

DEFAULTS_FILE = Path(__file__).resolve().parent / "data" / "a1111_options_defaults.tsv"

NODE_WIDE = ""
"""The UserOptions row of node-wide values (staff only in token mode); no user is named "" (no name is anonymous)."""

DERIVED_OPTIONS = frozenset({"sd_checkpoint_hash"})
"""Computed from sd_model_checkpoint; a posted value is ignored (clients post back what GET returned)."""

# What A1111 evaluates the defaults that the table holds as source expressions to (a webui started in its folder).
_EVALUATED_DEFAULTS: dict[str, Any] = {
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_extras_samples": "outputs/extras-images",
    "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
    "outdir_save": "log/images",
    "outdir_init_images": "outputs/init-images",
    "enable_console_prompts": False,
}


def read_defaults(path: Path) -> dict[str, Any]:
    """key -> default from the table: Python literals parsed, other expressions None unless A1111's value is known."""
    defaults: dict[str, Any] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, literal = line.split("\t")[:2]
        try:
            defaults[key] = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            defaults[key] = _EVALUATED_DEFAULTS.get(key)
    return defaults


A1111_DEFAULTS: dict[str, Any] = read_defaults(DEFAULTS_FILE)


# ---------------------------------------------------------------------------------------------------- values

OptionCleaner = Callable[[Any, str], Any]


def _typed(field: serializers.Field) -> OptionCleaner:
    """A value coerced and bounded like a request field; errors name the option."""

    def clean(value: Any, name: str) -> Any:
        try:
            return field.run_validation(value)
        except serializers.ValidationError as error:
            raise serializers.ValidationError({name: error.detail}) from None

    return clean


def _choice(choices: Collection[str], *, lower: bool = False) -> OptionCleaner:
    as_text = _typed(A1111StringField())

    def clean(value: Any, name: str) -> str:
        text = as_text(value, name)
        text = text.lower() if lower else text
        if text not in choices:
            raise InvalidInputError(name, f"unknown value {text!r}", valid_values=list(choices))
        return text

    return clean


def _checkpoint(value: Any, name: str) -> str:
    """Any A1111 alias of a checkpoint, stored as its canonical title."""
    return get_engine().registry.resolve(_typed(A1111StringField())(value, name), field=name).title


def _vae(value: Any, name: str) -> str:
    text = _typed(A1111StringField())(value, name)
    vae = get_engine().registry.resolve_vae(text, field=name)
    return vae.name if vae is not None else text.strip() or "Automatic"


_BOOLEAN = _typed(A1111BooleanField())

# The options the node acts on are checked; the others are stored as sent (A1111 does not check any).
_CLEANERS: dict[str, OptionCleaner] = {
    "sd_model_checkpoint": _checkpoint,
    "sd_vae": _vae,
    "CLIP_stop_at_last_layers": _typed(A1111IntegerField(min_value=1, max_value=12)),
    "samples_format": _choice(IMAGE_FORMATS, lower=True),
    "emphasis": _choice([mode.value for mode in Emphasis]),
    "eta_noise_seed_delta": _typed(A1111IntegerField(min_value=0, max_value=2**32)),
    "eta_ancestral": _typed(A1111FloatField(min_value=0.0, max_value=1.0)),
    "eta_ddim": _typed(A1111FloatField(min_value=0.0, max_value=1.0)),
    "initial_noise_multiplier": _typed(A1111FloatField(min_value=0.0, max_value=2.0)),
    "show_progress_every_n_steps": _typed(A1111IntegerField(min_value=-1, max_value=1000)),
    "jpeg_quality": _typed(A1111IntegerField(min_value=1, max_value=100)),
    "live_previews_enable": _BOOLEAN,
    "img2img_fix_steps": _BOOLEAN,
    "enable_pnginfo": _BOOLEAN,
    "add_model_hash_to_info": _BOOLEAN,
    "add_model_name_to_info": _BOOLEAN,
    "add_version_to_infotext": _BOOLEAN,
}


def clean_options(values: Any, *, prefix: str = "") -> dict[str, Any]:
    """Posted option values, checked: unknown keys are a 422 naming the key (A1111 ignores them only when null), the
    options the node uses are coerced and checked, a checkpoint alias becomes its title. None means "the default".
    `prefix` ("override_settings.") locates errors in the request."""
    if not isinstance(values, Mapping):
        raise RequestValidationError.not_a_dict(field_location(prefix.rstrip(".")) if prefix else ("body",))
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in DERIVED_OPTIONS:
            continue
        if key not in A1111_DEFAULTS:
            if value is None:
                continue
            raise InvalidInputError(name, f"unknown option '{key}'; GET /sdapi/v1/options lists every option")
        cleaned[key] = None if value is None else _CLEANERS.get(key, _as_sent)(value, name)
    return cleaned


def _as_sent(value: Any, name: str) -> Any:
    return value


# ---------------------------------------------------------------------------------------------- the layers


def node_defaults() -> dict[str, Any]:
    """A1111's defaults with the node's model: the first checkpoint of the models folder (sorted by name)."""
    defaults = dict(A1111_DEFAULTS)
    if defaults.get("sd_model_checkpoint") is None:
        checkpoints = get_engine().registry.checkpoints()
        defaults["sd_model_checkpoint"] = checkpoints[0].title if checkpoints else None
    return defaults


def _stored(*owners: str) -> dict[str, dict[str, Any]]:
    rows = UserOptions.objects.filter(user__in=owners).values_list("user", "values")
    return {owner: {k: v for k, v in values.items() if k in A1111_DEFAULTS} for owner, values in rows}


def _with_checkpoint_hash(options: dict[str, Any]) -> dict[str, Any]:
    """sd_checkpoint_hash follows sd_model_checkpoint (webuiapi's util_get_current_model may read either)."""
    title = options.get("sd_model_checkpoint")
    try:
        options["sd_checkpoint_hash"] = get_engine().registry.resolve(str(title)).sha256 if title else ""
    except CheckpointNotFoundError:
        options["sd_checkpoint_hash"] = ""
    return options


def get_options(user: str) -> dict[str, Any]:
    """What GET /sdapi/v1/options shows `user`: every A1111 option key, from the defaults, the node-wide values and
    the user's own values, in that order of precedence (last wins)."""
    options = node_defaults()
    stored = _stored(NODE_WIDE, user)
    options.update(stored.get(NODE_WIDE, {}))
    options.update(stored.get(user, {}))
    return _with_checkpoint_hash(options)


def effective_options(user: str, override_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options one request runs with: the user's, with the request's override_settings on top (checked like a
    POST /options; an unknown checkpoint is a 422 naming override_settings.sd_model_checkpoint)."""
    options = get_options(user)
    if override_settings is None:
        return options
    overrides = clean_options(override_settings, prefix="override_settings.")
    options.update({key: value for key, value in overrides.items() if value is not None})
    return _with_checkpoint_hash(options)


def set_options(user: UserIdentity, values: Mapping[str, Any], *, node_wide: bool = False) -> None:
    """POST /sdapi/v1/options: A1111's semantics, per user. Every value is checked before any is saved; a null value
    resets that option to its default; values equal to the default are not stored, so the user follows later
    changes of the default. `node_wide` (`?global=1`) changes the default for everyone: staff only in token mode."""
    if node_wide and not may_administer(user):
        raise StaffRequiredError("node-wide options (?global=1) need a staff user")
    cleaned = clean_options(values)
    owner = NODE_WIDE if node_wide else user.name
    with transaction.atomic():
        row, _ = UserOptions.objects.select_for_update().get_or_create(user=owner)
        baseline = node_defaults()
        if not node_wide:
            baseline.update(_stored(NODE_WIDE).get(NODE_WIDE, {}))
        merged = {**row.values, **cleaned}
        row.values = {
            key: value
            for key, value in merged.items()
            if key in A1111_DEFAULTS and value is not None and value != baseline.get(key)
        }
        row.save(update_fields=["values", "updated_at"])
