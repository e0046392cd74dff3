"""Tests for glide_lightning.data.tokenizers (offline: GPT-2 BPE from the shared fixture files)."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from glide_lightning.data import (
    TOKENIZERS,
    CLIPTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    build_tokenizer,
)
from glide_lightning.data import tokenizers as tokenizers_module

LONG = "a photograph of an astronaut riding a horse on the moon, " * 12


@pytest.fixture(scope="module")
def gpt2(gpt2_bpe_dir: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer(text_ctx=128, bpe_dir=gpt2_bpe_dir)


@pytest.fixture(scope="module")
def clip() -> CLIPTokenizer:
    return CLIPTokenizer(text_ctx=77)


def _check_shapes(tokens: torch.Tensor, mask: torch.Tensor, batch: int, text_ctx: int) -> None:
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.shape == mask.shape == (batch, text_ctx)


# ---------------------------------------------------------------------------------------- GPT-2
def test_gpt2_reproduces_every_glide_case(gpt2: GPT2Tokenizer, glide_cases: dict[str, Any]) -> None:
    assert glide_cases["text_ctx"] == gpt2.text_ctx
    assert glide_cases["n_vocab"] == gpt2.n_vocab == gpt2.encoding.n_vocab
    assert glide_cases["end_token"] == gpt2.end_token
    assert len(glide_cases["cases"]) > 0
    for case in glide_cases["cases"]:
        text = case["text"]
        assert gpt2.encode(text) == case["tokens"], text
        tokens, mask = gpt2(text)
        _check_shapes(tokens, mask, 1, 128)
        assert tokens[0].tolist() == case["padded_128"], text
        assert mask[0].tolist() == case["mask_128"], text


def test_gpt2_batch_equals_single(gpt2: GPT2Tokenizer, glide_cases: dict[str, Any]) -> None:
    cases = glide_cases["cases"]
    tokens, mask = gpt2([c["text"] for c in cases])
    _check_shapes(tokens, mask, len(cases), 128)
    assert tokens.tolist() == [c["padded_128"] for c in cases]
    assert mask.tolist() == [c["mask_128"] for c in cases]


def test_gpt2_truncation(gpt2_bpe_dir: Path) -> None:
    tok = GPT2Tokenizer(text_ctx=5, bpe_dir=gpt2_bpe_dir)
    full = tok.encode(LONG)
    assert len(full) > 5
    tokens, mask = tok(LONG)
    _check_shapes(tokens, mask, 1, 5)
    assert tokens[0].tolist() == full[:5]
    assert mask.all()


def test_gpt2_mixed_lengths(gpt2_bpe_dir: Path) -> None:
    tok = GPT2Tokenizer(text_ctx=16, bpe_dir=gpt2_bpe_dir)
    texts = ["a corgi", "", LONG, "an oil painting of a corgi wearing a party hat"]
    tokens, mask = tok(texts)
    _check_shapes(tokens, mask, len(texts), 16)
    for row, text in enumerate(texts):
        ids = tok.encode(text)[:16]
        n = len(ids)
        assert tokens[row, :n].tolist() == ids
        assert (tokens[row, n:] == 50256).all()
        assert mask[row, :n].all() and not mask[row, n:].any()
    lengths = mask.sum(1).tolist()
    assert lengths[1] == 0 and lengths[2] == 16 and 0 < lengths[0] < lengths[3] < 16


def test_gpt2_empty_caption(gpt2: GPT2Tokenizer) -> None:
    tokens, mask = gpt2.empty(3)
    _check_shapes(tokens, mask, 3, 128)
    assert (tokens == 50256).all() and not mask.any()
    one_t, one_m = gpt2([""])
    assert torch.equal(tokens, one_t.expand(3, -1)) and torch.equal(mask, one_m.expand(3, -1))
    _check_shapes(*gpt2.empty(0), 0, 128)


def glide_gpt2_reference(bpe_dir: Path, text: str, text_ctx: int) -> tuple[list[int], list[bool]]:
    """glide-text2im's ``padded_tokens_and_mask(encode(text), text_ctx)`` for a caption that is empty or whitespace
    only, computed here from the fixture's GPT-2 files by that code's semantics: ``encode`` lower-cases and does
    not strip; its pre-token pattern (``... |\\s+(?!\\S)|\\s+``) yields nothing for ``""`` and the whole run for a
    blank; each pre-token's UTF-8 bytes map to GPT-2's byte alphabet, then the lowest-ranked adjacent pair of
    ``vocab.bpe`` is merged until none is left; padding is ``end_token = n_vocab - 1`` with mask False."""
    assert not text.strip(), "this reference covers empty and whitespace-only captions"
    encoder = json.loads(gzip.decompress((bpe_dir / "encoder.json.gz").read_bytes()))
    merges = gzip.decompress((bpe_dir / "vocab.bpe.gz").read_bytes()).decode().split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]  # whitespace and control bytes: moved past 255, in order
    alphabet = {b: chr(b) for b in shown} | {b: chr(256 + k) for k, b in enumerate(hidden)}
    ids: list[int] = []
    for pre_token in [text.lower()] if text else []:
        word = [alphabet[b] for b in pre_token.encode("utf-8")]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if tuple(word[i:i + 2]) == pair:
                    merged, i = [*merged, word[i] + word[i + 1]], i + 2
                else:
                    merged, i = [*merged, word[i]], i + 1
            word = merged
        ids += [encoder[symbol] for symbol in word]
    ids = ids[:text_ctx]
    end_token = len(encoder) - 1
    return ids + [end_token] * (text_ctx - len(ids)), [True] * len(ids) + [False] * (text_ctx - len(ids))


@pytest.mark.parametrize("text", ["", "   "])
def test_gpt2_frames_empty_and_blank_captions_as_glide_text2im(gpt2: GPT2Tokenizer, gpt2_bpe_dir: Path,
                                                                 text: str) -> None:
    """GLIDE's base-model path: ``""`` is all padding (50256) with an all-False mask, which is also what its
    classifier-free guidance feeds (``padded_tokens_and_mask([], text_ctx)``, our :meth:`empty`); a blank is
    not stripped: ``"   "`` is the BPE of three spaces, ``[220, 220, 220]``."""
    ref_tokens, ref_mask = glide_gpt2_reference(gpt2_bpe_dir, text, 128)
    assert ref_tokens[:3] == ([50256] * 3 if text == "" else [220, 220, 220])  # the values the reference gives
    tokens, mask = gpt2([text, text])
    assert tokens.tolist() == [ref_tokens] * 2 and mask.tolist() == [ref_mask] * 2
    if text == "":
        empty_tokens, empty_mask = gpt2.empty(2)
        assert empty_tokens.tolist() == [ref_tokens] * 2 and empty_mask.tolist() == [ref_mask] * 2


def test_gpt2_lower_cases(gpt2: GPT2Tokenizer) -> None:
    upper, upper_mask = gpt2(["A HOUSE By The Lake", "Dogs Playing"])
    lower, lower_mask = gpt2(["a house by the lake", "dogs playing"])
    assert torch.equal(upper, lower) and torch.equal(upper_mask, lower_mask)


def test_gpt2_str_and_list_agree(gpt2: GPT2Tokenizer) -> None:
    a, am = gpt2("a corgi")
    b, bm = gpt2(["a corgi"])
    assert torch.equal(a, b) and torch.equal(am, bm)


def test_gpt2_uncompressed_dir_and_env_var(
    gpt2_bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes(gzip.decompress((gpt2_bpe_dir / f"{name}.gz").read_bytes()))
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no copy of this tmp dir in tiktoken's cache
    tok = GPT2Tokenizer(text_ctx=8)
    assert tok.bpe_dir == str(tmp_path.resolve())
    ref = GPT2Tokenizer(text_ctx=8, bpe_dir=gpt2_bpe_dir)
    text = "naïve café — 100% “quoted” text!"
    assert tok.encode(text) == ref.encode(text)
    assert torch.equal(tok(text)[0], ref(text)[0])


def test_gpt2_bad_bpe_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT2Tokenizer(bpe_dir=tmp_path / "missing")
    tok = GPT2Tokenizer(bpe_dir=tmp_path)  # exists but holds no BPE files: fails when built
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        tok("a corgi")


def test_gpt2_offline_without_bpe_dir_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def no_network(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.delenv("GLIDE_GPT2_BPE_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    tokenizers_module._gpt2_encoding.cache_clear()
    try:
        tok = GPT2Tokenizer()
        assert tok.bpe_dir is None
        with pytest.raises(RuntimeError, match="bpe_dir") as info:
            tok("a corgi")
        assert "GLIDE_GPT2_BPE_DIR" in str(info.value)
    finally:
        tokenizers_module._gpt2_encoding.cache_clear()


# ----------------------------------------------------------------------------------------- CLIP
def test_clip_sot_eot_padding(clip: CLIPTokenizer) -> None:
    texts = ["a house by the lake", "A Corgi!"]
    tokens, mask = clip(texts)
    _check_shapes(tokens, mask, 2, 77)
    assert clip.n_vocab == clip.bpe.vocab_size == 49408
    for row, text in enumerate(texts):
        ids = clip.encode(text)
        n = len(ids) + 2
        assert tokens[row, :n].tolist() == [49406, *ids, 49407]
        assert (tokens[row, n:] == 0).all()
        assert mask[row, :n].all() and not mask[row, n:].any()


def test_clip_matches_open_clip_tokenize(clip: CLIPTokenizer) -> None:
    from open_clip.tokenizer import tokenize

    texts = ["a house by the lake", "naïve café — 100% “quoted” text!", LONG]
    for ctx in (77, 8):
        tokens, _ = CLIPTokenizer(text_ctx=ctx)(texts)
        assert torch.equal(tokens, tokenize(texts, context_length=ctx))


def test_clip_truncation_keeps_eot_last() -> None:
    tok = CLIPTokenizer(text_ctx=8)
    ids = tok.encode(LONG)
    tokens, mask = tok([LONG, "a corgi"])
    _check_shapes(tokens, mask, 2, 8)
    assert tokens[0].tolist() == [49406, *ids[:6], 49407]
    assert mask[0].all()
    assert mask[1].sum() == len(tok.encode("a corgi")) + 2


def test_clip_decode_round_trip(clip: CLIPTokenizer) -> None:
    for text in ["A House by the Lake", "an oil painting of a corgi", "Dogs playing on the beach"]:
        assert clip.bpe.decode(clip.encode(text)).strip() == text.lower()


@pytest.mark.parametrize("text_ctx", [77, 8])
def test_clip_frames_empty_and_blank_captions_as_open_clip(text_ctx: int) -> None:
    """open_clip's tokenizer (``open_clip.get_tokenizer``) frames ``""`` and a blank (cleaned to ``""``) as
    ``[sot, eot]`` then zeros; the mask is True on ``sot..eot``."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = ["", "   ", " \t\n ", "a corgi"]
    expected = reference(texts, context_length=text_ctx)
    assert expected[:3, :2].tolist() == [[49406, 49407]] * 3 and not expected[:3, 2:].any()
    tokens, mask = CLIPTokenizer(text_ctx=text_ctx)(texts)
    assert torch.equal(tokens, expected)
    eot_at = (expected == 49407).long().argmax(1)
    assert torch.equal(mask, torch.arange(text_ctx)[None] <= eot_at[:, None])


