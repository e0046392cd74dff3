"""Issue 25 through the front door (``python -m glide_lightning data <recipe>``, in-process): every recipe mistake is
one ``error: ...`` line (exit 2, no traceback), and images far below the model's size or captions over its
context are warned about, with the manifest recording at most a capped caption."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image
import pytest
from recipe_helpers import check_manifest, corrupt_file, data_cli, read_split, save_image

from data_recipes.common import MANIFEST_TEXT_CHARS, min_tokens


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The ``error: ...`` line the command printed, asserting it is the only thing on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def captioned(root, name: str, caption: str, size: tuple[int, int] = (40, 30)) -> None:
    save_image(root / f"{name}.png", size)
    (root / f"{name}.txt").write_text(caption)


@pytest.mark.parametrize("recipe, flag, hint", [
    ("folder", "--images", "--images directory"),
    ("mscoco", "--coco_dir", "--coco_dir"),
    ("stanford_dogs", "--dogs_dir", "--dogs_dir"),
    ("sbucaptions", "--sbu_dir", "--sbu_dir"),
])
def test_a_missing_source_folder_is_one_line(recipe, flag, hint, tmp_path, capsys):
    extra = ["--images_dir", tmp_path] if recipe == "sbucaptions" else []
    assert data_cli(recipe, flag, tmp_path / "nope", "--out", tmp_path / "o", *extra) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {hint} {tmp_path / 'nope'} does not exist"), err
    assert not (tmp_path / "o").exists()


def test_an_archive_given_for_a_folder_says_to_extract_it(tmp_path, capsys):
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w"):
        pass
    assert data_cli("stanford_dogs", "--dogs_dir", archive, "--out", tmp_path / "o") == 2
    err = one_error_line(capsys)
    assert "is an archive, not a directory: extract it first (tar -xf" in err


def test_unreadable_images_are_skipped_and_none_readable_is_one_line(tmp_path, capsys):
    root = tmp_path / "bad"
    corrupt_file(root / "x.jpg")
    (root / "x.txt").write_text("a caption")
    assert data_cli("folder", "--images", root, "--out", tmp_path / "o") == 2
    err = one_error_line(capsys)
    assert "no sample could be written (every input was skipped)" in err
    captioned(root, "y", "a readable one")
    assert data_cli("folder", "--images", root, "--out", tmp_path / "o2") == 0
    doc = check_manifest(tmp_path / "o2")
    assert doc["skipped"]["reasons"]["unreadable image"]["count"] == 1 and doc["total_samples"] == 1


def test_a_csv_that_is_not_text_is_one_line(tmp_path, capsys):
    (tmp_path / "c.csv").write_bytes(b"file,caption\n\xff\xfe\x00\x81bad,\x00\n")
    assert data_cli("folder", "--csv", tmp_path / "c.csv", "--out", tmp_path / "o") == 2
    assert "is not a readable UTF-8 CSV file" in one_error_line(capsys)


def test_a_damaged_shard_or_manifest_given_to_embed_is_one_line_before_any_encoder_loads(tmp_path, capsys):
    source = tmp_path / "shards"
    assert data_cli("synthetic", "--out", source, "--train", "3", "--val", "0", "--image_size", "16") == 0
    capsys.readouterr()
    embed = ["embed", "--shards", source, "--out", tmp_path / "e", "--text_encoder", "t5",
             "--text_encoder_name", "no/such-encoder", "--text_ctx", "16"]
    (source / "train-000000.tar").write_bytes(b"not a tar archive at all" * 40)
    assert data_cli(*embed) == 2
    assert "train-000000.tar is not a tar archive" in one_error_line(capsys)
    (source / "manifest.json").write_text("{broken")
    assert data_cli(*embed) == 2
    assert "manifest.json is not a recipe's manifest" in one_error_line(capsys)


def test_an_output_folder_holding_files_is_one_line_unless_overwrite(tmp_path, capsys):
    root = tmp_path / "imgs"
    captioned(root, "a", "a red square")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert data_cli("folder", "--images", root, "--out", out) == 2
    err = one_error_line(capsys)
    assert f"--out {out} already holds 1 file it does not write (notes.txt); pass --overwrite true" in err
    assert data_cli("folder", "--images", root, "--out", out, "--overwrite", "true") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_images_far_below_the_model_size_are_warned_about(tmp_path, caplog):
    root = tmp_path / "imgs"
    captioned(root, "tiny", "a tiny one", (12, 9))
    captioned(root, "small", "a small one", (20, 30))
    captioned(root, "fine", "a big enough one", (40, 33))
    with caplog.at_level("WARNING"):
        assert data_cli("folder", "--images", root, "--out", tmp_path / "o", "--image_size", "64") == 0
    (message,) = [r.getMessage() for r in caplog.records if "far smaller than the model" in r.getMessage()]
    assert message.startswith("2 of 3 images are far smaller than the model's 64 px (shorter side under 32 px, "
                              "the smallest 12x9 px)"), message
    checks = json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"]
    assert checks["images_under_half_image_size"] == 2 and checks["smallest_image"] == [12, 9]
    caplog.clear()
    with caplog.at_level("WARNING"):  # a model of the images' size: nothing to say
        assert data_cli("folder", "--images", root, "--out", tmp_path / "o2", "--image_size", "16") == 0
    assert not [r for r in caplog.records if "far smaller" in r.getMessage()]


def test_a_caption_far_over_the_context_is_warned_about_and_not_copied_into_the_manifest(tmp_path, caplog):
    root = tmp_path / "imgs"
    huge = "a very long caption " * 52_429  # ~1 MB, ~210k words
    assert len(huge) > 1_000_000
    captioned(root, "huge", huge)
    captioned(root, "long", " ".join(f"word{i}" for i in range(200)))  # 200 tokens at least: over 128
    captioned(root, "short", "a short caption")
    with caplog.at_level("WARNING"):
        assert data_cli("folder", "--images", root, "--out", tmp_path / "o") == 0
    (message,) = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert message.startswith("2 caption(s) are longer than the model's context of 128 tokens (the longest at "
                              "least 209716 tokens): training keeps their first 128 tokens"), message
    text = (tmp_path / "o" / "manifest.json").read_text()
    assert len(text) < 20_000 and huge[:2 * MANIFEST_TEXT_CHARS] not in text
    doc = json.loads(text)
    assert doc["checks"]["captions_over_text_ctx"] == 2 and doc["checks"]["text_ctx"] == 128
    examples = doc["splits"]["train"]["captions"]["examples"]
    assert any(e.endswith(f"[{len(huge.strip())} characters in all]") for e in examples)
    assert all(len(e) < MANIFEST_TEXT_CHARS + 50 for e in examples)
    # the shard keeps the caption whole (the tokenizer cuts it when training)
    assert huge.strip() in {s["txt"] for s in read_split(tmp_path / "o", "train")}
    caplog.clear()
    with caplog.at_level("WARNING"):  # a longer context: only the huge one is over it
        assert data_cli("folder", "--images", root, "--out", tmp_path / "o2", "--text_ctx", "256") == 0
    assert any(r.getMessage().startswith("1 caption(s) are longer than the model's context of 256 tokens")
               for r in caplog.records)


def test_min_tokens_is_a_lower_bound_of_the_bpe_tokens():
    from glide_lightning.data.tokenizers import CLIPTokenizer

    clip = CLIPTokenizer(77)
    for text in ["a photo of a dog", "it's 2024, isn't it?!", "snake_case and CamelCase", "ünïcödé wörds — ok",
                 "x" * 50, "1234567 numbers"]:
        assert min_tokens(text) <= len(clip.encode(text)), text
    assert min_tokens("a photo, of a dog.") == 7  # a photo , of a dog .


def test_an_image_that_cannot_be_read_as_one_is_counted_with_its_reason(tmp_path):
    """(Unreadable images never stop a run: counted by reason, with examples, in the manifest.)"""
    root = tmp_path / "imgs"
    captioned(root, "good", "fine")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (root / "half.png").write_bytes(buf.getvalue()[:30])
    (root / "half.txt").write_text("cut short")
    assert data_cli("folder", "--images", root, "--out", tmp_path / "o") == 0
    reasons = check_manifest(tmp_path / "o")["skipped"]["reasons"]
    assert reasons["unreadable image"]["count"] == 1 and "half.png" in reasons["unreadable image"]["examples"][0]
