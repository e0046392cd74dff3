"""Caption tokenizers: one interface (:class:`Tokenizer`), three vocabularies, a registry by name, and
:class:`TokenizerSpec`, the one value that says which one a model reads (its text encoder implies it:
:data:`ENCODER_TOKENIZERS`) and that the data module tokenizes with.

- ``"gpt2"``: GLIDE's tokenizer (GPT-2 BPE via ``tiktoken``), needed by the released
  glide-text2im checkpoints: lower-cased text, no special tokens, padded with 50256.
- ``"clip"``: the CLIP BPE that ships inside ``open_clip_torch`` (offline), the default for
  models trained from scratch and the noised CLIP's: ``sot ids eot``, zero padding.
- ``"t5"``: a frozen T5 encoder's own SentencePiece tokenizer (Hugging Face ``transformers``), loaded
  from the encoder's hub name or directory: ``ids </s>``, padded with ``<pad>``.

All return ``tokens`` (int64 ``[B, text_ctx]``) and ``mask`` (bool ``[B, text_ctx]``, True on real
tokens). Each frames an empty or whitespace-only caption as its reference does:

- ``gpt2``: ``""`` is all 50256 with an all-False mask; ``"   "`` is not stripped: ``[220, 220, 220]`` then
  50256 (glide-text2im's ``padded_tokens_and_mask(encode(text), text_ctx)``);
- ``clip``: ``""`` and ``"   "`` (cleaned to ``""``) are ``[49406, 49407]`` (sot, eot) then 0
  (``open_clip.tokenize``; glide-text2im's noised-CLIP ``padded_tokens_and_len``, length 2);
- ``t5``: ``""`` and ``"   "`` are ``[</s>]`` then ``<pad>`` (``transformers``' T5 tokenizer).

:meth:`Tokenizer.empty` is the caption classifier-free guidance drops captions to, in training and at
sampling. For ``gpt2`` (GLIDE: an empty token sequence, the text transformer's padding embedding at
every position) and ``t5`` (``</s>``, the frozen encoder's embedding of ``""``) it equals ``self([""])``;
for ``clip`` it stays GLIDE's empty token sequence (zeros, mask all False), which models trained with it
learned as the unconditional caption, while ``self([""])`` is open_clip's ``[sot, eot]``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    import tiktoken
    from open_clip.tokenizer import SimpleTokenizer

__all__ = ["ENCODER_TOKENIZERS", "TOKENIZERS", "CLIPTokenizer", "GPT2Tokenizer", "T5Tokenizer", "Tokenizer",
           "TokenizerConflict", "TokenizerName", "TokenizerSpec", "Truncation", "build_tokenizer",
           "check_prompt_lengths", "implied_tokenizer", "tokenizer_files"]

log = logging.getLogger(__name__)

TokenizerName = Literal["clip", "gpt2", "t5"]
GPT2_BPE_DIR_ENV = "GLIDE_GPT2_BPE_DIR"
_GPT2_FILES = ("encoder.json", "vocab.bpe")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the samplers need from a tokenizer."""

    n_vocab: int
    text_ctx: int

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize captions into ``(tokens [B, text_ctx] int64, mask [B, text_ctx] bool)``."""
        ...

    def empty(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``batch_size`` copies of the caption classifier-free guidance drops to (see the module docstring:
        ``self([""])`` for ``gpt2`` and ``t5``, an all-padding, all-False-mask sequence for ``clip``)."""
        ...

    def truncation(self, text: str) -> Truncation:
        """How ``text`` fits ``text_ctx``: the tokens it needs (framing included) and the text the model reads."""
        ...


class Truncation(NamedTuple):
    """How one caption fits a tokenizer's context (:meth:`Tokenizer.truncation`)."""

    n_tokens: int
    """Tokens the whole caption needs, framing (sot/eot, ``</s>``) included."""
    text_ctx: int
    """Tokens the model reads (longer captions are cut to this many)."""
    used_text: str
    """The text of the tokens kept: the caption itself when it fits, else its decoded first tokens."""

    @property
    def cut(self) -> bool:
        """True when the caption needs more tokens than the context holds."""
        return self.n_tokens > self.text_ctx


def _as_list(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"captions must be str, got {bad[0]}")
    return texts


