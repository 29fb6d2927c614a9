"""The CLIP byte-pair vocabulary, derived offline from the BPE file we ship (OpenAI CLIP, MIT).

Writes the tokenizer folders that diffusers/transformers read (vocab.json, merges.txt, configs) for the
full 49,408-token CLIP vocabulary of real checkpoints, or for a small prefix of it for tiny test models.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).with_name("data") / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
FULL_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_BYTE_TOKENS = 256


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte->unicode map, in OpenAI's order (printable bytes first)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


@lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Same slice as OpenAI's SimpleTokenizer: skip the version header, keep 49152-256-2 merges.
    merge_lines = lines[1 : 49152 - 256 - 2 + 1]
    return tuple((left, right) for left, right in (line.split() for line in merge_lines))


def vocabulary(vocab_size: int = FULL_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Token->id map and merge list of CLIP's tokenizer, truncated to `vocab_size` tokens.

    Every byte stays encodable at any size (the 512 byte tokens come first), so a truncated vocabulary
    tokenizes any text, just into more pieces.
    """
    minimum = 2 * _BYTE_TOKENS + 2
    if not minimum <= vocab_size <= FULL_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be within {minimum}..{FULL_VOCAB_SIZE}, got {vocab_size}")
    byte_tokens = _bytes_to_unicode()
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    merges = list(_all_merges()[: vocab_size - len(tokens) - 2])
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_folder(folder: Path, *, vocab_size: int = FULL_VOCAB_SIZE, pad_token: str = EOS_TOKEN) -> Path:
    """Write a CLIPTokenizer folder. SD1/SDXL's first encoder pad with EOS; OpenCLIP encoders pad with "!"."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary(vocab_size)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{left} {right}" for left, right in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder
