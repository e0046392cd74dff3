"""The tiny model configuration the top-level tests share, in a module of its own: ``from conftest import``
resolves to whichever ``conftest`` pytest imported last (``tests/models/conftest.py`` has another ``TINY``)."""

from glide_lightning.models import ModelConfig

TINY = ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[16],
                   dropout=0.0, text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2)