def test_clip_empty_is_guidances_empty_sequence(clip: CLIPTokenizer) -> None:
    """:meth:`CLIPTokenizer.empty` is the caption classifier-free guidance drops to (GLIDE's empty token
    sequence: zeros, mask all False), what models trained with this tokenizer saw; ``clip([""])`` is
    open_clip's ``[sot, eot]``, a different input."""
    tokens, mask = clip.empty(2)
    _check_shapes(tokens, mask, 2, 77)
    assert (tokens == 0).all() and not mask.any()
    framed, framed_mask = clip([""])
    assert framed_mask.sum() == 2 and not torch.equal(framed, tokens[:1])
    _check_shapes(*clip.empty(0), 0, 77)


def test_clip_text_ctx_too_small() -> None:
    with pytest.raises(ValueError, match="text_ctx"):
        CLIPTokenizer(text_ctx=1)


# ------------------------------------------------------------------------------ common, registry
def test_protocol_and_pickle(gpt2: GPT2Tokenizer, clip: CLIPTokenizer) -> None:
    for tok in (gpt2, clip):
        assert isinstance(tok, Tokenizer)
        copy = pickle.loads(pickle.dumps(tok))  # DataLoader workers / DDP ranks
        assert torch.equal(copy("a corgi")[0], tok("a corgi")[0])


