"""The networks: the ADM UNet, GLIDE's text transformer, the frozen T5 / open_clip text encoders, the
text-conditional UNet and its super-resolution and inpainting variants, and glide-text2im checkpoint import."""

from glide_lightning.models.config import (
    DEFAULT_CHANNEL_MULT,
    MODEL_KINDS,
    ModelConfig,
    ModelKind,
    build_model,
    build_with_text_encoder,
    load_frozen_text_encoder,
)
from glide_lightning.models.encoders import FrozenTextEncoder, load_text_encoder
from glide_lightning.models.glide_text2im import (
    GLIDE_CHECKPOINT_FILES,
    GLIDE_KINDS,
    GLIDE_OPTIONS,
    CheckpointMismatchError,
    GlideKind,
    from_glide_text2im,
    glide_config,
)
from glide_lightning.models.nn import GroupNorm32, LayerNorm, timestep_embedding, zero_module
from glide_lightning.models.text import Transformer
from glide_lightning.models.text2im import (
    InpaintText2ImUNet,
    SuperResInpaintText2ImUNet,
    SuperResText2ImUNet,
    Text2ImUNet,
)
from glide_lightning.models.unet import AttentionBlock, ResBlock, UNetModel

__all__ = [
    "DEFAULT_CHANNEL_MULT",
    "GLIDE_CHECKPOINT_FILES",
    "GLIDE_KINDS",
    "GLIDE_OPTIONS",
    "MODEL_KINDS",
    "AttentionBlock",
    "CheckpointMismatchError",
    "FrozenTextEncoder",
    "GlideKind",
    "GroupNorm32",
    "InpaintText2ImUNet",
    "LayerNorm",
    "ModelConfig",
    "ModelKind",
    "ResBlock",
    "SuperResInpaintText2ImUNet",
    "SuperResText2ImUNet",
    "Text2ImUNet",
    "Transformer",
    "UNetModel",
    "build_model",
    "build_with_text_encoder",
    "from_glide_text2im",
    "glide_config",
    "load_frozen_text_encoder",
    "load_text_encoder",
    "timestep_embedding",
    "zero_module",
]