def _pad(seqs: Sequence[Sequence[int]], text_ctx: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad (already truncated) id sequences to ``text_ctx``; mask is True on the ids."""
    tokens = torch.full((len(seqs), text_ctx), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), text_ctx), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        if seq:
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
    return tokens, mask


def _check_ctx(text_ctx: int, minimum: int) -> int:
    if text_ctx < minimum:
        raise ValueError(f"text_ctx must be >= {minimum}, got {text_ctx}")
    return int(text_ctx)


def _plain_bpe_file(bpe_dir: Path, name: str) -> tuple[str, str]:
    """Path of an uncompressed copy of ``name`` (gunzipped into the temp dir if only ``.gz``
    exists) and the sha256 of its contents (tiktoken caches files by path; the hash makes it
    re-read a file whose contents changed)."""
    plain, packed = bpe_dir / name, bpe_dir / f"{name}.gz"
    if plain.is_file():
        data = plain.read_bytes()
        return str(plain), hashlib.sha256(data).hexdigest()
    if not packed.is_file():
        raise FileNotFoundError(f"GPT-2 BPE dir {bpe_dir} has neither {name} nor {name}.gz")
    data = gzip.decompress(packed.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    out = Path(tempfile.gettempdir()) / "glide_lightning_gpt2_bpe" / digest[:16] / name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: safe when several processes build at once
    return str(out), digest


@lru_cache(maxsize=None)
def _gpt2_encoding(bpe_dir: str | None) -> tiktoken.Encoding:
    """Build (once per process and dir) tiktoken's GPT-2 encoding, offline when ``bpe_dir``."""
    import tiktoken

    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and nothing in tiktoken's cache
            raise RuntimeError(
                "could not load tiktoken's 'gpt2' encoding (it is downloaded on first use); "
                "pass GPT2Tokenizer(bpe_dir=...) or set "
                f"${GPT2_BPE_DIR_ENV} to a dir with encoder.json(.gz) and vocab.bpe(.gz)"
            ) from e
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str  # (tiktoken>=0.8)

    (encoder_json, encoder_hash), (vocab_bpe, vocab_hash) = (
        _plain_bpe_file(Path(bpe_dir), name) for name in _GPT2_FILES
    )
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe, encoder_json, vocab_bpe_hash=vocab_hash, encoder_json_hash=encoder_hash
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,  # the pattern of tiktoken's own "gpt2" encoding
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2Tokenizer.end_token},
        explicit_n_vocab=GPT2Tokenizer.n_vocab,
    )


