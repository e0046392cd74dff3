"""Data: caption tokenizers, the webdataset LightningDataModule, shard writing and the synthetic dataset."""

from glide_lightning.data.datamodule import GlideDataModule, expand_shards, measure_pipeline
from glide_lightning.data.pipeline import ImageTextStream, ResizeMode
from glide_lightning.data.shards import (
    Manifest,
    Sample,
    SplitManifest,
    encode_image,
    load_manifest,
    verify_manifest,
    write_manifest,
    write_shards,
)
from glide_lightning.data.tokenizers import (
    TOKENIZERS,
    CLIPTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    TokenizerName,
    TokenizerSpec,
    build_tokenizer,
)

__all__ = [
    "Manifest", "Sample", "SplitManifest", "encode_image", "load_manifest", "verify_manifest", "write_manifest",
    "write_shards",
    "TOKENIZERS", "CLIPTokenizer", "GPT2Tokenizer", "GlideDataModule", "ImageTextStream", "ResizeMode", "Tokenizer",
    "TokenizerName", "TokenizerSpec", "build_tokenizer", "expand_shards", "measure_pipeline",
]
