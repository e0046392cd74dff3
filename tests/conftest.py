import os
from pathlib import Path

import pytest
import torch

from glide_lightning.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs pytest-xdist workers, one per core:
        # one thread each (torch's default is one per core), and for the processes the tests start (the CLI's
        # fits and samples, whose images some tests compare with this process's own bit for bit)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _wandb_as_at_process_end():
    """After each test, wandb as a finished command leaves it: its run finished, its process-wide setup and service
    gone (and WANDB_SERVICE with them). Otherwise a later test of the same pytest-xdist worker takes over a run left
    open, inherits a setup made under another WANDB_MODE, or starts commands attached to this process's service."""
    yield
    import sys

    if "wandb" in sys.modules:
        wandb = sys.modules["wandb"]
        wandb.finish()
        wandb.teardown()


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


from tiny_model_config import TINY  # noqa: E402  (kept here for the tests that take it from conftest)


def tiny_module(seed: int = 0):
    """A tiny GlideModule whose output layers are not zero (a fresh ADM model outputs exactly 0)."""
    from glide_lightning.diffusion import DiffusionConfig
    from glide_lightning.module import GlideModule  # Lightning: imported by the tests that need it only

    torch.manual_seed(seed)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    for p in module.model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return module


@pytest.fixture(scope="session")
def make_tiny_module():
    """:func:`tiny_module`, for tests that build their own runs."""
    return tiny_module


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A glide_lightning checkpoint of the tiny model (saved by a real Trainer, no training, no EMA)."""
    import lightning as L

    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(tiny_module())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def glide_placeholder(tmp_path_factory):
    """``glide_placeholder(kind) -> Path``: a file with glide-text2im's released model's keys and shapes
    (``base.pt``, …) whose tensors are stride-0 views of one number (a few kB instead of 1.5 GB): the
    loading and forward paths of the real checkpoint, cheaply. Made once per kind and session."""
    from glide_lightning.models import GLIDE_CHECKPOINT_FILES, from_glide_text2im

    folder = tmp_path_factory.mktemp("glide_text2im")

    def make(kind: str) -> Path:
        path = folder / GLIDE_CHECKPOINT_FILES[kind]
        if not path.exists():
            with torch.device("meta"):
                shapes = {k: v.shape for k, v in from_glide_text2im(kind).state_dict().items()}
            value = torch.full((1,), 0.01)
            torch.save({k: value.expand(shape) if len(shape) else value[0].clone() for k, shape in shapes.items()},
                       path)
        return path

    return make


def captioned_folder(root: Path, size: int, n: int = 24) -> Path:
    """``n`` images of ``size`` x ``size`` px with sidecar captions (a coloured square on grey, the
    colour named in the caption): the input of the ``folder`` recipe. Returns ``root``."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        image = Image.new("RGB", (size, size), (128, 128, 128))
        offset = (i // len(colours)) % max(1, size // 2)
        image.paste(rgb, (offset, offset, offset + size // 2, offset + size // 2))
        image.save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"a {name} square")
    return root


@pytest.fixture(scope="session")
def folder_shards(tmp_path_factory):
    """``folder_shards(size) -> Path``: the ``folder`` recipe's shards (train and val, with its
    manifest) of :func:`captioned_folder` images of ``size`` px, made once per size and session."""
    from data_recipes.folder import build

    made: dict[int, Path] = {}

    def make(size: int) -> Path:
        if size not in made:
            base = tmp_path_factory.mktemp(f"folder{size}")
            made[size] = base / "shards"
            build(made[size], images=captioned_folder(base / "images", size), val_fraction=0.2, image_format="png")
        return made[size]

    return make


# ----------------------------------------------------------------------------- frozen text encoders
# Stand-ins for T5 v1.1 and an open_clip CLIP, same architectures randomly initialised (nothing downloads):
# built once per session, in the formats the real ones are loaded from.
def build_tiny_t5(out: Path, seed: int = 0) -> Path:
    """A tiny ``T5EncoderModel`` (T5 v1.1's gated-GELU, dropout 0.1) and a SentencePiece tokenizer trained here
    on synthetic captions, both written by ``save_pretrained`` into ``out``: what ``google/t5-v1_1-base`` is
    on the hub, at 2 layers of width 32."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from glide_lightning.data.synthetic import synthetic_samples

    captions = [s.caption for s in synthetic_samples(seed, 300, split="train", image_size=16)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=model, vocab_size=64,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    spiece = out / "spiece"
    spiece.mkdir(parents=True, exist_ok=True)
    (spiece / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(str(spiece), extra_ids=0)  # wraps the .model file
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.1)
    encoder = T5EncoderModel(config)
    encoder.save_pretrained(out / "t5")
    tokenizer.save_pretrained(out / "t5")
    return out / "t5"


TINY_CLIP_CFG = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A tiny open_clip CLIP in open_clip's ``local-dir:`` format (``open_clip_config.json`` and
    ``open_clip_pytorch_model.bin``), randomly initialised."""
    import json

    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.CLIP(**TINY_CLIP_CFG)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    torch.save(clip.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A directory a ``t5`` text encoder loads from (model and tokenizer), see :func:`build_tiny_t5`."""
    pytest.importorskip("transformers", reason="the t5 encoder needs the 'text' extra")
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    """``local-dir:PATH`` of a tiny open_clip CLIP, see :func:`build_tiny_clip`."""
    return f"local-dir:{build_tiny_clip(tmp_path_factory.mktemp('tiny_clip'))}"
