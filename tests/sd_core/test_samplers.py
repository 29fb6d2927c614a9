"""The A1111 sampler table: name resolution, listings, and real diffusers schedulers running real steps."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from sd_core.errors import UnknownSamplerError
from sd_core.samplers import (
    AUTOMATIC,
    SAMPLERS,
    SCHEDULES,
    ResolvedSampler,
    SamplerSpec,
    ScheduleSpec,
    find_schedule,
    make_scheduler,
    resolve_sampler,
    samplers_listing,
    schedulers_listing,
)

# The scheduler_config.json of an SD1.5 checkpoint (PNDMScheduler, as shipped).
SD15_SCHEDULER_CONFIG: dict[str, object] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
A1111_SAMPLER_ORDER = (
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DDIM",
    "PLMS",
    "UniPC",
    "LCM",
)
A1111_SCHEDULE_ORDER = (
    "automatic",
    "uniform",
    "karras",
    "exponential",
    "polyexponential",
    "sgm_uniform",
    "kl_optimal",
    "align_your_steps",
    "simple",
    "normal",
    "ddim",
    "beta",
)
LATENT_SHAPE = (1, 4, 8, 8)
SD15_SIGMA_MAX = 14.6146
SD15_SIGMA_MIN = 0.029168
# torchsde warns of float rounding at the ends of DPM++ SDE's Brownian interval.
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fake_eps(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a UNet: a smooth function of its input."""
    return torch.tanh(model_input) * 0.5 + 0.1 * torch.sin(3.0 * model_input)


def build(resolved: ResolvedSampler, base_config: Mapping[str, Any] = SD15_SCHEDULER_CONFIG, **kwargs: Any) -> Any:
    """make_scheduler, typed loosely: SchedulerMixin declares none of the methods every scheduler has."""
    return make_scheduler(resolved, base_config, **kwargs)


