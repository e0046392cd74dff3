"""Fixtures for the data tests: the shared, read-only test data in ``../shared/fixtures``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

SHARED_FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    """``encoder.json.gz`` + ``vocab.bpe.gz`` of GPT-2 (skips where the shared folder is absent)."""
    path = SHARED_FIXTURES / "gpt2_bpe"
    if not (path / "encoder.json.gz").is_file() or not (path / "vocab.bpe.gz").is_file():
        pytest.skip(f"GPT-2 BPE fixture files not found in {path} (shared fixtures absent)")
    return path


@pytest.fixture(scope="session")
def glide_cases(gpt2_bpe_dir: Path) -> dict[str, Any]:
    """Texts with the tokens, padded ids and mask that glide-text2im's tokenizer gives them."""
    path = gpt2_bpe_dir / "glide_tokenizer_cases.json"
    if not path.is_file():
        pytest.skip(f"GLIDE tokenizer cases not found: {path} (shared fixtures absent)")
    return json.loads(path.read_text(encoding="utf-8"))