class GPT2Tokenizer:
    """GLIDE's tokenizer (released glide-text2im checkpoints): lower-case, GPT-2 BPE without
    special tokens, truncate to ``text_ctx``, pad with ``end_token`` (50256, mask False). As glide-text2im's
    ``encode``, nothing is stripped: ``""`` is padding only (mask all False, equal to :meth:`empty`), and
    ``"   "`` is the BPE of three spaces, ``[220, 220, 220]``.

    ``bpe_dir`` (default: ``$GLIDE_GPT2_BPE_DIR``) holds ``encoder.json`` and ``vocab.bpe``
    (or their ``.gz``) and builds the encoding offline; without it, ``tiktoken.get_encoding("gpt2")``
    is used (downloaded once, then cached by tiktoken). The encoding is built on first use.
    """

    n_vocab: int = 50257
    end_token: int = 50256

    def __init__(self, text_ctx: int = 128, bpe_dir: str | os.PathLike[str] | None = None) -> None:
        self.text_ctx = _check_ctx(text_ctx, 1)
        bpe_dir = bpe_dir if bpe_dir is not None else os.environ.get(GPT2_BPE_DIR_ENV) or None
        self.bpe_dir = str(Path(bpe_dir).expanduser().resolve()) if bpe_dir is not None else None
        if self.bpe_dir is not None and not Path(self.bpe_dir).is_dir():
            raise FileNotFoundError(f"GPT-2 BPE dir not found: {self.bpe_dir}")

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The (process-wide cached) tiktoken encoding."""
        return _gpt2_encoding(self.bpe_dir)

    def encode(self, text: str) -> list[int]:
        """Raw BPE ids of one caption, lower-cased, not truncated."""
        return self.encoding.encode_ordinary(text.lower())

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize captions: see :class:`Tokenizer`."""
        seqs = [self.encode(t)[: self.text_ctx] for t in _as_list(texts)]
        return _pad(seqs, self.text_ctx, self.end_token)

    def truncation(self, text: str) -> Truncation:
        """See :class:`Tokenizer`; ``used_text`` is lower-cased, as the model reads it."""
        ids = self.encode(text)
        cut = len(ids) > self.text_ctx
        return Truncation(len(ids), self.text_ctx, self.encoding.decode(ids[: self.text_ctx]) if cut else text)

    def empty(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``batch_size`` empty captions: all ``end_token``, mask all False."""
        return _pad([[]] * batch_size, self.text_ctx, self.end_token)


@lru_cache(maxsize=1)
def _clip_bpe() -> SimpleTokenizer:
    from open_clip.tokenizer import SimpleTokenizer  # slow (imports all of open_clip): lazy

    return SimpleTokenizer()


class CLIPTokenizer:
    """The CLIP BPE shipped with ``open_clip_torch`` (offline): ``sot ids eot``, truncated to
    ``text_ctx`` with ``eot`` kept last (as CLIP does), zero padding, mask True on ``sot..eot``: the ids
    ``open_clip.tokenize`` gives, and the framing glide-text2im's noised CLIP reads
    (``padded_tokens_and_len``). A caption whose BPE ids are empty (``""``, whitespace, which open_clip's
    cleaning strips) is ``[sot, eot]`` (49406, 49407), as in both references.

    :meth:`empty` is not that: it is all zeros with an all-False mask, the GLIDE-style "empty token
    sequence" classifier-free guidance drops captions to (what models trained with this tokenizer saw),
    the text transformer's padding embedding covering the masked positions. ``open_clip`` is imported
    on the first call, so building this object (e.g. from a config) stays cheap.
    """

    n_vocab: int = 49408
    sot_token: int = 49406
    eot_token: int = 49407
    pad_token: int = 0

    def __init__(self, text_ctx: int = 77) -> None:
        self.text_ctx = _check_ctx(text_ctx, 2)

    @property
    def bpe(self) -> SimpleTokenizer:
        """open_clip's (process-wide cached) ``SimpleTokenizer``."""
        return _clip_bpe()

    def encode(self, text: str) -> list[int]:
        """Raw BPE ids (open_clip cleans and lower-cases the text), no sot/eot, not truncated."""
        return self.bpe.encode(text)

    def _frame(self, ids: list[int]) -> list[int]:
        return [self.sot_token, *ids[: self.text_ctx - 2], self.eot_token]

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize captions: see :class:`Tokenizer`."""
        seqs = [self._frame(self.encode(t)) for t in _as_list(texts)]
        return _pad(seqs, self.text_ctx, self.pad_token)

    def truncation(self, text: str) -> Truncation:
        """See :class:`Tokenizer`: ``n_tokens`` counts sot and eot; ``used_text`` is open_clip's cleaned text."""
        ids = self.encode(text)
        cut = len(ids) + 2 > self.text_ctx
        return Truncation(len(ids) + 2, self.text_ctx, self.bpe.decode(ids[: self.text_ctx - 2]).strip() if cut else text)

    def empty(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``batch_size`` dropped captions for classifier-free guidance: all zeros, mask all False (not
        ``self([""])``, which is ``[sot, eot]``)."""
        return _pad([[]] * batch_size, self.text_ctx, self.pad_token)


class T5Tokenizer:
    """A T5's SentencePiece tokenizer through ``transformers.AutoTokenizer``: ``ids </s>``, truncated to
    ``text_ctx`` (``</s>`` kept last), padded with ``<pad>`` (mask False). ``""`` and a blank are ``</s>``
    alone (SentencePiece drops the whitespace), as ``transformers`` gives them; :meth:`empty` is ``self([""])``,
    a real token whose frozen embedding is the unconditional caption.

    Args:
        text_ctx: tokens per caption.
        path: the encoder's hub name (``google/t5-v1_1-base``) or a directory with its tokenizer files
            (``spiece.model`` or ``tokenizer.json``, as ``save_pretrained`` writes them).
        revision: hub revision to pin (None: the default branch).

    Raises:
        ImportError: transformers / sentencepiece missing (names the extra to install).
        ValueError: no ``path``.
    """

    def __init__(self, text_ctx: int = 128, path: str | None = None, revision: str | None = None) -> None:
        if not path:
            raise ValueError("the t5 tokenizer needs the encoder's hub name or directory: set "
                             "model.model.text_encoder_name (e.g. google/t5-v1_1-base)")
        from glide_lightning.models.encoders import require_text_extra  # the one place the extra is named

        require_text_extra("tokenizer 't5'")
        from transformers import AutoTokenizer

        self.text_ctx = _check_ctx(text_ctx, 1)
        self.path, self.revision = str(path), revision
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, revision=revision)
        self.n_vocab = len(self.tokenizer)

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize captions: see :class:`Tokenizer`."""
        out = self.tokenizer(_as_list(texts), padding="max_length", truncation=True, max_length=self.text_ctx,
                             return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].bool()

    def truncation(self, text: str) -> Truncation:
        """See :class:`Tokenizer`: ``n_tokens`` counts ``</s>``."""
        ids = self.tokenizer(text, truncation=False)["input_ids"]  # ... </s>
        cut = len(ids) > self.text_ctx
        used = self.tokenizer.decode(ids[: self.text_ctx - 1], skip_special_tokens=True) if cut else text
        return Truncation(len(ids), self.text_ctx, used)

    def empty(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``batch_size`` empty captions: ``</s>`` then padding."""
        return self([""] * batch_size)


TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    "clip": CLIPTokenizer,
    "gpt2": GPT2Tokenizer,
    "t5": T5Tokenizer,
}


def check_prompt_lengths(tokenizer: Tokenizer, prompts: Sequence[str], model: str) -> list[Truncation]:
    """How each prompt fits ``tokenizer``'s context; logs one warning naming how many are cut (and the first),
    since a cut prompt's end never reaches the network. ``model`` names it in the warning (``base model``)."""
    fits = [tokenizer.truncation(p) for p in prompts]
    cut = [(p, f) for p, f in zip(prompts, fits) if f.cut]
    if cut:
        prompt, fit = cut[0]
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        log.warning("%d of %d prompts are longer than the %s's context of %d tokens and are cut (the first, %r, needs "
                    "%d): the model reads only their first %d tokens (recorded as prompt_used)", len(cut), len(prompts),
                    model, fit.text_ctx, shown, fit.n_tokens, fit.text_ctx)
    return fits


def build_tokenizer(name: TokenizerName, text_ctx: int, **kw: Any) -> Tokenizer:
    """Build the tokenizer registered as ``name`` (``"clip"``, ``"gpt2"`` or ``"t5"``); ``kw`` goes to its
    constructor (``bpe_dir`` for ``"gpt2"``, ``path`` and ``revision`` for ``"t5"``)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choices: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](text_ctx=text_ctx, **kw)


def tokenizer_files(name: str, *, bpe_dir: str | None = None, path: str | None = None,
                    revision: str | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`build_tokenizer` that locate tokenizer ``name``'s files: ``bpe_dir``
    for ``gpt2``, ``path`` and ``revision`` (the T5 encoder's) for ``t5``, none for ``clip``."""
    if name == "gpt2":
        return {"bpe_dir": bpe_dir}
    if name == "t5":
        return {"path": path, "revision": revision}
    return {}


# ----------------------------------------------------------------------------- the text encoder implies it
ENCODER_TOKENIZERS: dict[str, tuple[TokenizerName, ...]] = {
    "transformer": ("clip", "gpt2"),
    "t5": ("t5",),
    "clip": ("clip",),
}
"""The tokenizers each ``model.model.text_encoder`` reads, its default first. GLIDE's own ``transformer`` learns
its token embedding and reads either BPE (``clip``; ``gpt2`` for glide-text2im's checkpoints, with
``n_vocab: 50257``): the one choice left to ``model.tokenizer``. A frozen ``t5`` reads its own SentencePiece
tokenizer (from ``text_encoder_name`` / ``text_encoder_revision``), open_clip's text tower the CLIP BPE."""


class TokenizerConflict(ValueError):
    """An explicit tokenizer that the model's text encoder does not read (:func:`implied_tokenizer`)."""


def implied_tokenizer(text_encoder: str, tokenizer: TokenizerName | None = None) -> TokenizerName:
    """The tokenizer a model whose text encoder is ``text_encoder`` reads: ``tokenizer`` where given (an old config's
    explicit value equal to the implied one included), else the encoder's default (:data:`ENCODER_TOKENIZERS`).

    Raises:
        TokenizerConflict: ``tokenizer`` is not one the encoder reads; one line naming both and the fix.
        ValueError: an unknown text encoder.
    """
    if text_encoder not in ENCODER_TOKENIZERS:
        raise ValueError(f"unknown text_encoder {text_encoder!r}; choose one of {', '.join(ENCODER_TOKENIZERS)}")
    admitted = ENCODER_TOKENIZERS[text_encoder]
    if tokenizer is None:
        return admitted[0]
    if tokenizer not in admitted:
        if len(admitted) == 1:
            fix = f"drop model.tokenizer (the encoder implies {admitted[0]!r})"
        else:
            fix = f"drop model.tokenizer (default {admitted[0]!r}) or set it to {' or '.join(map(repr, admitted))}"
        # the trained transformer given a frozen encoder's tokenizer: that encoder may be what was meant
        others = [name for name, reads in ENCODER_TOKENIZERS.items() if reads == (tokenizer,) and len(admitted) > 1]
        other = f", or set model.model.text_encoder: {others[0]}" if others else ""
        raise TokenizerConflict(f"model.tokenizer {tokenizer!r} contradicts model.model.text_encoder {text_encoder!r}, "
                                f"which reads {' or '.join(map(repr, admitted))} ids: {fix}{other}")
    return tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer turns captions into a model's tokens, and where its files are: the one value the data module
    tokenizes with. The training CLI derives it from the model's config (:meth:`for_model`: the text encoder's
    tokenizer, ``model.model.text_ctx``, the T5's name and revision, ``model.bpe_dir``); ``GlideModule.tokenizer_spec``
    is the module's. By hand: ``TokenizerSpec("clip", text_ctx=77)``, ``TokenizerSpec("gpt2", 128, bpe_dir=...)``,
    ``TokenizerSpec("t5", 128, path="google/t5-v1_1-base")``.

    Raises:
        ValueError: an unknown name, ``text_ctx`` below 1, no ``path`` for ``t5``, or a file field another tokenizer's.
    """

    name: TokenizerName
    """``clip`` (CLIP BPE, offline), ``gpt2`` (GLIDE's GPT-2 BPE) or ``t5`` (a frozen T5 encoder's SentencePiece)."""
    text_ctx: int
    """Tokens per caption (padded / truncated): the model's ``text_ctx``."""
    bpe_dir: str | None = None
    """``gpt2`` only: a directory with GPT-2's ``encoder.json`` and ``vocab.bpe`` (None: ``$GLIDE_GPT2_BPE_DIR``,
    else tiktoken's download)."""
    path: str | None = None
    """``t5`` only (required): the encoder's hub name or directory (``model.model.text_encoder_name``)."""
    revision: str | None = None
    """``t5`` only: its hub revision (``model.model.text_encoder_revision``; None: the default branch)."""

    def __post_init__(self) -> None:
        if self.name not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.name!r}; choices: {', '.join(sorted(TOKENIZERS))}")
        if isinstance(self.text_ctx, bool) or not isinstance(self.text_ctx, int) or self.text_ctx < 1:
            raise ValueError(f"TokenizerSpec.text_ctx must be an int >= 1, got {self.text_ctx!r}")
        owners = {"bpe_dir": "gpt2", "path": "t5", "revision": "t5"}
        stray = [field for field, owner in owners.items() if getattr(self, field) is not None and owner != self.name]
        if stray:
            raise ValueError(f"TokenizerSpec {', '.join(stray)} belongs to tokenizer "
                             f"{owners[stray[0]]!r}, not {self.name!r}: drop it")
        if self.name == "t5" and not self.path:
            raise ValueError("TokenizerSpec('t5') needs path: the T5 encoder's hub name or directory "
                             "(model.model.text_encoder_name, e.g. google/t5-v1_1-base)")

    @classmethod
    def for_model(cls, model: Any, tokenizer: TokenizerName | None = None, bpe_dir: str | None = None) -> TokenizerSpec:
        """The tokenizer of a model config (a ``ModelConfig`` or the parser's namespace of one): its text encoder's
        (:func:`implied_tokenizer`; ``tokenizer`` only where the encoder admits several), at its ``text_ctx``; a
        ``t5``'s files are the encoder's, ``bpe_dir`` is used by ``gpt2`` only (ignored otherwise).

        Raises:
            TokenizerConflict: ``tokenizer`` contradicts the text encoder.
        """
        name = implied_tokenizer(model.text_encoder, tokenizer)
        if name == "t5":
            return cls(name, model.text_ctx, path=model.text_encoder_name, revision=model.text_encoder_revision)
        return cls(name, model.text_ctx, bpe_dir=bpe_dir if name == "gpt2" else None)

    @classmethod
    def coerce(cls, value: TokenizerSpec | Mapping[str, Any]) -> TokenizerSpec:
        """``value`` itself, or the spec of its dict (:meth:`to_dict`, as checkpoints store it)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        raise TypeError(f"tokenizer_spec must be a TokenizerSpec (e.g. TokenizerSpec('clip', text_ctx=77)) or its dict, "
                        f"got {type(value).__name__} {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (checkpoints' hyper-parameters load with ``weights_only=True``)."""
        return asdict(self)

    def build(self) -> Tokenizer:
        """The tokenizer itself (:func:`build_tokenizer`)."""
        return build_tokenizer(self.name, self.text_ctx, **tokenizer_files(self.name, bpe_dir=self.bpe_dir,
                                                                            path=self.path, revision=self.revision))