def denoise(
    scheduler: Any,
    latents: torch.Tensor,
    model: Model = fake_eps,
    *,
    steps: int = 3,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline, with `model` as the UNet."""
    scheduler.set_timesteps(steps)
    sample = latents * scheduler.init_noise_sigma
    # Pipelines pass generators only to schedulers whose step takes them (DPM++ SDE's does not).
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators} if takes_generator and generators is not None else {}
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        sample = scheduler.step(model(model_input, timestep), timestep, sample, **step_kwargs).prev_sample
    return sample


def seeded_run(resolved: ResolvedSampler, seeds: Sequence[int]) -> torch.Tensor:
    """One image per seed, each with its own generator for the initial latents and the sampler noise."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = torch.cat([torch.randn(LATENT_SHAPE, generator=generator) for generator in generators])
    scheduler = build(resolved, seed=list(seeds))
    return denoise(scheduler, latents, generators=generators)


def expected_timesteps(sampler: SamplerSpec, steps: int) -> int:
    if sampler.second_order:
        return 2 * steps - 1
    if sampler.name == "PLMS":
        return steps + 1
    return steps


def sampler_schedule_pairs() -> list[tuple[str, str]]:
    """Each sampler with Automatic and with one schedule other than its default, where it runs one."""
    pairs = []
    for sampler in SAMPLERS:
        pairs.append((sampler.name, "automatic"))
        others = [
            schedule.name
            for schedule in SCHEDULES
            if sampler.runs(schedule) and schedule.name not in ("automatic", sampler.default_schedule)
        ]
        if others:
            pairs.append((sampler.name, others[len(pairs) % len(others)]))
    return pairs


@pytest.mark.parametrize(("sampler_name", "schedule_name"), sampler_schedule_pairs())
def test_it_runs_real_denoising_steps_for_every_advertised_sampler(sampler_name: str, schedule_name: str) -> None:
    resolved = resolve_sampler(sampler_name, schedule_name)
    scheduler = build(resolved, seed=7)
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(LATENT_SHAPE, generator=generator)

    result = denoise(scheduler, latents, generators=[generator])

    assert type(scheduler).__name__.endswith(resolved.sampler.scheduler_class)
    assert len(scheduler.timesteps) == expected_timesteps(resolved.sampler, 3)
    assert result.shape == LATENT_SHAPE
    assert torch.isfinite(result).all()


def test_it_pairs_every_sampler_with_a_schedule_other_than_its_default_where_one_runs() -> None:
    tested = {sampler for sampler, schedule in sampler_schedule_pairs() if schedule != "automatic"}

    assert tested == {sampler.name for sampler in SAMPLERS} - {"DDIM", "PLMS", "LCM"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler_name", A1111_SAMPLER_ORDER)
def test_it_denoises_to_the_clean_latent_with_a_perfect_model(sampler_name: str, prediction_type: str) -> None:
    clean = torch.linspace(-1.0, 1.0, 256).reshape(LATENT_SHAPE)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).numpy()

    def perfect_model(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        alpha = float(np.interp(float(timestep), np.arange(1000), alphas_cumprod))
        eps = (model_input - alpha**0.5 * clean) / (1.0 - alpha) ** 0.5
        if prediction_type == "v_prediction":
            return alpha**0.5 * eps - (1.0 - alpha) ** 0.5 * clean
        return eps

    base_config = {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    scheduler = build(resolve_sampler(sampler_name), base_config, seed=3)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(LATENT_SHAPE, generator=generator)

    result = denoise(scheduler, latents, perfect_model, steps=10, generators=[generator])

    assert scheduler.config.prediction_type == prediction_type
    # DDIM, PLMS and UniPC stop on the model's smallest noise level (sigma 0.029), like A1111's.
    assert (result - clean).abs().mean() < 0.05


def test_it_keeps_only_the_model_keys_of_the_previous_scheduler_config() -> None:
    third_order = build(resolve_sampler("DPM++ 3M SDE", "Beta"))
    v_model_config = {**third_order.config, "prediction_type": "v_prediction"}

    second_order = build(resolve_sampler("DPM++ 2M"), v_model_config)
    uniform = build(resolve_sampler("Euler"), second_order.config)

    assert second_order.config.solver_order == 2
    assert second_order.config.algorithm_type == "dpmsolver++"
    assert second_order.config.use_karras_sigmas is True
    assert second_order.config.use_beta_sigmas is False
    assert uniform.config.use_karras_sigmas is False
    assert uniform.config.prediction_type == "v_prediction"
    assert uniform.config.beta_schedule == "scaled_linear"


def test_it_applies_every_key_of_the_sampler_table() -> None:
    for sampler in SAMPLERS:
        scheduler = build(resolve_sampler(sampler.name))

        assert {key: scheduler.config[key] for key in sampler.config} == dict(sampler.config), sampler.name


def test_it_applies_the_schedule_flag_or_spacing_to_the_scheduler() -> None:
    for schedule in SCHEDULES[1:]:
        scheduler = build(ResolvedSampler(sampler=SAMPLERS[0], schedule=schedule))

        assert {key: scheduler.config[key] for key in schedule.config} == dict(schedule.config), schedule.name


@pytest.mark.parametrize(
    ("schedule_name", "first", "last"),
    [
        ("karras", SD15_SIGMA_MAX, SD15_SIGMA_MIN),
        ("exponential", SD15_SIGMA_MAX, SD15_SIGMA_MIN),
        ("beta", SD15_SIGMA_MAX, SD15_SIGMA_MIN),
        ("uniform", SD15_SIGMA_MAX, SD15_SIGMA_MIN),
    ],
)
def test_it_spans_the_model_sigma_range_like_k_diffusion(schedule_name: str, first: float, last: float) -> None:
    scheduler = build(resolve_sampler("Euler", schedule_name))
    scheduler.set_timesteps(20)

    assert scheduler.sigmas[0].item() == pytest.approx(first, rel=1e-3)
    assert scheduler.sigmas[-2].item() == pytest.approx(last, rel=1e-3)
    assert scheduler.sigmas[-1].item() == 0.0


@pytest.mark.parametrize(
    ("sdxl", "table"),
    [
        (False, [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]),
        (True, [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]),
    ],
)
def test_it_runs_the_align_your_steps_sigmas_of_the_model_family(sdxl: bool, table: list[float]) -> None:
    resolved = resolve_sampler("DPM++ 2M", "Align Your Steps")

    scheduler = build(resolved, sdxl=sdxl)
    scheduler.set_timesteps(len(table))

    assert scheduler.sigmas[:-1].numpy() == pytest.approx(table, rel=1e-5)
    assert resolved.infotext_schedule_label == "Align Your Steps"


def test_it_runs_the_kl_optimal_curve_from_the_top_sigma() -> None:
    scheduler = build(resolve_sampler("Euler", "kl_optimal"))
    scheduler.set_timesteps(4)
    fractions = np.arange(4) / 4
    expected = np.tan(fractions * np.arctan(SD15_SIGMA_MIN) + (1 - fractions) * np.arctan(SD15_SIGMA_MAX))

    assert scheduler.sigmas[:-1].numpy() == pytest.approx(expected, rel=1e-3)
    assert scheduler.sigmas[-1].item() == 0.0


@pytest.mark.parametrize("sampler_name", [sampler.name for sampler in SAMPLERS if sampler.batch_safe])
def test_it_gives_each_image_of_a_batch_the_result_of_its_single_run(sampler_name: str) -> None:
    resolved = resolve_sampler(sampler_name)

    batch = seeded_run(resolved, [11, 12])
    first, second = seeded_run(resolved, [11]), seeded_run(resolved, [12])

    torch.testing.assert_close(batch[0:1], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], second, atol=1e-5, rtol=1e-5)


def test_it_gives_the_same_result_for_the_same_seed_with_an_ancestral_sampler() -> None:
    resolved = resolve_sampler("Euler a")

    assert torch.equal(seeded_run(resolved, [5]), seeded_run(resolved, [5]))
    assert not torch.equal(seeded_run(resolved, [5]), seeded_run(resolved, [6]))


def test_it_seeds_the_dpmpp_sde_brownian_noise_per_image_from_a_list_of_seeds() -> None:
    resolved = resolve_sampler("DPM++ SDE")

    batch = seeded_run(resolved, [21, 22])
    first, second = seeded_run(resolved, [21]), seeded_run(resolved, [22])

    assert resolved.sampler.needs_noise_sampler_seed and not resolved.sampler.batch_safe
    assert build(resolved, seed=21).config.noise_sampler_seed == 21
    torch.testing.assert_close(batch[0:1], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, seeded_run(resolve_sampler("DPM++ SDE"), [23]))


@pytest.mark.parametrize(
    ("requested", "scheduler", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", None, "DPM++ 2M", "automatic"),
        ("DPM++ 2M SDE Exponential", "automatic", "DPM++ 2M SDE", "automatic"),
        ("DPM++ SDE Karras", "", "DPM++ SDE", "automatic"),
        ("LMS Karras", None, "LMS", "karras"),
        ("DPM2 a Karras", None, "DPM2 a", "automatic"),
        ("Euler SGMUniform", None, "Euler", "sgm_uniform"),
        ("DPM++ 2M Exponential", "Karras", "DPM++ 2M", "exponential"),
        ("Euler a", None, "Euler a", "automatic"),
        ("DPM++ 2M SDE Heun", None, "DPM++ 2M SDE Heun", "automatic"),
    ],
)
def test_it_splits_legacy_names_that_carry_their_schedule(
    requested: str, scheduler: str | None, sampler: str, schedule: str
) -> None:
    resolved = resolve_sampler(requested, scheduler)

    assert resolved.sampler.name == sampler
    assert resolved.schedule.name == schedule


@pytest.mark.parametrize(
    ("sampler", "scheduler", "label"),
    [
        ("DPM++ 2M", None, "Karras"),
        ("DPM++ 2M", "karras", "Karras"),
        ("DPM++ 2M", "Exponential", "Exponential"),
        ("Euler a", "Automatic", "Automatic"),
        ("Euler", "automatic", "Automatic"),
        ("Euler", "sgm_uniform", "SGM Uniform"),
        ("DPM++ 2M SDE", None, "Exponential"),
        ("DDIM", None, "Automatic"),
    ],
)
def test_it_writes_the_schedule_that_ran_in_the_infotext(sampler: str, scheduler: str | None, label: str) -> None:
    resolved = resolve_sampler(sampler, scheduler)

    assert resolved.infotext_sampler_name == sampler
    assert resolved.infotext_schedule_label == label


def test_it_stores_a_samplers_own_default_schedule_as_automatic() -> None:
    explicit = resolve_sampler("DPM++ 2M", "Karras")

    assert explicit.schedule is AUTOMATIC
    assert explicit.applied_schedule.name == "karras"
    assert explicit == resolve_sampler("DPM++ 2M Karras")
    assert len({explicit, resolve_sampler("DPM++ 2M")}) == 1


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("karras", "karras"),
        ("Karras", "karras"),
        ("SGMUniform", "sgm_uniform"),
        ("SGM Uniform", "sgm_uniform"),
        ("Align Your Steps", "align_your_steps"),
        ("automatic", "automatic"),
        ("Automatic", "automatic"),
        ("", "automatic"),
        (None, "automatic"),
    ],
)
def test_it_takes_a_scheduler_by_name_label_or_alias(scheduler: str | None, expected: str) -> None:
    assert resolve_sampler("Euler", scheduler).schedule.name == expected


