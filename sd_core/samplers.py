"""A1111 sampler and schedule names mapped to diffusers schedulers (one table each), A1111's name resolution,
and the scheduler built for one generation from the model's own scheduler config."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, cast

import diffusers
import numpy as np
from diffusers import SchedulerMixin

from sd_core.errors import UnknownSamplerError

DEFAULT_SAMPLER = "Euler"
"""What A1111's API runs when a request names no sampler (its `sampler_index` default), not the UI's DPM++ 2M."""

SigmaFunction = Callable[[int, float, float, bool], np.ndarray]
"""(steps, sigma_min, sigma_max, sdxl) -> the first `steps` sigmas, descending; the scheduler appends the final 0."""


class ScheduleKind(StrEnum):
    """How a schedule reaches a diffusers scheduler; a sampler runs only the kinds its class supports."""

    SPACING = "spacing"
    """A `timestep_spacing` choice: every class with that setting runs it."""
    SIGMAS = "sigmas"
    """A sigma curve (`use_karras_sigmas` and siblings): only classes with those settings run it."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """One A1111 schedule ("Schedule type"). `kind` None is Automatic: the sampler's default schedule if it has
    one, else the sampler's own spacing. `config` overrides the diffusers config after the sampler's."""

    name: str
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False
    kind: ScheduleKind | None = None
    config: Mapping[str, object] = field(default_factory=dict, hash=False)
    sigma_function: SigmaFunction | None = None
    """Sigmas we compute, fed through the scheduler's Karras hook (diffusers has no setting for them)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _frozen(self.config))

    @property
    def lookup_names(self) -> tuple[str, ...]:
        """The spellings A1111 accepts, in its order: label, name, aliases."""
        return (self.label, self.name, *(self.aliases or ()))


@dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """One A1111 sampler and the diffusers scheduler that runs it.

    `options` is A1111's `/samplers` options (string values, as its API sends them); `config` overrides the
    diffusers config; `default_schedule` is what Automatic means for it. `batch_safe` is False when its noise is
    not drawn per image from the list of generators, so requests must not share a batch. `second_order`: our
    diffusers scheduler calls the model 2n-1 times for n steps (`pipe.num_timesteps` counts them; PLMS makes n+1),
    which may differ from A1111's `second_order` option.
    """

    name: str
    aliases: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict, hash=False)
    scheduler_class: str
    config: Mapping[str, object] = field(default_factory=dict, hash=False)
    default_schedule: str | None = None
    schedule_kinds: tuple[ScheduleKind, ...] = (ScheduleKind.SPACING, ScheduleKind.SIGMAS)
    batch_safe: bool = True
    needs_noise_sampler_seed: bool = False
    """The class draws its noise from `noise_sampler_seed` (a seed, or one seed per image) and ignores generators."""
    second_order: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(self, "config", _frozen(self.config))

    def runs(self, schedule: ScheduleSpec) -> bool:
        return schedule.kind is None or schedule.kind in self.schedule_kinds


_ALIGN_YOUR_STEPS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
_ALIGN_YOUR_STEPS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def align_your_steps_sigmas(steps: int, sigma_min: float, sigma_max: float, sdxl: bool) -> np.ndarray:
    """NVIDIA's 10-step Align Your Steps sigmas for SD1.5 or SDXL, log-linearly interpolated to `steps` (A1111's
    method). The tables already span the model's own sigma range, so `sigma_min`/`sigma_max` are not used."""
    table = np.log(np.array(_ALIGN_YOUR_STEPS_SDXL if sdxl else _ALIGN_YOUR_STEPS_SD1))
    return np.exp(np.interp(np.linspace(0.0, 1.0, steps), np.linspace(0.0, 1.0, len(table)), table))


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float, sdxl: bool) -> np.ndarray:
    """A1111's KL-optimal curve (uniform in arctan(sigma)). A1111 ends on sigma_min; diffusers ends on 0, so these
    are A1111's first `steps` sigmas and the last step denoises fully."""
    fractions = np.arange(steps) / steps
    return np.tan(fractions * np.arctan(sigma_min) + (1.0 - fractions) * np.arctan(sigma_max))


# k-diffusion's sigma curves need a first timestep of 999 and a last of 0 to span the model's sigma range.
_SIGMA_SPACING = "linspace"

AUTOMATIC = ScheduleSpec(name="automatic", label="Automatic")