def test_non_string_caption_rejected(clip: CLIPTokenizer) -> None:
    with pytest.raises(TypeError, match="str"):
        clip(["a corgi", None])  # type: ignore[list-item]


def test_build_tokenizer(gpt2_bpe_dir: Path) -> None:
    assert set(TOKENIZERS) == {"clip", "gpt2", "t5"}
    clip = build_tokenizer("clip", text_ctx=32)
    assert isinstance(clip, CLIPTokenizer) and clip.text_ctx == 32
    gpt2 = build_tokenizer("gpt2", text_ctx=64, bpe_dir=gpt2_bpe_dir)
    assert isinstance(gpt2, GPT2Tokenizer) and gpt2.text_ctx == 64
    assert gpt2("a corgi")[0].shape == (1, 64)


def test_unknown_tokenizer_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'") as info:
        build_tokenizer("bert", text_ctx=16)  # type: ignore[arg-type]
    assert "'clip'" in str(info.value) and "'gpt2'" in str(info.value)


# ------------------------------------------------------------------------------------------- T5
@pytest.mark.parametrize("text", ["", "   "])
def test_t5_frames_empty_and_blank_captions_as_transformers(tiny_t5_dir: Path, text: str) -> None:
    """transformers' T5 tokenizer (called directly on the tiny T5's SentencePiece files) gives ``""`` and a
    blank as ``</s>`` alone; ours pads that with ``<pad>`` (mask False), and :meth:`empty` is ``self([""])``."""
    from transformers import AutoTokenizer

    from glide_lightning.data.tokenizers import T5Tokenizer

    reference = AutoTokenizer.from_pretrained(str(tiny_t5_dir))
    ids = reference(text)["input_ids"]
    assert ids == [reference.eos_token_id]
    tokenizer = T5Tokenizer(8, path=str(tiny_t5_dir))
    tokens, mask = tokenizer([text])
    assert tokens[0].tolist() == ids + [reference.pad_token_id] * 7
    assert mask[0].tolist() == [True] + [False] * 7
    empty_tokens, empty_mask = tokenizer.empty(1)
    assert torch.equal(empty_tokens, tokens) and torch.equal(empty_mask, mask)


# ---------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("name", ["gpt2", "clip", "t5"])
def test_truncation_counts_the_tokens_and_names_the_text_the_model_reads(name: str, gpt2_bpe_dir: Path,
                                                                          tiny_t5_dir: Path) -> None:
    """A caption that fits is read whole (its count is the mask's); a longer one reports how many tokens it
    needs, and its ``used_text`` tokenizes to exactly the tokens the model reads of the whole caption."""
    from glide_lightning.data.tokenizers import Truncation, check_prompt_lengths

    files = {"gpt2": {"bpe_dir": str(gpt2_bpe_dir)}, "t5": {"path": str(tiny_t5_dir)}}.get(name, {})
    tokenizer = build_tokenizer(name, 8, **files)
    short = "a red circle"
    fit = tokenizer.truncation(short)
    assert not fit.cut and fit.used_text == short and fit.n_tokens == int(tokenizer([short])[1].sum())
    fit = tokenizer.truncation(LONG)
    assert fit.cut and fit.text_ctx == 8 and fit.n_tokens > 8
    if name != "t5":  # T5's count is transformers' own
        assert fit.n_tokens == len(tokenizer.encode(LONG)) + (2 if name == "clip" else 0)  # clip: sot, eot
    assert len(fit.used_text) < len(LONG)
    whole, used = tokenizer([LONG]), tokenizer([fit.used_text])
    assert torch.equal(whole[0], used[0]) and torch.equal(whole[1], used[1])
    fits = check_prompt_lengths(tokenizer, [short, LONG], "base model")
    assert [f.cut for f in fits] == [False, True] and all(isinstance(f, Truncation) for f in fits)


def test_the_text_encoder_implies_the_tokenizer_spec() -> None:
    """``TokenizerSpec.for_model``: a frozen encoder's own tokenizer (a T5's files are the encoder's), the trained
    transformer's clip by default or gpt2 when asked (with its BPE files); ``bpe_dir`` only reaches gpt2."""
    from types import SimpleNamespace

    from glide_lightning.data.tokenizers import ENCODER_TOKENIZERS, TokenizerConflict, TokenizerSpec, implied_tokenizer
    from glide_lightning.models.config import TEXT_ENCODERS

    assert set(ENCODER_TOKENIZERS) == set(TEXT_ENCODERS)  # every encoder says what it reads

    def model(encoder: str, **kw: Any) -> Any:
        return SimpleNamespace(text_encoder=encoder, text_ctx=8, text_encoder_name=kw.get("name"),
                               text_encoder_revision=kw.get("revision"))

    assert TokenizerSpec.for_model(model("t5", name="t5-dir", revision="abc"), bpe_dir="/bpe") == TokenizerSpec(
        "t5", 8, path="t5-dir", revision="abc")
    assert TokenizerSpec.for_model(model("clip", name="ViT-B-32"), bpe_dir="/bpe") == TokenizerSpec("clip", 8)
    assert TokenizerSpec.for_model(model("transformer"), bpe_dir="/bpe") == TokenizerSpec("clip", 8)
    assert TokenizerSpec.for_model(model("transformer"), "gpt2", "/bpe") == TokenizerSpec("gpt2", 8, bpe_dir="/bpe")
    assert implied_tokenizer("t5", "t5") == "t5"  # an older config's explicit, equal value
    with pytest.raises(TokenizerConflict, match="'gpt2' contradicts model.model.text_encoder 'clip', which reads "
                                                "'clip' ids: drop model.tokenizer \\(the encoder implies 'clip'\\)$"):
        implied_tokenizer("clip", "gpt2")
    with pytest.raises(ValueError, match="unknown text_encoder 'bert'"):
        implied_tokenizer("bert")