def test_it_runs_euler_when_no_sampler_is_named_and_reads_sampler_index() -> None:
    assert resolve_sampler(None).sampler.name == "Euler"
    assert resolve_sampler("", None, sampler_index="").sampler.name == "Euler"
    assert resolve_sampler(None, sampler_index="DDIM").sampler.name == "DDIM"
    assert resolve_sampler("LMS", sampler_index="DDIM").sampler.name == "LMS"


def test_it_accepts_the_a1111_aliases_of_a_sampler() -> None:
    assert resolve_sampler("k_euler_a").sampler.name == "Euler a"
    assert resolve_sampler("k_dpmpp_2m").infotext_sampler_name == "DPM++ 2M"


def test_it_refuses_an_unknown_sampler_listing_the_valid_names() -> None:
    with pytest.raises(UnknownSamplerError) as caught:
        resolve_sampler("DPM fast")

    assert caught.value.field == "sampler_name"
    assert caught.value.valid_values == A1111_SAMPLER_ORDER
    assert "unknown sampler 'DPM fast'" in caught.value.message


def test_it_names_sampler_index_when_the_unknown_name_came_from_it() -> None:
    with pytest.raises(UnknownSamplerError) as caught:
        resolve_sampler(None, sampler_index="euler")

    assert caught.value.field == "sampler_index"


