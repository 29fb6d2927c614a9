"""Engine benchmark: our `generate` vs a plain diffusers pipeline call with the same settings, and batched vs
sequential generation of compatible requests, measured side by side in one run.

    python -m bench.engine [--steps 20] [--repeats 5] [--full-size]

On CPU it uses the tiny SD1 model; with CUDA (or --full-size) it also builds full-size SD1.5 and SDXL
architectures with random weights (nothing is downloaded) and measures them at 512x512 / 1024x1024.
Ends with one line: RESULT name=value ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd_core.config import CoreConfig
from sd_core.engine import Engine
from sd_core.samplers import make_scheduler, resolve_sampler
from sd_core.tiny import write_tiny_models
from sd_core.types import GenerationRequest


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(action: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def overhead_ratio(
    engine: Engine, checkpoint: str, *, size: int, steps: int, repeats: int
) -> tuple[float, float, float]:
    """Median time of our generate over a plain diffusers call on the same loaded pipeline, interleaved."""
    request = GenerationRequest(
        checkpoint=checkpoint,
        prompt="a lighthouse on a cliff at dusk",
        negative_prompt="blurry",
        steps=steps,
        width=size,
        height=size,
        seed=1,
        sampler_name="Euler",
    )
    info = engine.registry.resolve(checkpoint)
    engine.generate(request)  # load and warm up
    ours: list[float] = []
    plain: list[float] = []
    with engine.pool.acquire(info) as model:
        pipe: Any = model.pipeline
        scheduler = make_scheduler(resolve_sampler("Euler"), model.scheduler_config)

    def plain_call() -> None:
        with engine.pool.acquire(info) as loaded, loaded.lock:
            pipe.scheduler = scheduler
            pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=steps,
                guidance_scale=request.cfg_scale,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(1),
            )

    plain_call()
    for repeat in range(repeats):
        ours.append(timed(lambda: engine.generate(request)))
        plain.append(timed(plain_call))
        log(f"  overhead {repeat + 1}/{repeats}: ours {ours[-1]:.3f}s, plain diffusers {plain[-1]:.3f}s")
    ours_median, plain_median = statistics.median(ours), statistics.median(plain)
    return ours_median / plain_median, ours_median, plain_median


def batch_speedup(engine: Engine, checkpoint: str, *, count: int, size: int, steps: int, repeats: int) -> float:
    """Sequential time of `count` compatible requests over one batched call for the same requests."""
    requests = [
        GenerationRequest(
            checkpoint=checkpoint,
            prompt=f"a lighthouse, variant {i}",
            steps=steps,
            width=size,
            height=size,
            seed=100 + i,
            sampler_name="Euler a",
        )
        for i in range(count)
    ]
    engine.generate_batch(requests[:2])  # warm up the batched path
    sequential: list[float] = []
    batched: list[float] = []
    for repeat in range(repeats):
        sequential.append(timed(lambda: [engine.generate(r) for r in requests]))
        batched.append(timed(lambda: engine.generate_batch(requests)))
        log(f"  batch of {count} {repeat + 1}/{repeats}: sequential {sequential[-1]:.3f}s, batched {batched[-1]:.3f}s")
    return statistics.median(sequential) / statistics.median(batched)


def build_full_size(models_dir: Path, family: str, dtype: torch.dtype) -> str:
    """A full-size SD1.5 or SDXL architecture with random weights, saved as a diffusers folder (no download)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sd_core.architectures import Architecture, Family, shipped_config_folder

    folder = shipped_config_folder(Architecture(family=Family(family)), models_dir / ".configs")
    log(f"building a random-weight full-size {family} from {folder}")
    components: dict[str, object] = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))),
        "tokenizer": CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
    }
    if family == "sdxl":
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
        )
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    components["scheduler"] = EulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    pipe: Any
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    name = f"random-{family}-full"
    pipe.to(dtype=dtype).save_pretrained(str(models_dir / "Stable-diffusion" / name), safe_serialization=True)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-size", action="store_true", help="also measure full-size SD1.5/SDXL (default: on CUDA)")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = Path(scratch)
        log("writing the tiny models")
        write_tiny_models(models_dir, progress=log)
        engine = Engine(CoreConfig(models_dir=models_dir, cache_dir=models_dir / ".cache"))
        device = engine.config.torch_device()
        log(f"device: {device}, dtype {engine.config.torch_dtype()}, torch threads {torch.get_num_threads()}")
        log("tiny SD1, 64x64: our generate vs plain diffusers")
        ratio, ours, plain = overhead_ratio(
            engine, "tiny-sd1.safetensors", size=64, steps=args.steps, repeats=args.repeats
        )
        results.update(overhead_ratio=ratio, ours_s=ours, plain_s=plain)
        for count in (4, 8):
            log(f"tiny SD1, 64x64: batch of {count} vs sequential")
            results[f"batch{count}_speedup"] = batch_speedup(
                engine,
                "tiny-sd1.safetensors",
                count=count,
                size=64,
                steps=args.steps,
                repeats=max(2, args.repeats // 2),
            )
        if args.full_size or device.type == "cuda":
            for family, size in (("sd1", 512), ("sdxl", 1024)):
                name = build_full_size(models_dir, family, engine.config.torch_dtype())
                engine.registry.refresh()
                label = "sd15" if family == "sd1" else "sdxl"
                log(f"full-size {label}, {size}x{size}: our generate vs plain diffusers")
                ratio, ours, plain = overhead_ratio(engine, name, size=size, steps=args.steps, repeats=3)
                results.update({f"{label}_overhead_ratio": ratio, f"{label}_s": ours})
                log(f"full-size {label}: batch of 4 vs sequential")
                results[f"{label}_batch4_speedup"] = batch_speedup(
                    engine, name, count=4, size=size, steps=args.steps, repeats=2
                )
                engine.pool.unload_all()
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in results.items()))


if __name__ == "__main__":
    main()
