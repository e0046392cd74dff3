"""Data: caption tokenizers (and the webdataset LightningDataModule)."""

from glide_lightning.data.tokenizers import (
    TOKENIZERS,
    CLIPTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    TokenizerName,
    build_tokenizer,
)

__all__ = ["TOKENIZERS", "CLIPTokenizer", "GPT2Tokenizer", "Tokenizer", "TokenizerName", "build_tokenizer"]
