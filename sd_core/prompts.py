"""A1111's prompt syntax and its weighted, chunked CLIP text encoding for SD1.x, SD2.x and SDXL pipelines.

Supported: attention `(a)` `[a]` `(a:1.3)`, escapes, `BREAK`, prompts of any length in 75-token chunks, extra
network tags (`<lora:name:0.8>`). Not supported: prompt scheduling `[from:to:when]`, alternation `[a|b]` and
`AND` composition; their text goes through the attention parser as plain words, like any unknown syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from sd_core.errors import InvalidInputError

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20
BREAK_FRAGMENT = ("BREAK", -1.0)

_ROUND_BRACKET_MULTIPLIER = 1.1
_SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
_ATTENTION_TOKEN = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_KIND_ALIASES = {"lyco": "lora"}
# Chunks per text-encoder forward: bounds the memory the kept hidden states of every layer take.
_CHUNKS_PER_FORWARD = 8


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments exactly as A1111 does.

    1. Scan tokens: `(` and `[` open a group; `)` multiplies the group by 1.1, `:w)` by w, `]` by 1/1.1;
       a closer without its opener, a lone `:` and escaped characters are literal text.
    2. Text runs are split on `BREAK`, which becomes the fragment ("BREAK", -1.0).
    3. Groups still open at the end are closed there.
    4. Adjacent fragments of equal weight are merged.
    """
    texts: list[str] = []
    weights: list[float] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        weights[start:] = [weight * multiplier for weight in weights[start:]]

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            texts.append(token[1:])
            weights.append(1.0)
        elif token == "(":
            round_starts.append(len(texts))
        elif token == "[":
            square_starts.append(len(texts))
        elif weight is not None and round_starts:
            multiply_from(round_starts.pop(), _parse_attention_weight(weight))
        elif token == ")" and round_starts:
            multiply_from(round_starts.pop(), _ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_starts:
            multiply_from(square_starts.pop(), _SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    texts.append(BREAK_FRAGMENT[0])
                    weights.append(BREAK_FRAGMENT[1])
                texts.append(part)
                weights.append(1.0)

    for start in round_starts:
        multiply_from(start, _ROUND_BRACKET_MULTIPLIER)
    for start in square_starts:
        multiply_from(start, _SQUARE_BRACKET_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for fragment_text, fragment_weight in zip(texts, weights, strict=True):
        if merged and merged[-1][1] == fragment_weight:
            merged[-1] = (merged[-1][0] + fragment_text, fragment_weight)
        else:
            merged.append((fragment_text, fragment_weight))
    return merged or [("", 1.0)]


def _parse_attention_weight(weight: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise InvalidInputError(
            "prompt", f"attention weight {weight!r} is not a number; write it like (word:1.2)"
        ) from None


@dataclass(frozen=True, kw_only=True)
class ExtraNetworkCall:
    """One `<kind:name:...>` tag of a prompt; `lyco` tags come back as kind `lora`."""

    kind: str
    name: str
    te_multiplier: float
    unet_multiplier: float


def extract_extra_networks(prompt: str) -> tuple[str, tuple[ExtraNetworkCall, ...]]:
    """Remove every `<kind:args>` tag from the prompt and return the remaining text with the calls, in order.

    Arguments follow A1111's Lora syntax: `name[:te[:unet]]`, or named `te=`/`unet=` (which win over
    positional ones); the unet multiplier defaults to the te one, which defaults to 1.0. Other named
    arguments (`dyn=`, `lbw=`...) are accepted and ignored.
    """
    calls: list[ExtraNetworkCall] = []

    def take(match: re.Match[str]) -> str:
        calls.append(_extra_network_call(match.group(1), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tuple(calls)


def _extra_network_call(kind: str, arguments: str) -> ExtraNetworkCall:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in arguments.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise InvalidInputError("prompt", f"<{kind}:{arguments}> names no network; write it like <{kind}:name:0.8>")
    tag = f"<{kind}:{arguments}>"
    te_multiplier = _parse_multiplier(positional[1], tag) if len(positional) > 1 else 1.0
    te_multiplier = _parse_multiplier(named["te"], tag) if "te" in named else te_multiplier
    unet_multiplier = _parse_multiplier(positional[2], tag) if len(positional) > 2 else te_multiplier
    unet_multiplier = _parse_multiplier(named["unet"], tag) if "unet" in named else unet_multiplier
    return ExtraNetworkCall(
        kind=_KIND_ALIASES.get(kind, kind),
        name=positional[0],
        te_multiplier=te_multiplier,
        unet_multiplier=unet_multiplier,
    )


def _parse_multiplier(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInputError(
            "prompt", f"{tag} has the weight {value!r}, which is not a number; write it like <lora:name:0.8>"
        ) from None


@dataclass(frozen=True, kw_only=True)
class PromptChunk:
    """One text-encoder input: BOS, 75 prompt or padding tokens, EOS (77 ids), and a weight per token."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]


def tokenize_chunks(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    parse_attention: bool = True,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[PromptChunk]:
    """Pack a prompt's tokens into 77-token chunks the way A1111's `tokenize_line` does.

    1. Parse attention (unless `parse_attention` is off: A1111's emphasis "None" reads brackets literally)
       and tokenize each fragment without BOS/EOS.
    2. Fill chunks of 75 tokens; `BREAK` closes the current chunk early.
    3. When a chunk is full and its last comma lies within `comma_padding_backtrack` tokens of the end, the
       tokens after that comma move to the next chunk.
    4. Each chunk becomes BOS + 75 tokens + EOS, padded with EOS; encoders whose pad token differs
       (OpenCLIP: "!") get that pad after the first EOS. Special and padding tokens weigh 1.0.
    An empty prompt gives one chunk.
    """
    fragments = parse_prompt_attention(text) if parse_attention else [(text, 1.0)]
    token_lists = tokenizer([fragment for fragment, _ in fragments], truncation=False, add_special_tokens=False)
    packer = _ChunkPacker(
        bos_id=_required_token_id(tokenizer.bos_token_id, "BOS"),
        eos_id=_required_token_id(tokenizer.eos_token_id, "EOS"),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        comma_id=tokenizer.get_vocab().get(",</w>"),
        comma_padding_backtrack=comma_padding_backtrack,
    )
    for token_ids, fragment in zip(token_lists["input_ids"], fragments, strict=True):
        if fragment == BREAK_FRAGMENT:
            packer.close_chunk()
        else:
            packer.add(token_ids, fragment[1])
    return packer.finish()


def _required_token_id(token_id: int | None, name: str) -> int:
    if token_id is None:
        raise ValueError(f"the tokenizer has no {name} token; a CLIP tokenizer is required")
    return token_id


class _ChunkPacker:
    """The chunk being filled and the ones already closed, for `tokenize_chunks`."""

    def __init__(
        self, *, bos_id: int, eos_id: int, pad_id: int, comma_id: int | None, comma_padding_backtrack: int
    ) -> None:
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.comma_id = comma_id
        self.comma_padding_backtrack = comma_padding_backtrack
        self.chunks: list[PromptChunk] = []
        self.token_ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def add(self, token_ids: Iterable[int], weight: float) -> None:
        for token_id in token_ids:
            if token_id == self.comma_id:
                self.last_comma = len(self.token_ids)
            elif self._may_backtrack():
                self._move_tail_after_comma_to_next_chunk()
            if len(self.token_ids) == CHUNK_LENGTH:
                self.close_chunk()
            self.token_ids.append(token_id)
            self.weights.append(weight)

    def _may_backtrack(self) -> bool:
        return (
            self.comma_padding_backtrack != 0
            and len(self.token_ids) == CHUNK_LENGTH
            and self.last_comma != -1
            and len(self.token_ids) - self.last_comma <= self.comma_padding_backtrack
        )

    def _move_tail_after_comma_to_next_chunk(self) -> None:
        split = self.last_comma + 1
        tail_ids, tail_weights = self.token_ids[split:], self.weights[split:]
        self.token_ids, self.weights = self.token_ids[:split], self.weights[:split]
        self.close_chunk()
        self.token_ids, self.weights = tail_ids, tail_weights

    def close_chunk(self) -> None:
        padding = CHUNK_LENGTH - len(self.token_ids)
        token_ids = [self.bos_id, *self.token_ids, *[self.eos_id] * padding, self.eos_id]
        if self.pad_id != self.eos_id:
            first_eos = token_ids.index(self.eos_id)
            token_ids[first_eos + 1 :] = [self.pad_id] * (len(token_ids) - first_eos - 1)
        weights = (1.0, *self.weights, *[1.0] * padding, 1.0)
        self.chunks.append(PromptChunk(token_ids=tuple(token_ids), weights=weights))
        self.token_ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> list[PromptChunk]:
        if self.token_ids or not self.chunks:
            self.close_chunk()
        return self.chunks


class Emphasis(StrEnum):
    """A1111's `emphasis` option: what token weights do to the encoder output."""

    ORIGINAL = "Original"  # multiply by the weights, then restore the chunk's mean
    NO_NORM = "No norm"  # multiply by the weights only
    IGNORE = "Ignore"  # parse the syntax, drop the weights
    NONE = "None"  # no syntax at all: brackets and BREAK are read as words


class _Layer(Enum):
    """Which hidden state an encoder contributes (A1111: SD1/SD2 use the last, SDXL the penultimate)."""

    LAST = "last"
    PENULTIMATE = "penultimate"


@dataclass(frozen=True, kw_only=True)
class EncodedPrompts:
    """Conditioning ready for diffusers' `prompt_embeds=`, `negative_prompt_embeds=` and (SDXL) pooled args."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None


@dataclass(frozen=True, kw_only=True)
class _TextEncoderStage:
    tokenizer: PreTrainedTokenizerBase
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection
    layer: _Layer
    gives_pooled: bool

    @property
    def hidden_state_count(self) -> int:
        return int(self.text_encoder.config.num_hidden_layers) + 1

    def hidden_state_offset(self, clip_skip: int) -> int:
        return clip_skip if self.layer is _Layer.LAST else clip_skip + 1


@dataclass(frozen=True, kw_only=True)
class _StageOutput:
    embeds: dict[str, torch.Tensor]
    pooled: dict[str, torch.Tensor] | None


class PromptEncoder:
    """Encodes A1111 prompts with a pipeline's CLIP tokenizer(s) and text encoder(s).

    SD1.x/SD2.x: one encoder, its last hidden state (clip_skip n > 1: the n-th from last, through the final
    layer norm). SDXL: both encoders' penultimate hidden states (moved back by clip_skip - 1, no layer norm)
    side by side, pooled from encoder 2's first chunk; an encoder-2-only pipeline (refiner) works too.
    """

    def __init__(self, stages: Sequence[_TextEncoderStage]) -> None:
        if not stages:
            raise ValueError("a PromptEncoder needs at least one tokenizer and text encoder")
        self._stages = tuple(stages)
        self.is_sdxl = stages[0].layer is _Layer.PENULTIMATE

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline) -> PromptEncoder:
        """Use `tokenizer`/`text_encoder` and, for SDXL, `tokenizer_2`/`text_encoder_2` (alone for a refiner)."""
        layer = _Layer.PENULTIMATE if getattr(pipe, "text_encoder_2", None) is not None else _Layer.LAST
        candidates = (
            _stage_of(pipe, "tokenizer", "text_encoder", layer=layer, gives_pooled=False),
            _stage_of(pipe, "tokenizer_2", "text_encoder_2", layer=layer, gives_pooled=True),
        )
        stages = [stage for stage in candidates if stage is not None]
        if not stages:
            raise ValueError(f"{type(pipe).__name__} has no tokenizer and text encoder to encode prompts with")
        return cls(stages)

    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        *,
        clip_skip: int = 1,
        emphasis: str = "Original",
    ) -> EncodedPrompts:
        """Encode a batch of prompts and their negatives (already stripped of extra-network tags).

        1. Chunk every distinct text once; every text gets as many chunks as the longest one, the extra
           ones being empty-prompt chunks (A1111 pads cond and uncond the same way).
        2. Encode every distinct chunk once per encoder and apply the emphasis to it.
        3. Join each text's chunks along the sequence, the encoders along the features, and stack the batch.
        SDXL, like A1111, conditions on zeros when every negative prompt is empty.
        """
        if len(prompts) != len(negative_prompts):
            raise InvalidInputError(
                "negative_prompt",
                f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts; give one of each",
            )
        if not prompts:
            raise InvalidInputError("prompt", "no prompt to encode; give at least one")
        mode = _emphasis_mode(emphasis)
        self._check_clip_skip(clip_skip)
        texts = list(dict.fromkeys([*prompts, *negative_prompts]))
        chunks_by_stage = [
            {text: tokenize_chunks(stage.tokenizer, text, parse_attention=mode is not Emphasis.NONE) for text in texts}
            for stage in self._stages
        ]
        chunk_count = max(len(chunks) for by_text in chunks_by_stage for chunks in by_text.values())
        with torch.no_grad():
            outputs = [
                self._encode_stage(stage, by_text, chunk_count, clip_skip=clip_skip, mode=mode)
                for stage, by_text in zip(self._stages, chunks_by_stage, strict=True)
            ]
        embeds = {text: torch.cat([output.embeds[text] for output in outputs], dim=-1) for text in texts}
        pooled = next((output.pooled for output in outputs if output.pooled is not None), None)
        prompt_embeds = torch.stack([embeds[text] for text in prompts])
        negative_prompt_embeds = torch.stack([embeds[text] for text in negative_prompts])
        pooled_prompt_embeds = torch.stack([pooled[text] for text in prompts]) if pooled is not None else None
        negative_pooled = torch.stack([pooled[text] for text in negative_prompts]) if pooled is not None else None
        if self.is_sdxl and all(text == "" for text in negative_prompts):
            negative_prompt_embeds = torch.zeros_like(negative_prompt_embeds)
            negative_pooled = torch.zeros_like(negative_pooled) if negative_pooled is not None else None
        return EncodedPrompts(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled,
        )

    def _check_clip_skip(self, clip_skip: int) -> None:
        highest = min(stage.hidden_state_count - stage.hidden_state_offset(1) + 1 for stage in self._stages)
        if not 1 <= clip_skip <= highest:
            raise InvalidInputError(
                "clip_skip", f"clip_skip {clip_skip} is out of range; this model accepts 1 to {highest}"
            )

    def _encode_stage(
        self,
        stage: _TextEncoderStage,
        chunks_by_text: dict[str, list[PromptChunk]],
        chunk_count: int,
        *,
        clip_skip: int,
        mode: Emphasis,
    ) -> _StageOutput:
        empty_chunk = tokenize_chunks(stage.tokenizer, "")[0]
        padded = {text: chunks + [empty_chunk] * (chunk_count - len(chunks)) for text, chunks in chunks_by_text.items()}
        distinct = list(dict.fromkeys(chunk for chunks in padded.values() for chunk in chunks))
        hidden, pooled = _run_text_encoder(stage, distinct, clip_skip=clip_skip)
        hidden = _apply_emphasis(hidden, [chunk.weights for chunk in distinct], mode)
        row = {chunk: index for index, chunk in enumerate(distinct)}
        embeds = {text: torch.cat([hidden[row[chunk]] for chunk in chunks]) for text, chunks in padded.items()}
        if pooled is None:
            return _StageOutput(embeds=embeds, pooled=None)
        return _StageOutput(embeds=embeds, pooled={text: pooled[row[chunks[0]]] for text, chunks in padded.items()})


def _stage_of(
    pipe: DiffusionPipeline, tokenizer_name: str, encoder_name: str, *, layer: _Layer, gives_pooled: bool
) -> _TextEncoderStage | None:
    tokenizer = getattr(pipe, tokenizer_name, None)
    text_encoder = getattr(pipe, encoder_name, None)
    if tokenizer is None and text_encoder is None:
        return None
    if tokenizer is None or text_encoder is None:
        raise ValueError(f"{type(pipe).__name__} has only one of {tokenizer_name} and {encoder_name}; it needs both")
    return _TextEncoderStage(tokenizer=tokenizer, text_encoder=text_encoder, layer=layer, gives_pooled=gives_pooled)


def _emphasis_mode(emphasis: str) -> Emphasis:
    try:
        return Emphasis(emphasis)
    except ValueError:
        raise InvalidInputError(
            "emphasis", f"unknown emphasis {emphasis!r}", valid_values=[mode.value for mode in Emphasis]
        ) from None


def _run_text_encoder(
    stage: _TextEncoderStage, chunks: Sequence[PromptChunk], *, clip_skip: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (chunks, 77, width) of the chosen layer and, for a pooling stage, the projected pool."""
    encoder = stage.text_encoder
    offset = stage.hidden_state_offset(clip_skip)
    hidden_parts: list[torch.Tensor] = []
    pooled_parts: list[torch.Tensor] = []
    for start in range(0, len(chunks), _CHUNKS_PER_FORWARD):
        batch = chunks[start : start + _CHUNKS_PER_FORWARD]
        input_ids = torch.tensor([chunk.token_ids for chunk in batch], dtype=torch.long, device=encoder.device)
        output = encoder(input_ids=input_ids, output_hidden_states=offset > 1 or stage.layer is _Layer.PENULTIMATE)
        if stage.layer is _Layer.PENULTIMATE:
            hidden_parts.append(output.hidden_states[-offset])
        elif offset == 1:
            hidden_parts.append(output.last_hidden_state)
        else:
            text_model = encoder.text_model if isinstance(encoder, CLIPTextModelWithProjection) else encoder
            hidden_parts.append(text_model.final_layer_norm(output.hidden_states[-offset]))
        if stage.gives_pooled:
            pooled_parts.append(output.text_embeds)
    return torch.cat(hidden_parts), torch.cat(pooled_parts) if pooled_parts else None


def _apply_emphasis(hidden: torch.Tensor, weights: Sequence[Sequence[float]], mode: Emphasis) -> torch.Tensor:
    """A1111's emphasis, per chunk: each chunk was its own forward there, so its mean is its own."""
    if mode in (Emphasis.IGNORE, Emphasis.NONE):
        return hidden
    multipliers = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device).unsqueeze(-1)
    weighted = hidden * multipliers
    if mode is Emphasis.NO_NORM:
        return weighted
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A chunk whose mean is exactly zero would turn into NaNs; leaving it unscaled is the only sane reading.
    scale = torch.where(weighted_mean == 0, torch.ones_like(weighted_mean), original_mean / weighted_mean)
    return weighted * scale