def test_it_refuses_an_unknown_legacy_sampler_with_a_known_schedule_suffix() -> None:
    with pytest.raises(UnknownSamplerError) as caught:
        resolve_sampler("Restart Karras")

    assert caught.value.field == "sampler_name"
    assert "'Restart Karras'" in caught.value.message


def test_it_refuses_an_unknown_scheduler_listing_names_and_labels() -> None:
    with pytest.raises(UnknownSamplerError) as caught:
        resolve_sampler("Euler", "karras_exponential")

    assert caught.value.field == "scheduler"
    assert {"karras", "Karras", "sgm_uniform", "SGM Uniform"} <= set(caught.value.valid_values)


def test_it_refuses_a_schedule_the_samplers_scheduler_cannot_run() -> None:
    with pytest.raises(UnknownSamplerError) as from_argument:
        resolve_sampler("Euler a", "Karras")
    with pytest.raises(UnknownSamplerError) as from_legacy_name:
        resolve_sampler("DDIM Karras")

    assert from_argument.value.field == "scheduler"
    assert "Karras" not in from_argument.value.valid_values
    assert {"Automatic", "SGM Uniform"} <= set(from_argument.value.valid_values)
    assert from_legacy_name.value.field == "sampler_name"
    assert from_legacy_name.value.valid_values == ("automatic", "Automatic")


def test_it_gives_every_sampler_a_default_schedule_it_can_run() -> None:
    for sampler in SAMPLERS:
        if sampler.default_schedule is not None:
            assert sampler.runs(find_schedule(sampler.default_schedule)), sampler.name
            assert sampler.options["scheduler"] == sampler.default_schedule


def test_it_lists_samplers_in_a1111_order_and_shape() -> None:
    listing = samplers_listing()

    assert tuple(item["name"] for item in listing) == A1111_SAMPLER_ORDER
    assert listing[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert listing[6] == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "options": {"uses_ensd": "True"},
    }
    assert all(isinstance(value, str) for item in listing for value in item["options"].values())  # type: ignore[attr-defined]
    assert json.loads(json.dumps(listing)) == listing


def test_it_lists_schedulers_in_a1111_order_and_shape() -> None:
    listing = schedulers_listing()

    assert tuple(item["name"] for item in listing) == A1111_SCHEDULE_ORDER
    assert listing[2] == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }
    assert listing[5] == {
        "name": "sgm_uniform",
        "label": "SGM Uniform",
        "aliases": ["SGMUniform"],
        "default_rho": -1.0,
        "need_inner_model": True,
    }
    assert json.loads(json.dumps(listing)) == listing


def test_it_keeps_its_tables_immutable() -> None:
    schedule: ScheduleSpec = find_schedule("karras")

    with pytest.raises(TypeError):
        schedule.config["use_karras_sigmas"] = False  # type: ignore[index]
    with pytest.raises(TypeError):
        SAMPLERS[0].options["scheduler"] = "beta"  # type: ignore[index]