SCHEDULES: tuple[ScheduleSpec, ...] = (
    AUTOMATIC,
    # k-diffusion get_sigmas(n): evenly spaced timesteps from 999 to 0.
    ScheduleSpec(
        name="uniform",
        label="Uniform",
        need_inner_model=True,
        kind=ScheduleKind.SPACING,
        config={"timestep_spacing": "linspace"},
    ),
    ScheduleSpec(
        name="karras",
        label="Karras",
        default_rho=7.0,
        kind=ScheduleKind.SIGMAS,
        config={"use_karras_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
    ),
    ScheduleSpec(
        name="exponential",
        label="Exponential",
        kind=ScheduleKind.SIGMAS,
        config={"use_exponential_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
    ),
    # At its default rho of 1.0 (we take no rho option) the polyexponential curve is the exponential one.
    ScheduleSpec(
        name="polyexponential",
        label="Polyexponential",
        default_rho=1.0,
        kind=ScheduleKind.SIGMAS,
        config={"use_exponential_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
    ),
    # Evenly spaced timesteps from 999 that stop short of 0: diffusers' "trailing".
    ScheduleSpec(
        name="sgm_uniform",
        label="SGM Uniform",
        aliases=("SGMUniform",),
        need_inner_model=True,
        kind=ScheduleKind.SPACING,
        config={"timestep_spacing": "trailing"},
    ),
    ScheduleSpec(
        name="kl_optimal",
        label="KL Optimal",
        kind=ScheduleKind.SIGMAS,
        config={"use_karras_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
        sigma_function=kl_optimal_sigmas,
    ),
    ScheduleSpec(
        name="align_your_steps",
        label="Align Your Steps",
        kind=ScheduleKind.SIGMAS,
        config={"use_karras_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
        sigma_function=align_your_steps_sigmas,
    ),
    # Every (1000/n)-th training sigma from the top: "trailing" up to rounding.
    ScheduleSpec(
        name="simple",
        label="Simple",
        need_inner_model=True,
        kind=ScheduleKind.SPACING,
        config={"timestep_spacing": "trailing"},
    ),
    # For SD models A1111's "normal" is its uniform schedule.
    ScheduleSpec(
        name="normal",
        label="Normal",
        need_inner_model=True,
        kind=ScheduleKind.SPACING,
        config={"timestep_spacing": "linspace"},
    ),
    # Timesteps 1, 1+1000//n, ...: "leading" with offset 1. A1111 may run one step more when n does not divide
    # 1000; diffusers' DPM-Solver and UniPC classes space "leading" by 1000//(n+1).
    ScheduleSpec(
        name="ddim",
        label="DDIM",
        need_inner_model=True,
        kind=ScheduleKind.SPACING,
        config={"timestep_spacing": "leading", "steps_offset": 1},
    ),
    # diffusers' Beta curve uses A1111's default alpha = beta = 0.6.
    ScheduleSpec(
        name="beta",
        label="Beta",
        need_inner_model=True,
        kind=ScheduleKind.SIGMAS,
        config={"use_beta_sigmas": True, "timestep_spacing": _SIGMA_SPACING},
    ),
)

_SIGMAS_ONLY = (ScheduleKind.SIGMAS,)
_SPACING_ONLY = (ScheduleKind.SPACING,)
# A1111's k-diffusion samplers run Automatic as evenly spaced timesteps from 999 to 0.
_K_DIFFUSION = {"timestep_spacing": "linspace"}
# A1111's DDIM and PLMS step on timesteps 1, 1+1000//n, ... with no clipping and alpha_prev(first) = alpha[0].
# Like A1111's they take no schedule (diffusers' DDIM and PNDM also misstep on "linspace" timesteps).
_A1111_TIMESTEPS = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        name="DPM++ 2M",
        aliases=("k_dpmpp_2m",),
        options={"scheduler": "karras"},
        scheduler_class="DPMSolverMultistepScheduler",
        config={**_K_DIFFUSION, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        default_schedule="karras",
    ),
    # Its Brownian noise comes from `noise_sampler_seed`, not from the generators: one tree for an int seed, one
    # tree per image for a list of seeds (then image i equals a single run with seed i, bit for bit).
    SamplerSpec(
        name="DPM++ SDE",
        aliases=("k_dpmpp_sde",),
        options={"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
        scheduler_class="DPMSolverSDEScheduler",
        config=_K_DIFFUSION,
        default_schedule="karras",
        batch_safe=False,
        needs_noise_sampler_seed=True,
        second_order=True,
    ),
    # Gaussian noise from the generators where k-diffusion uses Brownian increments: same distribution.
    SamplerSpec(
        name="DPM++ 2M SDE",
        aliases=("k_dpmpp_2m_sde",),
        options={"scheduler": "exponential", "brownian_noise": "True"},
        scheduler_class="DPMSolverMultistepScheduler",
        config={**_K_DIFFUSION, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        default_schedule="exponential",
    ),
    SamplerSpec(
        name="DPM++ 2M SDE Heun",
        aliases=("k_dpmpp_2m_sde_heun",),
        options={"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"},
        scheduler_class="DPMSolverMultistepScheduler",
        config={**_K_DIFFUSION, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
        default_schedule="exponential",
    ),
    # Approximation: diffusers has no 2S ancestral; its singlestep second-order SDE solver draws fresh noise each
    # step like it, with one model call per step. The class has no timestep spacing setting.
    SamplerSpec(
        name="DPM++ 2S a",
        aliases=("k_dpmpp_2s_a",),
        options={"scheduler": "karras", "uses_ensd": "True", "second_order": "True"},
        scheduler_class="DPMSolverSinglestepScheduler",
        config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True},
        default_schedule="karras",
        schedule_kinds=_SIGMAS_ONLY,
    ),
    # diffusers' third-order DPM-Solver++ SDE; A1111's dropping of the next-to-last sigma is not reproduced.
    SamplerSpec(
        name="DPM++ 3M SDE",
        aliases=("k_dpmpp_3m_sde",),
        options={"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"},
        scheduler_class="DPMSolverMultistepScheduler",
        config={**_K_DIFFUSION, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "midpoint"},
        default_schedule="exponential",
    ),
    # The class has no sigma curve settings, so Karras and its siblings are refused rather than ignored.
    SamplerSpec(
        name="Euler a",
        aliases=("k_euler_a", "k_euler_ancestral"),
        options={"uses_ensd": "True"},
        scheduler_class="EulerAncestralDiscreteScheduler",
        config=_K_DIFFUSION,
        schedule_kinds=_SPACING_ONLY,
    ),
    SamplerSpec(name="Euler", aliases=("k_euler",), scheduler_class="EulerDiscreteScheduler", config=_K_DIFFUSION),
    SamplerSpec(name="LMS", aliases=("k_lms",), scheduler_class="LMSDiscreteScheduler", config=_K_DIFFUSION),
    SamplerSpec(
        name="Heun",
        aliases=("k_heun",),
        options={"second_order": "True"},
        scheduler_class="HeunDiscreteScheduler",
        config=_K_DIFFUSION,
        second_order=True,
    ),
    # A1111's dropping of the next-to-last sigma (DPM2, DPM2 a) is not reproduced.
    SamplerSpec(
        name="DPM2",
        aliases=("k_dpm_2",),
        options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"},
        scheduler_class="KDPM2DiscreteScheduler",
        config=_K_DIFFUSION,
        default_schedule="karras",
        second_order=True,
    ),
    SamplerSpec(
        name="DPM2 a",
        aliases=("k_dpm_2_a",),
        options={
            "scheduler": "karras",
            "discard_next_to_last_sigma": "True",
            "uses_ensd": "True",
            "second_order": "True",
        },
        scheduler_class="KDPM2AncestralDiscreteScheduler",
        config=_K_DIFFUSION,
        default_schedule="karras",
        second_order=True,
    ),
    SamplerSpec(
        name="DDIM",
        aliases=("ddim",),
        scheduler_class="DDIMScheduler",
        config={**_A1111_TIMESTEPS, "clip_sample": False},
        schedule_kinds=(),
    ),
    # PLMS without Runge-Kutta warm-up steps, as A1111's: n + 1 model calls for n steps.
    SamplerSpec(
        name="PLMS",
        aliases=("plms",),
        scheduler_class="PNDMScheduler",
        config={**_A1111_TIMESTEPS, "skip_prk_steps": True},
        schedule_kinds=(),
    ),
    # A1111's UniPC order 3 and time-uniform steps from 999 down; variant bh2, as A1111's bh1 turns NaN in
    # diffusers when the last sigma is 0. A1111's UniPC ignores schedules; diffusers' runs them all.
    SamplerSpec(
        name="UniPC",
        aliases=("unipc",),
        scheduler_class="UniPCMultistepScheduler",
        config={"timestep_spacing": "linspace", "solver_order": 3, "solver_type": "bh2"},
    ),
    # The class ignores timestep spacing and sigma curves. Picking n of all 1000 timesteps (diffusers' default is
    # n of 50) spaces them like A1111's LCM and lifts the 50-step limit.
    SamplerSpec(
        name="LCM",
        aliases=("k_lcm",),
        scheduler_class="LCMScheduler",
        config={"original_inference_steps": 1000},
        schedule_kinds=(),
    ),
)

_SAMPLER_LOOKUP: Mapping[str, SamplerSpec] = {
    **{alias: sampler for sampler in SAMPLERS for alias in sampler.aliases},
    **{sampler.name: sampler for sampler in SAMPLERS},
}
_SCHEDULE_LOOKUP: Mapping[str, ScheduleSpec] = {
    spelling: schedule for schedule in SCHEDULES for spelling in schedule.lookup_names
}
# The model's own noise schedule and parameterisation; everything else comes from the tables, so settings a
# previous sampler left in `pipe.scheduler.config` never leak into the next one.
_MODEL_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "rescale_betas_zero_snr",
)


def find_schedule(name: str) -> ScheduleSpec:
    """The schedule called `name` (name, label or alias); KeyError if none."""
    return _SCHEDULE_LOOKUP[name]


@dataclass(frozen=True, kw_only=True)
class ResolvedSampler:
    """A request's sampler and schedule. `schedule` is AUTOMATIC when none was asked for, or when the request
    asked for the sampler's own default (A1111 stores that as Automatic)."""

    sampler: SamplerSpec
    schedule: ScheduleSpec

    @property
    def applied_schedule(self) -> ScheduleSpec:
        """The schedule that runs: Automatic resolves to the sampler's default schedule when it has one."""
        if self.schedule.name == AUTOMATIC.name and self.sampler.default_schedule is not None:
            return find_schedule(self.sampler.default_schedule)
        return self.schedule

    @property
    def infotext_sampler_name(self) -> str:
        return self.sampler.name

    @property
    def infotext_schedule_label(self) -> str:
        return self.applied_schedule.label


def _schedule_values(schedules: Sequence[ScheduleSpec]) -> list[str]:
    return [spelling for schedule in schedules for spelling in (schedule.name, schedule.label)]


def _lookup_schedule(scheduler: str | None) -> ScheduleSpec:
    if not scheduler:
        return AUTOMATIC
    try:
        return find_schedule(scheduler)
    except KeyError:
        raise UnknownSamplerError(
            "scheduler", f"unknown scheduler '{scheduler}'", valid_values=_schedule_values(SCHEDULES)
        ) from None


def _split_legacy_name(text: str) -> tuple[str, ScheduleSpec | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', karras): names from before A1111 1.9 carried the schedule."""
    for schedule in SCHEDULES:
        for spelling in schedule.lookup_names:
            if text.endswith(" " + spelling):
                return text[: -len(spelling) - 1], schedule
    return text, None


def resolve_sampler(
    sampler_name: str | None, scheduler: str | None = None, *, sampler_index: str | None = None
) -> ResolvedSampler:
    """A1111's `get_sampler_and_scheduler`, strict where A1111 silently falls back:

    1. The sampler string is `sampler_name or sampler_index or "Euler"` (A1111's API default).
    2. `scheduler` is a schedule name, label or alias; None, "" and Automatic mean Automatic. Unknown: error.
    3. A sampler string that is no sampler name but ends in " <schedule>" is a legacy name ("DPM++ 2M Karras"):
       it is split and its schedule wins over `scheduler`, as in A1111.
    4. The sampler is looked up by exact name, or by A1111 alias ("k_euler_a", which A1111's API does not take).
       Unknown: error naming the field it came from.
    5. A schedule the sampler's diffusers class cannot run is refused; the sampler's own default schedule is
       stored as Automatic (and written back with its label).
    """
    field_name = "sampler_name" if sampler_name else "sampler_index"
    text = sampler_name or sampler_index or DEFAULT_SAMPLER
    schedule = _lookup_schedule(scheduler)
    schedule_field = "scheduler"

    sampler = _SAMPLER_LOOKUP.get(text)
    if sampler is None:
        base_name, legacy_schedule = _split_legacy_name(text)
        sampler = _SAMPLER_LOOKUP.get(base_name) if legacy_schedule is not None else None
        if sampler is None:
            raise UnknownSamplerError(
                field_name, f"unknown sampler '{text}'", valid_values=[known.name for known in SAMPLERS]
            )
        schedule, schedule_field = cast(ScheduleSpec, legacy_schedule), field_name

    if not sampler.runs(schedule):
        runnable = [known for known in SCHEDULES if sampler.runs(known)]
        raise UnknownSamplerError(
            schedule_field,
            f"sampler '{sampler.name}' cannot run the '{schedule.label}' schedule",
            valid_values=_schedule_values(runnable),
        )
    if schedule.name == sampler.default_schedule:
        schedule = AUTOMATIC
    return ResolvedSampler(sampler=sampler, schedule=schedule)


@functools.cache
def _with_sigma_function(base: type[SchedulerMixin], schedule: ScheduleSpec, sdxl: bool) -> type[SchedulerMixin]:
    """A subclass of `base` whose Karras hook returns `schedule`'s sigmas: every sigma-capable diffusers class
    turns the sigmas from that hook into its timesteps, so one override serves them all."""
    sigma_function = cast(SigmaFunction, schedule.sigma_function)

    def _convert_to_karras(self: Any, in_sigmas: Any, num_inference_steps: int | None = None) -> np.ndarray:
        steps = num_inference_steps or self.num_inference_steps
        # The model's sigma range, as diffusers' own Karras conversion reads it.
        return sigma_function(steps, float(in_sigmas[-1]), float(in_sigmas[0]), sdxl)

    name = schedule.label.replace(" ", "") + base.__name__
    return cast(type[SchedulerMixin], type(name, (base,), {"_convert_to_karras": _convert_to_karras}))


def make_scheduler(
    resolved: ResolvedSampler,
    base_config: Mapping[str, Any],
    *,
    seed: int | Sequence[int] | None = None,
    sdxl: bool = False,
) -> SchedulerMixin:
    """A fresh diffusers scheduler for one generation.

    1. From `base_config` (the model's `pipe.scheduler.config`) only the model's own keys are kept: its noise
       schedule, `prediction_type` (epsilon, or v_prediction for SD2-v), `steps_offset`.
    2. The sampler's config, then the applied schedule's config, override them.
    3. DPM++ SDE ignores generators: `seed` becomes its `noise_sampler_seed`. Pass one seed per image (the
       batch's seeds, in order) so each image matches a single run with its seed; an int seeds the whole batch.
    4. Align Your Steps (`sdxl` picks SDXL's table) and KL Optimal feed their own sigmas through the Karras hook.
    """
    sampler, schedule = resolved.sampler, resolved.applied_schedule
    scheduler_class: type[SchedulerMixin] = getattr(diffusers, sampler.scheduler_class)
    config: dict[str, Any] = {key: base_config[key] for key in _MODEL_KEYS if key in base_config}
    config.update(sampler.config)
    config.update(schedule.config)
    # Keys the class lacks (a zero-SNR flag, a spacing it does not offer) would only be logged as ignored.
    accepted = inspect.signature(scheduler_class.__init__).parameters
    config = {key: value for key, value in config.items() if key in accepted}
    if sampler.needs_noise_sampler_seed and seed is not None:
        config["noise_sampler_seed"] = seed if isinstance(seed, int) else list(seed)
    if schedule.sigma_function is not None:
        scheduler_class = _with_sigma_function(scheduler_class, schedule, sdxl)
    return cast(SchedulerMixin, scheduler_class.from_config(config))


def samplers_listing() -> list[dict[str, object]]:
    """GET /sdapi/v1/samplers, in A1111's order (index 0 is A1111's UI fallback)."""
    return [
        {"name": sampler.name, "aliases": list(sampler.aliases), "options": dict(sampler.options)}
        for sampler in SAMPLERS
    ]


def schedulers_listing() -> list[dict[str, object]]:
    """GET /sdapi/v1/schedulers, in A1111's order."""
    return [
        {
            "name": schedule.name,
            "label": schedule.label,
            "aliases": list(schedule.aliases) if schedule.aliases is not None else None,
            "default_rho": schedule.default_rho,
            "need_inner_model": schedule.need_inner_model,
        }
        for schedule in SCHEDULES
    ]
