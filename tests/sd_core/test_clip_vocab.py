"""The CLIP tokenizer derived offline from the shipped BPE file."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from sd_core.clip_vocab import FULL_VOCAB_SIZE, write_tokenizer_folder


def test_the_full_vocabulary_reproduces_clip_l_token_ids(tmp_path: Path):
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer_folder(tmp_path / "tok")), local_files_only=True)
    assert len(tokenizer) == FULL_VOCAB_SIZE
    # OpenAI CLIP ViT-L/14's ids for this sentence (BOS 49406, EOS 49407).
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == [
        49406,
        320,
        1125,
        539,
        550,
        18376,
        6765,
        320,
        4558,
        49407,
    ]


def test_a_small_vocabulary_still_tokenizes_any_text(tmp_path: Path):
    folder = write_tokenizer_folder(tmp_path / "small", vocab_size=1000, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tokenizer) == 1000
    ids = tokenizer("日本 café, a house").input_ids
    assert ids[0] == 998 and ids[-1] == 999
    assert all(0 <= token < 1000 for token in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "日本café,ahouse"
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("!")
