from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """Real webdataset shards of the synthetic recipe at 32 px: 4 train shards of 50, 1 val of 32."""
    from glide_lightning.data.shards import write_shards
    from glide_lightning.data.synthetic import synthetic_samples

    out = tmp_path_factory.mktemp("synthetic")
    write_shards(synthetic_samples(0, 200, split="train", image_size=32), out, "train", max_per_shard=50,
                 image_format="png")
    write_shards(synthetic_samples(0, 32, split="val", image_size=32), out, "val", max_per_shard=50,
                 image_format="png")
    return out
