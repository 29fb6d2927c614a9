"""A1111 seed semantics: random seeds, consecutive seeds over a job, variation seeds and the initial noise."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MAX_RANDOM_SEED = 4294967294


def fix_seed(seed: int) -> int:
    """-1 (or any negative) draws a random seed like A1111's get_fixed_seed; others are used as given."""
    return random.randrange(MAX_RANDOM_SEED) if seed < 0 else seed


@dataclass(frozen=True, kw_only=True)
class JobSeeds:
    """The seed and variation seed of every image of a job (batch_size * n_iter images)."""

    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]

    @classmethod
    def for_job(cls, *, seed: int, subseed: int, subseed_strength: float, image_count: int) -> JobSeeds:
        """Consecutive seeds, unless a variation strength is set: then one seed and consecutive subseeds."""
        base, sub = fix_seed(seed), fix_seed(subseed)
        seeds = tuple(base + i for i in range(image_count)) if subseed_strength == 0 else (base,) * image_count
        return cls(seeds=seeds, subseeds=tuple(sub + i for i in range(image_count)))


def image_noise(
    *,
    seed: int,
    subseed: int,
    subseed_strength: float,
    shape: tuple[int, int, int],
    seed_resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The initial latent noise of one image, drawn on the CPU so a seed means the same image on any device.

    1. Noise of `shape` (or of the seed_resize_from latent size, centre-pasted into `shape`) from `seed`.
    2. With a variation strength, spherical interpolation towards the noise of `subseed`.
    """
    channels = shape[0]
    source_shape = shape
    if seed_resize_from is not None:
        source_shape = (channels, seed_resize_from[1] // 8, seed_resize_from[0] // 8)
    noise = _randn(seed, source_shape)
    if subseed_strength != 0:
        noise = _slerp(subseed_strength, noise, _randn(subseed, source_shape))
    if source_shape != shape:
        noise = _centre_paste(noise, _randn(seed, shape))
    return noise


def _randn(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _slerp(value: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - value) + high * value
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - value) * omega) / so).unsqueeze(1) * low + (torch.sin(value * omega) / so).unsqueeze(
        1
    ) * high


def _centre_paste(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A1111's seed resize: the source noise centred in the target, cropped where it is larger."""
    _, sh, sw = source.shape
    _, th, tw = target.shape
    dx, dy = (tw - sw) // 2, (th - sh) // 2
    w, h = min(tw, sw), min(th, sh)
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    result = target.clone()
    result[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return result
