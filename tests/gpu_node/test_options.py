"""Per-user A1111 options: A1111's defaults with the node's model, per-user values (a user's model choice is that
user's only), checkpoint aliases stored as titles, node-wide values for staff, and per-request override_settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.exceptions import ValidationError

from gpu_node import runtime
from gpu_node.errors import RequestValidationError, StaffRequiredError, validation_entries
from gpu_node.identity import UserIdentity
from gpu_node.models import UserOptions
from gpu_node.options import A1111_DEFAULTS, DEFAULTS_FILE, effective_options, get_options, set_options
from sd_core.checkpoints import CheckpointInfo
from sd_core.errors import CheckpointNotFoundError, InvalidInputError

pytestmark = pytest.mark.django_db

ALICE = UserIdentity(name="alice")
BOB = UserIdentity(name="bob")
STAFF = UserIdentity(name="staff", is_staff=True)


@pytest.fixture(autouse=True)
def tiny_node(settings: Any, tiny_models_dir: Path) -> Iterator[None]:
    settings.SD_MODELS_DIR = str(tiny_models_dir)
    settings.SD_AUTH = "open"
    runtime.get_engine.cache_clear()
    yield
    runtime.get_engine.cache_clear()


def checkpoint(name: str) -> CheckpointInfo:
    return runtime.get_engine().registry.resolve(name)


# ------------------------------------------------------------------------------------------------- defaults


def test_the_defaults_hold_every_key_of_a1111s_table():
    keys = [line.split("\t")[0] for line in DEFAULTS_FILE.read_text().splitlines() if line and line[0] != "#"]
    assert list(A1111_DEFAULTS) == keys and len(keys) > 280
    assert A1111_DEFAULTS["samples_format"] == "png"
    assert A1111_DEFAULTS["CLIP_stop_at_last_layers"] == 1
    assert A1111_DEFAULTS["eta_ancestral"] == 1.0 and A1111_DEFAULTS["eta_ddim"] == 0.0
    assert A1111_DEFAULTS["quicksettings_list"] == ["sd_model_checkpoint"]
    assert A1111_DEFAULTS["outdir_txt2img_samples"] == "outputs/txt2img-images", "an expression A1111 evaluates"
    assert A1111_DEFAULTS["enable_console_prompts"] is False


def test_a_new_user_sees_every_key_with_the_nodes_model():
    options = get_options("newcomer")
    assert set(options) == set(A1111_DEFAULTS)
    first = runtime.get_engine().registry.checkpoints()[0]
    assert options["sd_model_checkpoint"] == first.title
    assert options["sd_checkpoint_hash"] == first.sha256
    assert options["live_previews_enable"] is True and options["show_progress_every_n_steps"] == 10


# -------------------------------------------------------------------------------------------------- per user


def test_a_users_model_choice_is_that_users_only():
    set_options(ALICE, {"sd_model_checkpoint": "tiny-sdxl.safetensors"})
    sdxl = checkpoint("tiny-sdxl.safetensors")
    assert get_options("alice")["sd_model_checkpoint"] == sdxl.title
    assert get_options("alice")["sd_checkpoint_hash"] == sdxl.sha256
    assert get_options("bob")["sd_model_checkpoint"] != sdxl.title


@pytest.mark.parametrize("alias_of", [lambda c: c.name, lambda c: c.model_name, lambda c: c.shorthash,
                                      lambda c: c.sha256, lambda c: c.title,
                                      lambda c: f"{c.model_name} [{c.shorthash}]"])  # fmt: skip
def test_any_a1111_alias_is_stored_as_the_canonical_title(alias_of: Any):
    sdxl = checkpoint("tiny-sdxl.safetensors")
    set_options(ALICE, {"sd_model_checkpoint": alias_of(sdxl)})
    assert UserOptions.objects.get(user="alice").values["sd_model_checkpoint"] == sdxl.title


def test_an_unknown_checkpoint_is_a_422_listing_the_titles():
    with pytest.raises(CheckpointNotFoundError) as caught:
        set_options(ALICE, {"sd_model_checkpoint": "missing.safetensors"})
    assert caught.value.field == "sd_model_checkpoint"
    assert checkpoint("tiny-sdxl.safetensors").title in caught.value.valid_values


def test_unknown_keys_are_a_422_naming_the_key_unless_null():
    with pytest.raises(InvalidInputError) as caught:
        set_options(ALICE, {"samples_format": "jpg", "no_such_option": True})
    assert caught.value.field == "no_such_option"
    assert get_options("alice")["samples_format"] == "png", "nothing is saved when one value is refused"
    set_options(ALICE, {"no_such_option": None})


def test_options_the_node_uses_are_coerced_and_checked():
    set_options(ALICE, {"CLIP_stop_at_last_layers": "2", "samples_format": "JPG", "live_previews_enable": "no"})
    options = get_options("alice")
    assert options["CLIP_stop_at_last_layers"] == 2 and options["samples_format"] == "jpg"
    assert options["live_previews_enable"] is False
    with pytest.raises(ValidationError) as caught:
        set_options(ALICE, {"CLIP_stop_at_last_layers": 13})
    assert [entry["loc"] for entry in validation_entries(caught.value.detail)] == [["body", "CLIP_stop_at_last_layers"]]
    with pytest.raises(InvalidInputError) as refused:
        set_options(ALICE, {"samples_format": "bmp"})
    assert refused.value.valid_values == ("png", "jpg", "jpeg", "webp")
    with pytest.raises(CheckpointNotFoundError):
        set_options(ALICE, {"sd_vae": "nope.safetensors"})


def test_other_options_are_stored_as_sent_and_the_hash_is_derived():
    set_options(ALICE, {"grid_format": "jpg", "sd_checkpoint_hash": "forged"})
    options = get_options("alice")
    assert options["grid_format"] == "jpg"
    assert options["sd_checkpoint_hash"] == checkpoint(options["sd_model_checkpoint"]).sha256


def test_posting_back_the_whole_options_dict_stores_only_what_differs():
    options = get_options("alice")
    options["samples_format"] = "webp"
    set_options(ALICE, options)
    assert UserOptions.objects.get(user="alice").values == {"samples_format": "webp"}


def test_null_resets_an_option_to_its_default():
    set_options(ALICE, {"samples_format": "jpg", "CLIP_stop_at_last_layers": 2})
    set_options(ALICE, {"samples_format": None})
    options = get_options("alice")
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 2


def test_a_non_object_body_is_a_422():
    with pytest.raises(RequestValidationError):
        set_options(ALICE, ["samples_format"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ node-wide


def test_node_wide_values_apply_to_everyone_without_their_own(settings: Any):
    set_options(STAFF, {"samples_format": "webp", "CLIP_stop_at_last_layers": 2}, node_wide=True)
    set_options(ALICE, {"samples_format": "jpg"})
    assert get_options("alice")["samples_format"] == "jpg", "the user's own value wins"
    assert get_options("alice")["CLIP_stop_at_last_layers"] == 2
    assert get_options("bob")["samples_format"] == "webp"


def test_node_wide_values_need_staff_in_token_mode(settings: Any):
    settings.SD_AUTH = "token"
    with pytest.raises(StaffRequiredError):
        set_options(ALICE, {"samples_format": "webp"}, node_wide=True)
    set_options(STAFF, {"samples_format": "webp"}, node_wide=True)
    assert get_options("bob")["samples_format"] == "webp"
    settings.SD_AUTH = "open"
    set_options(BOB, {"samples_format": "png"}, node_wide=True)
    assert get_options("alice")["samples_format"] == "png"


# ----------------------------------------------------------------------------------------- override_settings


def test_override_settings_apply_to_one_request_only():
    overridden = effective_options("alice", {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny-sdxl"})
    sdxl = checkpoint("tiny-sdxl.safetensors")
    assert overridden["CLIP_stop_at_last_layers"] == 2
    assert overridden["sd_model_checkpoint"] == sdxl.title and overridden["sd_checkpoint_hash"] == sdxl.sha256
    assert get_options("alice")["CLIP_stop_at_last_layers"] == 1
    assert not UserOptions.objects.filter(user="alice").exists()
    assert effective_options("alice", None) == get_options("alice")
    assert effective_options("alice", {"samples_format": None})["samples_format"] == "png"


def test_bad_override_settings_are_422s_naming_the_override():
    with pytest.raises(CheckpointNotFoundError) as model:
        effective_options("alice", {"sd_model_checkpoint": "missing.safetensors"})
    assert model.value.field == "override_settings.sd_model_checkpoint"
    with pytest.raises(InvalidInputError) as key:
        effective_options("alice", {"no_such_option": 1})
    assert key.value.field == "override_settings.no_such_option"
    with pytest.raises(ValidationError) as value:
        effective_options("alice", {"CLIP_stop_at_last_layers": "x"})
    assert [entry["loc"] for entry in validation_entries(value.value.detail)] == [
        ["body", "override_settings", "CLIP_stop_at_last_layers"]
    ]
    with pytest.raises(RequestValidationError) as shape:
        effective_options("alice", [1])  # type: ignore[arg-type]
    assert shape.value.errors[0]["loc"] == ["body", "override_settings"]
