"""The network's configuration (:class:`ModelConfig`) and :func:`build_model`.

The defaults are miniGLIDE's base model (GLIDE's base shrunk to 96 channels, 32 channels per
attention head) with the CLIP BPE that models trained from scratch use; glide-text2im's released
configurations are :data:`glide_lightning.models.glide_text2im.GLIDE_OPTIONS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Literal, get_args

from glide_lightning.models.encoders import (
    FROZEN_TEXT_ENCODERS,
    TEXT_ENCODER_PRECISIONS,
    TEXT_ENCODERS,
    FrozenTextEncoder,
    TextEncoderName,
    TextEncoderPrecision,
    encoder_identity,
    load_text_encoder,
)
from glide_lightning.models.nn import GROUPNORM_GROUPS
from glide_lightning.models.text2im import (
    InpaintText2ImUNet,
    SuperResInpaintText2ImUNet,
    SuperResText2ImUNet,
    Text2ImUNet,
)

__all__ = ["DEFAULT_CHANNEL_MULT", "MODEL_KINDS", "ModelConfig", "ModelKind", "build_model", "load_frozen_text_encoder"]

ModelKind = Literal["base", "upsample", "inpaint", "upsample_inpaint"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)

_MODEL_CLASSES: dict[str, type[Text2ImUNet]] = {
    "base": Text2ImUNet,
    "upsample": SuperResText2ImUNet,
    "inpaint": InpaintText2ImUNet,
    "upsample_inpaint": SuperResInpaintText2ImUNet,
}

DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
"""ADM's channel multipliers per image size, used when ``channel_mult`` is not given."""

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GLIDE-style text-conditional UNet (validated on construction)."""

    CHANGES_IMAGES: ClassVar[frozenset[str]] = frozenset({
        "kind", "image_size", "model_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
        "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "groupnorm_min_channels",
        "learn_sigma", "text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "xf_padding", "n_vocab",
        "text_encoder", "text_encoder_name", "text_encoder_pretrained", "text_encoder_revision",
        "text_encoder_precision", "text_encoder_dim", "low_res_noise_cond"})
    """Fields that change what a checkpoint samples: the network's function (the zero-shot FID image cache is keyed
    by them)."""
    KEEPS_IMAGES: ClassVar[frozenset[str]] = frozenset({"dropout"})
    """Fields that only change training (dropout is off while sampling). Every field is in one of the two sets (a
    test checks it)."""

    kind: ModelKind = "base"
    """``base`` (text → image), ``upsample`` (also conditioned on a low-resolution image),
    ``inpaint`` (also on known pixels and their mask) or ``upsample_inpaint`` (both)."""
    image_size: int = 64
    """Side of the (output) images in pixels."""
    model_channels: int = 96
    """Base channel count of the UNet, a multiple of 32 (miniGLIDE: 96; GLIDE: 192)."""
    num_res_blocks: int = 3
    """Residual blocks per resolution level (GLIDE base: 3, upsampler: 2)."""
    channel_mult: tuple[int, ...] | None = None
    """Channel multiplier of each resolution level; None picks ADM's default for ``image_size``
    (256: 1,1,2,2,4,4; 128: 1,1,2,3,4; 64: 1,2,3,4; 32: 1,2,2,2)."""
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    """Feature-map sizes (in pixels) at which the UNet uses attention, e.g. ``[32, 16, 8]``."""
    num_heads: int = 1
    """Attention heads, used when ``num_head_channels`` is -1."""
    num_head_channels: int = 32
    """Channels per attention head (-1: a fixed ``num_heads`` instead; miniGLIDE 32, GLIDE 64)."""
    num_heads_upsample: int = -1
    """Heads of the decoder's attention when ``num_head_channels`` is -1 (-1: ``num_heads``)."""
    dropout: float = 0.1
    """Dropout probability inside the residual blocks."""
    use_scale_shift_norm: bool = True
    """Condition residual blocks by an adaptive GroupNorm scale and shift (ADM) instead of a sum."""
    resblock_updown: bool = True
    """Resample with residual blocks (BigGAN style) instead of strided / upsampling convolutions."""
    groupnorm_min_channels: int = 1
    """Fewest channels per GroupNorm group: each GroupNorm has min(32, channels // this) groups (1, 2, 4,
    8, 16 or 32). 1: ADM / GLIDE's 32 groups everywhere (released checkpoints; at 32 channels a group is
    one channel, i.e. InstanceNorm, which removes every channel's per-image mean, so the network
    cannot pass the image's mean colour through: its x_0 then keeps x_t's colour noise). 4: EDM's
    (Karras et al. 2022) choice, used by the laptop preset. Weights are the same shapes either way."""
    learn_sigma: bool = True
    """Also output the variance interpolation value v (6 output channels instead of 3); needed by
    ``variance_type: learned_range``."""
    text_ctx: int = 77
    """Caption length in tokens: must equal the tokenizer's (CLIP BPE: 77; GLIDE's GPT-2 BPE: 128)."""
    xf_width: int = 512
    """Width of the text Transformer (0: no text conditioning); with a frozen ``text_encoder``, the width its
    embeddings are projected to."""
    xf_layers: int = 16
    """Layers of the text Transformer."""
    xf_heads: int = 8
    """Attention heads of the text Transformer."""
    xf_final_ln: bool = True
    """Apply a final LayerNorm to the text Transformer's output."""
    xf_padding: bool = True
    """Use a learned per-position embedding at padding positions (mask False) of the caption."""
    n_vocab: int = 49408
    """Tokenizer vocabulary size (CLIP BPE: 49408; GLIDE's GPT-2 BPE: 50257); GLIDE's transformer only."""
    text_encoder: TextEncoderName = "transformer"
    """Who encodes the caption: ``transformer`` (GLIDE's own, trained jointly: the ``xf_*`` fields), or a frozen
    pretrained encoder (Imagen): ``t5`` (a ``transformers`` T5EncoderModel, tokenizer ``t5``) or ``clip`` (the
    open_clip text tower, tokenizer ``clip``). A frozen encoder's token embeddings are LayerNorm-ed and
    projected to ``xf_width``, attended to with their padding masked out, and their mean over real tokens joins
    the timestep embedding; its weights are never trained nor saved: checkpoints record the fields below and
    sampling reloads it from them. Needs ``pip install 'glide_lightning[text]'`` (t5)."""
    text_encoder_name: str | None = None
    """The frozen encoder to load: t5: a hub name (``google/t5-v1_1-base``) or a ``save_pretrained``
    directory with its tokenizer; clip: an open_clip model name (``ViT-B-32``) or ``local-dir:PATH``
    (open_clip's folder: ``open_clip_config.json`` and weights). Required for t5 / clip."""
    text_encoder_pretrained: str | None = None
    """clip only: the open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, …) or a local weights file
    (not needed with ``local-dir:``)."""
    text_encoder_revision: str | None = None
    """t5 only: the hub revision (branch, tag or commit) to pin; None: the default branch."""
    text_encoder_precision: TextEncoderPrecision = "fp32"
    """t5 / clip: the frozen encoder's arithmetic, ``fp32`` or ``bf16`` (bf16 autocast over fp32 weights: faster on
    GPUs with bf16 and on CPUs with AVX512-BF16 / AMX; embeddings off fp32's by bf16 rounding; needs such a GPU,
    Ampere or later). Either way the encoder runs outside the caller's autocast (``trainer.precision``, the sampling
    ``precision``) and returns float32 embeddings. fp16 is not offered: T5 v1.1's feed-forward activations exceed
    fp16's range (65504), so under fp16 (``16-mixed``) its embeddings become inf / NaN. It changes the embeddings
    (a resume refuses a change of it; zero-shot FID keys its images by it). Checkpoints without it mean ``fp32``."""
    text_encoder_dim: int | None = None
    """Width D of the frozen encoder's embeddings (t5-v1_1-base: 768, ViT-B-32's text tower: 512); None: read
    from the encoder when training starts (the checkpoint records the value)."""
    low_res_noise_cond: bool = False
    """Upsampling kinds only: condition on the noise-augmentation timestep of the low-res input
    (``low_res_t``, embedded like the timestep; cascaded diffusion / Imagen). Needed to train with
    ``model.low_res_noise`` > 0. False: GLIDE's upsampler (no such input, no extra weights)."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        _positive(image_size=self.image_size, model_channels=self.model_channels)
        _positive(num_res_blocks=self.num_res_blocks)
        if self.model_channels % GROUPNORM_GROUPS:
            raise ValueError(
                f"model_channels must be a multiple of {GROUPNORM_GROUPS} (GroupNorm groups), "
                f"got {self.model_channels}"
            )
        if self.groupnorm_min_channels < 1 or GROUPNORM_GROUPS % self.groupnorm_min_channels:
            raise ValueError(f"groupnorm_min_channels must divide {GROUPNORM_GROUPS} (1, 2, 4, 8, 16 or 32), "
                             f"got {self.groupnorm_min_channels}")
        if self.channel_mult is not None:
            if isinstance(self.channel_mult, str):
                raise ValueError(f"channel_mult must be a list of ints, not a string: {self.channel_mult!r}")
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        mult = self.resolved_channel_mult  # raises for an unknown image_size
        if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
            raise ValueError(f"channel_mult must be positive ints, got {mult}")
        if self.image_size % 2 ** (len(mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{len(mult) - 1} "
                f"({len(mult)} levels in channel_mult {mult})"
            )
        if isinstance(self.attention_resolutions, str):
            raise ValueError(
                "attention_resolutions must be a list of ints (e.g. [32, 16, 8]), "
                f"not a string: {self.attention_resolutions!r}"
            )
        object.__setattr__(self, "attention_resolutions", [int(r) for r in self.attention_resolutions])
        sizes = [self.image_size // 2**level for level in range(len(mult))]
        bad = [r for r in self.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are not feature-map sizes of this UNet "
                f"(image_size {self.image_size}, channel_mult {mult}: sizes {sizes})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_heads(mult, sizes)
        if self.xf_width < 0:
            raise ValueError(f"xf_width must be >= 0 (0 disables the text encoder), got {self.xf_width}")
        self._check_text_encoder()
        if self.xf_width and not self.frozen_text_encoder:
            _positive(text_ctx=self.text_ctx, xf_heads=self.xf_heads, n_vocab=self.n_vocab)
            if self.xf_layers < 0:
                raise ValueError(f"xf_layers must be >= 0, got {self.xf_layers}")
            if self.xf_width % self.xf_heads:
                raise ValueError(f"xf_width {self.xf_width} is not divisible by xf_heads {self.xf_heads}")
        if self.low_res_noise_cond and not self.kind.startswith("upsample"):
            raise ValueError(f"low_res_noise_cond is for the upsampling kinds (upsample, upsample_inpaint), but kind "
                             f"is {self.kind!r}: remove it")

    def _check_text_encoder(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"unknown text_encoder {self.text_encoder!r}; choose one of {', '.join(TEXT_ENCODERS)}")
        if not self.frozen_text_encoder:
            extra = [f for f in ("text_encoder_name", "text_encoder_pretrained", "text_encoder_revision",
                                 "text_encoder_dim") if getattr(self, f) is not None]
            if self.text_encoder_precision != "fp32":
                extra.append("text_encoder_precision")
            if extra:
                raise ValueError(f"{', '.join(extra)} set, but text_encoder is 'transformer' (GLIDE's own): set "
                                 f"text_encoder: t5 or clip, or drop them")
            return
        if self.kind != "base":
            raise ValueError(f"text_encoder {self.text_encoder!r} is implemented for kind 'base' only, not "
                             f"{self.kind!r}")
        if not self.text_encoder_name:
            example = "google/t5-v1_1-base" if self.text_encoder == "t5" else "ViT-B-32"
            raise ValueError(f"text_encoder {self.text_encoder!r} needs text_encoder_name (e.g. {example!r}, or a local "
                             f"path)")
        if self.text_encoder == "t5" and self.text_encoder_pretrained is not None:
            raise ValueError("text_encoder_pretrained is open_clip's tag or weights file; a t5 loads from "
                             "text_encoder_name and text_encoder_revision")
        if self.text_encoder == "clip" and self.text_encoder_revision is not None:
            raise ValueError("text_encoder_revision is a hub revision of a t5; for clip give text_encoder_pretrained")
        if not self.xf_width:
            raise ValueError(f"text_encoder {self.text_encoder!r} needs xf_width > 0: the width its embeddings are "
                             f"projected to for the attention blocks")
        if self.text_encoder_dim is not None:
            _positive(text_encoder_dim=self.text_encoder_dim)
        _positive(text_ctx=self.text_ctx)
        if self.text_encoder_precision not in TEXT_ENCODER_PRECISIONS:
            raise ValueError(f"unknown text_encoder_precision {self.text_encoder_precision!r}; choose fp32 or bf16 "
                             f"(fp16 is not offered: T5 v1.1's activations exceed fp16's range, 65504)")

    @property
    def frozen_text_encoder(self) -> bool:
        """True for a frozen pretrained text encoder (``t5``, ``clip``), False for GLIDE's ``transformer``."""
        return self.text_encoder in FROZEN_TEXT_ENCODERS

    @property
    def text_encoder_identity(self) -> str | None:
        """The frozen encoder's identity (``t5:google/t5-v1_1-base``, see ``encoder_identity``), which
        precomputed embeddings must carry; None for GLIDE's transformer."""
        if not self.frozen_text_encoder:
            return None
        return encoder_identity(self.text_encoder, str(self.text_encoder_name), pretrained=self.text_encoder_pretrained,
                                revision=self.text_encoder_revision)

    def _check_heads(self, mult: tuple[int, ...], sizes: list[int]) -> None:
        # The middle block (lowest resolution) always has attention.
        levels = {len(mult) - 1} | {i for i, s in enumerate(sizes) if s in self.attention_resolutions}
        chans = sorted({self.model_channels * mult[i] for i in levels})
        if self.num_head_channels != -1:
            _positive(num_head_channels=self.num_head_channels)
            bad = [c for c in chans if c % self.num_head_channels]
            if bad:
                raise ValueError(
                    f"num_head_channels {self.num_head_channels} does not divide the attention "
                    f"channel counts {bad} (attention blocks have {chans} channels)"
                )
            return
        heads = {"num_heads": self.num_heads}
        if self.num_heads_upsample != -1:
            heads["num_heads_upsample"] = self.num_heads_upsample
        _positive(**heads)
        for name, n in heads.items():
            bad = [c for c in chans if c % n]
            if bad:
                raise ValueError(f"{name} {n} does not divide the attention channel counts {bad}")

    @property
    def resolved_channel_mult(self) -> tuple[int, ...]:
        """``channel_mult``, or ADM's default for ``image_size`` when it is None."""
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        if self.image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {self.image_size} (defaults exist for "
                f"{', '.join(map(str, sorted(DEFAULT_CHANNEL_MULT)))}): set channel_mult explicitly"
            )
        return DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """``attention_resolutions`` as the UNet's downsample rates (``image_size // resolution``)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def out_channels(self) -> int:
        """6 (ε and the variance interpolation v) with ``learn_sigma``, else 3 (ε)."""
        return 2 * IMAGE_CHANNELS if self.learn_sigma else IMAGE_CHANNELS

    def to_dict(self) -> dict[str, object]:
        """The fields as a plain dict (lists and tuples as lists)."""
        d = asdict(self)
        d["channel_mult"] = None if self.channel_mult is None else list(self.channel_mult)
        return d


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_model(config: ModelConfig) -> Text2ImUNet:
    """Build the (randomly initialised) network described by ``config``.

    Wrap in ``with torch.device("meta"):`` to build without allocating weights. A frozen text encoder
    (``text_encoder`` t5 / clip) is not part of the network: attach it with ``attach_text_encoder``.

    Raises:
        ValueError: a frozen text encoder whose ``text_encoder_dim`` is still None.
    """
    cls = _MODEL_CLASSES[config.kind]
    if config.frozen_text_encoder and config.text_encoder_dim is None:
        raise ValueError("a frozen text encoder's width is unknown: set model.text_encoder_dim (GlideModule and "
                         "load_checkpoint fill it in from the loaded encoder)")
    upsampler = {"low_res_noise_cond": config.low_res_noise_cond} if config.kind.startswith("upsample") else {}
    return cls(
        **upsampler,
        text_encoder=config.text_encoder,
        text_encoder_dim=config.text_encoder_dim,
        text_ctx=config.text_ctx,
        xf_width=config.xf_width,
        xf_layers=config.xf_layers,
        xf_heads=config.xf_heads,
        xf_final_ln=config.xf_final_ln,
        xf_padding=config.xf_padding,
        n_vocab=config.n_vocab,
        in_channels=IMAGE_CHANNELS,
        model_channels=config.model_channels,
        out_channels=config.out_channels,
        num_res_blocks=config.num_res_blocks,
        attention_resolutions=config.attention_ds,
        dropout=config.dropout,
        channel_mult=config.resolved_channel_mult,
        num_heads=config.num_heads,
        num_head_channels=config.num_head_channels,
        num_heads_upsample=config.num_heads_upsample,
        use_scale_shift_norm=config.use_scale_shift_norm,
        resblock_updown=config.resblock_updown,
        norm_min_channels=config.groupnorm_min_channels,
    )


def load_frozen_text_encoder(config: ModelConfig) -> tuple[FrozenTextEncoder | None, ModelConfig]:
    """Load the frozen text encoder ``config`` names (``text_encoder_name``, ``_pretrained``, ``_revision``),
    computing in ``text_encoder_precision``, and return it with ``config`` whose ``text_encoder_dim`` is the
    encoder's; ``(None, config)`` for GLIDE's transformer. Attach the encoder to the built network with
    ``attach_text_encoder``.

    Raises:
        ValueError: ``text_encoder_dim`` is set and is not the encoder's width.
        ImportError, OSError: see :func:`~glide_lightning.models.encoders.load_text_encoder`.
    """
    if not config.frozen_text_encoder:
        return None, config
    encoder = load_text_encoder(config.text_encoder, str(config.text_encoder_name),
                                pretrained=config.text_encoder_pretrained, revision=config.text_encoder_revision,
                                precision=config.text_encoder_precision)
    if config.text_encoder_dim not in (None, encoder.dim):
        raise ValueError(f"model.model.text_encoder_dim is {config.text_encoder_dim} but {encoder.source} gives "
                         f"{encoder.dim}-wide embeddings: set it to {encoder.dim} or leave it out")
    return encoder, replace(config, text_encoder_dim=encoder.dim)


def build_with_text_encoder(config: ModelConfig) -> tuple[Text2ImUNet, ModelConfig]:
    """:func:`build_model` with the frozen text encoder ``config`` names loaded (:func:`load_frozen_text_encoder`)
    and attached (outside the module tree: neither trained nor in the state dict); returns the network and
    ``config`` with the encoder's ``text_encoder_dim``. GLIDE's transformer: ``(build_model(config), config)``.

    Raises:
        ValueError, ImportError, OSError: see :func:`load_frozen_text_encoder` and :func:`build_model`.
    """
    encoder, config = load_frozen_text_encoder(config)
    model = build_model(config)
    if encoder is not None:
        model.attach_text_encoder(encoder)
    return model, config
