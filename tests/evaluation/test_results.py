"""results.json: one typed record per guidance scale, written and read by one pair of functions;
files written before the record existed read the same."""

import json
from dataclasses import replace

import pytest

from glide_lightning.evaluation.clip_score import CLIPScoreResult
from glide_lightning.evaluation.fid import FIDResult
from glide_lightning.evaluation.results import RESULTS_FORMAT, ScaleResult, read_results, write_results

# a results.json as the FID harness wrote it before ScaleResult (nested dicts, no "format" key)
OLD_RESULTS_JSON = """{
 "results": [
  {
   "guidance_scale": 3.0, "n": 6, "resolution": 32, "sampler": "ddpm", "steps": "2",
   "checkpoint": "runs/tiny_hybrid/checkpoints/last.ckpt (EMA weights, step 4)", "reference": "reference",
   "fid": {"fid": 187.25, "n_generated": 6, "n_reference": 6, "resolution": 32,
           "extractor_name": "random-conv-seed0", "weights_id": "random-conv-seed0", "random_weights": true,
           "standard_extractor": false, "method": "torch-fidelity statistics; torch-fidelity distance",
           "label": "NOT a real FID (random feature extractor): 187.2500 (6 generated vs 6 reference images)"},
   "clip_score": {"mean": 21.5, "n": 6, "model_name": "ViT-B-32", "pretrained": null, "random_weights": true,
                  "label": "CLIP score with random weights"},
   "adherence": 0.25
  },
  {
   "guidance_scale": 1.0, "n": 6, "resolution": 32, "sampler": "ddpm", "steps": "2",
   "checkpoint": "runs/tiny_hybrid/checkpoints/last.ckpt (EMA weights, step 4)", "reference": "reference",
   "fid": {"fid": 201.5, "n_generated": 6, "n_reference": 6, "resolution": 32,
           "extractor_name": "random-conv-seed0", "weights_id": "random-conv-seed0", "random_weights": true,
           "standard_extractor": false, "method": "torch-fidelity statistics; torch-fidelity distance",
           "label": "NOT a real FID (random feature extractor): 201.5000 (6 generated vs 6 reference images)"},
   "clip_score": null,
   "adherence": null
  }
 ],
 "sampling": {"guidance_scale": 3.0, "sampler": "ddpm", "steps": "2", "eta": 0.0, "batch_size": 16,
              "upsample_steps": "fast27", "upsample_temp": 0.997}
}"""


def test_a_results_file_written_before_the_record_existed_reads(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(OLD_RESULTS_JSON)
    first, second = read_results(path)
    assert first.guidance_scale == 3.0 and first.n == 6 and first.resolution == 32 and first.steps == "2"
    assert isinstance(first.fid, FIDResult) and first.fid.fid == 187.25 and first.fid.random_weights
    assert isinstance(first.clip_score, CLIPScoreResult) and first.clip_score.mean == 21.5
    assert first.adherence == 0.25 and "EMA weights" in first.checkpoint
    assert second.clip_score is None and second.adherence is None
    assert second.summary_line().startswith("guidance 1: FID 201.50  [NOT a real FID")
    assert first.summary_line().startswith("guidance 3: FID 187.25, CLIP score 21.50 (random CLIP weights), "
                                           "adherence 0.250  [NOT a real FID")
    # written again, it is the same records, now with the format named
    write_results(tmp_path / "again.json", [first, second], json.loads(OLD_RESULTS_JSON)["sampling"])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["format"] == RESULTS_FORMAT and read_results(tmp_path / "again.json") == [first, second]
    old = json.loads(OLD_RESULTS_JSON)
    assert again["results"] == old["results"] and again["sampling"] == old["sampling"]


def test_unreadable_results_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="FID results not found"):
        read_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    record = json.loads(OLD_RESULTS_JSON)["results"][0]
    del record["fid"]["label"]
    bad.write_text(json.dumps({"results": [record]}))
    with pytest.raises(ValueError, match="result 0 lacks a field: fid lacks label"):
        read_results(bad)
    bad.write_text(json.dumps({"format": "glide_lightning.fid_results/9", "results": []}))
    with pytest.raises(ValueError, match="has format 'glide_lightning.fid_results/9'"):
        read_results(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_results(bad)


def test_scale_result_round_trips_through_its_dict():
    fid = FIDResult(fid=1.5, n_generated=2, n_reference=3, resolution=64, extractor_name="inception-v3-compat",
                    weights_id="abc", random_weights=False, standard_extractor=True, method="m", label="FID 1.5")
    result = ScaleResult(guidance_scale=6.0, n=2, resolution=64, sampler="ddim", steps="ddim50", checkpoint="base.pt",
                         fid=fid)
    assert ScaleResult.from_dict(result.to_dict()) == result
    assert ScaleResult.from_dict({**result.to_dict(), "added_later": 1}) == result  # unknown keys are ignored


def test_a_cascade_result_says_which_upsampler_steps_and_temperature_made_it(tmp_path):
    old = read_results_text(OLD_RESULTS_JSON, tmp_path)[0]
    assert old.upsampler is None and "upsampler" not in old.to_dict() and old.upsampled() == ""
    cascade = ScaleResult.from_dict({**old.to_dict(), "upsampler": "runs/minig_upsample/checkpoints/last.ckpt (EMA)",
                                     "upsample_steps": "fast27", "upsample_temp": 0.997})
    written = write_results(tmp_path / "cascade.json", [cascade], {})
    again = read_results(written)[0]
    assert again == cascade and again.to_dict()["upsample_steps"] == "fast27"
    assert again.summary_line().endswith(
        "upsampled by runs/minig_upsample/checkpoints/last.ckpt (EMA), fast27 steps, temperature 0.997")


def read_results_text(text: str, tmp_path) -> list[ScaleResult]:
    path = tmp_path / "old.json"
    path.write_text(text)
    return read_results(path)


def test_kid_precision_recall_and_fd_dinov2_round_trip_and_older_records_lack_them(tmp_path):
    from glide_lightning.evaluation.kid_prc import KIDResult, PrecisionRecallResult

    old = read_results_text(OLD_RESULTS_JSON, tmp_path)[0]
    assert old.kid is None and old.precision_recall is None and old.precision is None and old.recall is None
    assert old.fd_dinov2 is None and old.fd_dinov2_reason is None
    assert not {"kid", "precision_recall", "fd_dinov2", "fd_dinov2_reason"} & set(old.to_dict())
    common = dict(n_generated=6, n_reference=6, extractor_name="random-conv-seed0", weights_id="w",
                  random_weights=True, method="m")
    kid = KIDResult(mean=0.012, std=0.001, subset_size=6, subsets=100, label="NOT a real KID", **common)
    prc = PrecisionRecallResult(precision=0.5, recall=0.25, neighborhood=3, label="NOT a real precision/recall",
                                **common)
    new = ScaleResult.from_dict({**old.to_dict(), "kid": kid.to_dict(), "precision_recall": prc.to_dict(),
                                 "fd_dinov2": None, "fd_dinov2_reason": "not computed: no DINOv2 weights given"})
    written = json.loads(write_results(tmp_path / "new.json", [new], {}).read_text())["results"][0]
    assert written["kid"]["mean"] == 0.012 and written["precision_recall"]["recall"] == 0.25
    assert written["fd_dinov2"] is None and written["fd_dinov2_reason"].startswith("not computed")
    again = read_results(tmp_path / "new.json")[0]
    assert again == new and (again.precision, again.recall) == (0.5, 0.25)
    assert "KID 0.0120 ± 0.0010, precision 0.500, recall 0.250" in again.summary_line()
    dino = replace(old.fid, fid=3.5, extractor_name="dinov2-d32-l2-p14-224px-cls", label="NOT a real FD_DINOv2")
    with_dino = replace(new, fd_dinov2=dino, fd_dinov2_reason=None)
    record = with_dino.to_dict()
    assert record["fd_dinov2"]["fid"] == 3.5 and "fd_dinov2_reason" not in record
    assert ScaleResult.from_dict(record) == with_dino
    assert "FD_DINOv2 3.50 (random DINOv2 weights)" in with_dino.summary_line()
    broken = {**record, "kid": {k: v for k, v in kid.to_dict().items() if k != "std"}}
    with pytest.raises(KeyError, match="kid lacks std"):
        ScaleResult.from_dict(broken)
