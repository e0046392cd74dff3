"""glide_lightning.migrations: each older checkpoint form, made from a real checkpoint of the current form (a tiny
``upsample_inpaint`` run trained 2 steps by a real Trainer, with Lightning's EMA) by undoing what the migration
converts, is read through the real readers (``load_checkpoint``, a Lightning resume) as the current form."""

from __future__ import annotations

import copy
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from glide_lightning.data import TokenizerSpec, build_tokenizer
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.migrations import (
    HYPER_PARAMETERS_ADDED_LATER,
    add_missing_hyper_parameters,
    convert_input_order,
    nest_tokenizer_spec,
    regroup_optimizer_state,
    spell_weighting,
)
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.optim import OptimizerConfig, build_optimizer, parameter_groups
from glide_lightning.sampling import SamplingConfig, SamplingModel, load_checkpoint, sample_conditioned

from tiny_model_config import TINY

GPT2_BPE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gpt2_bpe"
FIRST_CONV = "model.input_blocks.0.0.weight"
KIND = "upsample_inpaint"


def _migration_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "glide_lightning.migrations"]


def _equal_state(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in got.items())


@pytest.fixture(scope="module")
def run(synthetic_shards, tmp_path_factory):
    """A real ``Trainer.fit`` (2 steps, Lightning's EMA) of a tiny upsample_inpaint model and its last checkpoint,
    in the current form; ``trainer``, ``module`` and ``datamodule`` make more of the same for resumes."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from glide_lightning.data import GlideDataModule
    from glide_lightning.module import GlideModule

    def module():
        torch.manual_seed(0)
        made = GlideModule(model=ModelConfig(**{**TINY.to_dict(), "kind": KIND}), diffusion=DiffusionConfig(steps=20),
                           optimizer=OptimizerConfig(weight_decay=0.01))
        for p in made.model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
        return made

    folder = tmp_path_factory.mktemp("migrations")

    def trainer(max_steps, *callbacks):  # default_root_dir: Lightning's own checkpoints go here, not into the cwd
        return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(folder / "lightning"),
                         callbacks=[EMAWeightAveraging(decay=0.5), *callbacks])

    def datamodule():
        return GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32,
                               tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4, num_workers=0, model_kind=KIND,
                               low_res_size=16)

    trainer(2, ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=0)).fit(
        module(), datamodule=datamodule())
    new = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    return dict(folder=folder, new_path=folder / "last.ckpt", new=new, module=module, trainer=trainer,
                datamodule=datamodule)


def _resume(run, path: Path, tmp_path: Path, monkeypatch) -> dict:
    """Resume ``path`` for one more step with a probe; what the run holds when training starts (after Lightning
    restored everything)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    from glide_test_probes import StateProbe

    run["trainer"](3, StateProbe(str(tmp_path))).fit(run["module"](), datamodule=run["datamodule"](), ckpt_path=path)
    return torch.load(tmp_path / "start_2.pt", map_location="cpu", weights_only=False)


def _assert_resumed_as_the_new_form(probe: dict, new: dict) -> None:
    assert _equal_state(probe["model"], new["current_model_state"])  # the raw weights
    assert _equal_state(probe["ema"], new["state_dict"])  # the EMA weights
    restored, saved = probe["optimizer"], new["optimizer_states"][0]
    assert [(g["name"], g["weight_decay"], g["params"]) for g in restored["param_groups"]] == \
        [(g["name"], g["weight_decay"], g["params"]) for g in saved["param_groups"]]
    assert restored["state"].keys() == saved["state"].keys()
    for i, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(restored["state"][i][name], value), (i, name)


# ----------------------------------------------------------------------------- hyper-parameters added later
def _without_later_hyper_parameters(checkpoint: dict) -> dict:
    """The checkpoint as written before the fields of HYPER_PARAMETERS_ADDED_LATER existed: without them."""
    old = copy.copy(checkpoint)
    old["hyper_parameters"] = {k: dict(v) if isinstance(v, dict) else v
                               for k, v in checkpoint["hyper_parameters"].items()}
    for section, names in HYPER_PARAMETERS_ADDED_LATER.items():
        for name in names:
            del old["hyper_parameters"][section][name]
    return old


def test_the_fields_added_later_are_fields_of_the_configs():
    for section, config in (("model", ModelConfig), ("diffusion", DiffusionConfig)):
        assert set(HYPER_PARAMETERS_ADDED_LATER[section]) <= {f.name for f in fields(config)}


def test_a_checkpoint_without_the_hyper_parameters_added_later_loads_as_the_current_form(run, tmp_path, caplog):
    torch.save(_without_later_hyper_parameters(run["new"]), tmp_path / "old.ckpt")
    with caplog.at_level("INFO", logger="glide_lightning.migrations"):
        old = load_checkpoint(tmp_path / "old.ckpt")
    [message] = _migration_warnings(caplog)
    assert "model.text_encoder_precision='fp32'" in message and "diffusion.prediction='eps'" in message
    new = load_checkpoint(run["new_path"])
    assert old.model_config == new.model_config and old.diffusion_config == new.diffusion_config
    assert old.model_config.to_dict() == run["new"]["hyper_parameters"]["model"]
    assert _equal_state(old.model.state_dict(), new.model.state_dict())
    caplog.clear()
    with caplog.at_level("INFO", logger="glide_lightning.migrations"):
        load_checkpoint(run["new_path"])
    assert _migration_warnings(caplog) == []  # the current form: nothing added


def test_hyper_parameters_present_are_kept():
    checkpoint = {"hyper_parameters": {"model": {"groupnorm_min_channels": 4}, "diffusion": {"prediction": "v"}}}
    added = add_missing_hyper_parameters(checkpoint, where="x.ckpt")
    assert checkpoint["hyper_parameters"]["model"]["groupnorm_min_channels"] == 4
    assert checkpoint["hyper_parameters"]["diffusion"]["prediction"] == "v"
    assert "model.groupnorm_min_channels" not in added and "model.low_res_noise_cond" in added


# ----------------------------------------------------------------------------- the weighting as a field
def _old_loss_spelling(checkpoint: dict, **diffusion) -> dict:
    """The checkpoint as written before ``weighting`` existed: no such field, the weighting spelled by ``diffusion``
    (``loss_type="p2"``, or ``min_snr_gamma``)."""
    old = copy.copy(checkpoint)
    old["hyper_parameters"] = {k: dict(v) if isinstance(v, dict) else v
                               for k, v in checkpoint["hyper_parameters"].items()}
    del old["hyper_parameters"]["diffusion"]["weighting"]
    old["hyper_parameters"]["diffusion"].update(diffusion)
    return old


@pytest.mark.parametrize("old,current", [
    (dict(loss_type="p2"), dict(loss_type="hybrid", weighting="p2")),  # the run's variance is learned: p2 added vb
    (dict(min_snr_gamma=5.0), dict(loss_type="hybrid", weighting="min_snr", min_snr_gamma=5.0)),
    ({}, dict(loss_type="hybrid", weighting="none")),
])
def test_a_checkpoint_with_the_old_weighting_spelling_loads_as_the_current_form(run, tmp_path, caplog, old, current):
    torch.save(_old_loss_spelling(run["new"], **old), tmp_path / "old.ckpt")
    with caplog.at_level("INFO", logger="glide_lightning.migrations"):
        loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.diffusion_config == DiffusionConfig(steps=20, **current)
    [message] = _migration_warnings(caplog)
    assert "before the weighting field" in message and f"weighting={current['weighting']!r}" in message
    # the oldest hyper-parameters too: also without the fields added later (min_snr_gamma, prediction)
    torch.save(_without_later_hyper_parameters(_old_loss_spelling(run["new"], loss_type="p2")), tmp_path / "o.ckpt")
    assert load_checkpoint(tmp_path / "o.ckpt").diffusion_config == DiffusionConfig(steps=20, weighting="p2")


def test_spelling_the_weighting_changes_old_forms_only():
    p2 = {"hyper_parameters": {"diffusion": {"loss_type": "p2", "variance_type": "fixed_small", "min_snr_gamma": None}}}
    assert spell_weighting(p2, where="x.ckpt") == ["diffusion.loss_type", "diffusion.weighting"]
    assert p2["hyper_parameters"]["diffusion"] == {"loss_type": "simple", "variance_type": "fixed_small",
                                                   "min_snr_gamma": None, "weighting": "p2"}
    assert spell_weighting(p2, where="x.ckpt") == []  # now the current form
    current = {"hyper_parameters": {"diffusion": asdict(DiffusionConfig(min_snr_gamma=5.0))}}
    assert spell_weighting(current, where="x.ckpt") == [] and current["hyper_parameters"]["diffusion"]["weighting"] == \
        "min_snr"
    assert spell_weighting({"state_dict": {}}, where="x.pt") == []  # no hyper-parameters: not a GlideModule's


def test_resuming_an_old_spelling_run_with_the_same_settings_is_no_drift(tmp_path):
    """``check_resume`` compares the checkpoint's settings in the current form: a run trained with ``loss_type:
    p2`` (written before ``weighting``, ``prediction`` and ``min_snr_gamma`` existed) resumed by this code, from its
    own YAML, is the same run; changing its weighting is still refused."""
    from glide_lightning.runs import ConfigDriftError, RunConfig, check_resume

    resumed = DiffusionConfig(steps=100, variance_type="fixed_small", loss_type="p2", p2_gamma=0.5)
    written = {k: v for k, v in asdict(resumed).items() if k not in ("weighting", "prediction", "min_snr_gamma")}
    written["loss_type"] = "p2"
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir()
    model = {"model_channels": 32}
    torch.save({"global_step": 7, "hyper_parameters": {"model": model, "diffusion": written},
                "datamodule_hyper_parameters": {"batch_size": 4}}, run.dir / "last.ckpt")
    assert resumed.loss_type == "simple"  # what the module records: the current spelling
    hparams = {"model": model, "diffusion": asdict(resumed)}
    assert check_resume(run, run.dir / "last.ckpt", hparams, {"batch_size": 4}, {}) == []
    other = {"model": model, "diffusion": asdict(DiffusionConfig(steps=100, variance_type="fixed_small",
                                                                 loss_type="simple", p2_gamma=0.5))}
    with pytest.raises(ConfigDriftError, match="model.diffusion.weighting: 'p2' → 'none'"):
        check_resume(run, run.dir / "last.ckpt", other, {"batch_size": 4}, {})


# ----------------------------------------------------------------------------- the data module's tokenizer as one value
def _with_flat_tokenizer(checkpoint: dict) -> dict:
    """The checkpoint as written while the data module took its tokenizer as five fields (each linked from the
    model's config): ``tokenizer`` the name, ``text_ctx``, ``bpe_dir``, ``tokenizer_path``, ``tokenizer_revision``."""
    old = copy.copy(checkpoint)
    data = dict(checkpoint["datamodule_hyper_parameters"])
    spec = data.pop("tokenizer_spec")
    old["datamodule_hyper_parameters"] = {**data, "tokenizer": spec["name"], "text_ctx": spec["text_ctx"],
                                          "bpe_dir": spec["bpe_dir"], "tokenizer_path": spec["path"],
                                          "tokenizer_revision": spec["revision"]}
    return old


def test_a_checkpoint_with_the_tokenizer_as_data_fields_resumes_as_the_current_form_with_no_drift(
        run, tmp_path, caplog, monkeypatch):
    """The data module's five tokenizer fields are read as its one TokenizerSpec: the resume check sees the same
    settings (a changed context is still refused), and Lightning resumes the run."""
    from glide_lightning.runs import ConfigDriftError, RunConfig, check_resume

    assert run["new"]["datamodule_hyper_parameters"]["tokenizer_spec"] == TokenizerSpec("clip", 16).to_dict()
    old = _with_flat_tokenizer(run["new"])
    converted = copy.deepcopy(old)
    with caplog.at_level("INFO", logger="glide_lightning.migrations"):
        assert nest_tokenizer_spec(converted, where="old.ckpt") == [
            "data.tokenizer", "data.text_ctx", "data.bpe_dir", "data.tokenizer_path", "data.tokenizer_revision"]
    assert "one tokenizer spec" in _migration_warnings(caplog)[0]
    assert converted["datamodule_hyper_parameters"] == run["new"]["datamodule_hyper_parameters"]
    assert nest_tokenizer_spec(converted, where="new.ckpt") == []  # the current form is left as it is
    torch.save(old, tmp_path / "old.ckpt")
    resumed = RunConfig(name="r", root=str(tmp_path / "runs"))
    resumed.dir.mkdir(parents=True)
    module, datamodule = run["module"](), run["datamodule"]()
    assert check_resume(resumed, tmp_path / "old.ckpt", module.hparams, datamodule.hparams, {}) == []
    other = {**datamodule.hparams, "tokenizer_spec": TokenizerSpec("clip", 24).to_dict()}
    with pytest.raises(ConfigDriftError, match="data.tokenizer_spec.text_ctx: 16 → 24"):
        check_resume(resumed, tmp_path / "old.ckpt", module.hparams, other, {})
    _assert_resumed_as_the_new_form(_resume(run, tmp_path / "old.ckpt", tmp_path, monkeypatch), run["new"])


# ----------------------------------------------------------------------------- one AdamW parameter group
def _one_group(checkpoint: dict, model: torch.nn.Module, weight_decay: float) -> dict:
    """The checkpoint as written before the optimizer's decay / no-decay groups: each AdamW state with every
    parameter in one group, indexed in ``model.parameters()`` order (moments and step counts as they are)."""
    grouped = [p for group in parameter_groups(model, weight_decay) for p in group["params"]]
    position = {id(p): i for i, p in enumerate(model.parameters())}
    old = copy.copy(checkpoint)
    old["optimizer_states"] = []
    for state in checkpoint["optimizer_states"]:
        group = {k: v for k, v in state["param_groups"][0].items() if k not in ("name", "params")}
        old["optimizer_states"].append({
            "state": {position[id(grouped[i])]: moments for i, moments in state["state"].items()},
            "param_groups": [{**group, "weight_decay": weight_decay, "params": list(range(len(grouped)))}]})
    return old


def test_a_one_group_optimizer_state_resumes_as_the_current_groups(run, tmp_path, caplog, monkeypatch):
    module = run["module"]()
    torch.save(_one_group(run["new"], module.model, 0.01), tmp_path / "old.ckpt")
    with caplog.at_level("WARNING"):
        probe = _resume(run, tmp_path / "old.ckpt", tmp_path, monkeypatch)
    assert any("one parameter group" in m for m in _migration_warnings(caplog))
    _assert_resumed_as_the_new_form(probe, run["new"])


def test_regrouping_keeps_the_moments_and_leaves_grouped_states_alone():
    """Unit level: the moments land on the same parameters, in an order torch accepts."""
    torch.manual_seed(0)
    model, config = build_model(TINY), OptimizerConfig(weight_decay=0.01)
    optimizer = build_optimizer(model, config)["optimizer"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    grouped = optimizer.state_dict()
    by_param = {id(p): grouped["state"][i] for i, p in
                enumerate(p for group in optimizer.param_groups for p in group["params"])}
    params = list(model.parameters())
    one_group = {"state": {i: by_param[id(p)] for i, p in enumerate(params)},
                 "param_groups": [{**grouped["param_groups"][0], "params": list(range(len(params)))}]}
    regrouped = regroup_optimizer_state(one_group, model, config)
    assert [g["params"] for g in regrouped["param_groups"]] == [g["params"] for g in grouped["param_groups"]]
    assert [g["weight_decay"] for g in regrouped["param_groups"]] == [0.01, 0.0]
    for index, state in grouped["state"].items():
        torch.testing.assert_close(regrouped["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=0)
    optimizer.load_state_dict(regrouped)  # accepted by torch: the shapes match parameter for parameter
    assert regroup_optimizer_state(grouped, model, config) is grouped  # already grouped: unchanged


# ----------------------------------------------------------------------------- the network's input order
NEW_TO_OLD = [0, 1, 2, 7, 8, 9, 3, 4, 5, 6]
"""The first convolution's input columns in this project's earlier upsample_inpaint order, [x | upsampled |
image·mask | mask], as indices into glide-text2im's [x | image·mask | mask | upsampled] (written out here, not taken
from the code)."""


def _to_old_order(checkpoint: dict) -> dict:
    """The checkpoint as written before the network's input order was recorded: the earlier column order everywhere
    the first convolution's weight lives (weights, raw weights, AdamW moments), and no ``input_order`` marker."""
    old = {k: v for k, v in checkpoint.items() if k != "input_order"}
    old["state_dict"] = {**checkpoint["state_dict"], FIRST_CONV: checkpoint["state_dict"][FIRST_CONV][:, NEW_TO_OLD]}
    raw = checkpoint["current_model_state"]
    old["current_model_state"] = {**raw, FIRST_CONV: raw[FIRST_CONV][:, NEW_TO_OLD]}
    shape = raw[FIRST_CONV].shape
    old["optimizer_states"] = []
    for state in checkpoint["optimizer_states"]:
        moments = {i: {k: v[:, NEW_TO_OLD] if isinstance(v, torch.Tensor) and v.shape == shape else v
                       for k, v in m.items()} for i, m in state["state"].items()}
        old["optimizer_states"].append({**state, "state": moments})
    return old


def _images_and_mask(count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit-exact pictures in [-1, 1] and a keep-mask erasing a centre square."""
    images = torch.randint(0, 256, (count, 3, 32, 32)).float() / 127.5 - 1
    keep = torch.ones(count, 1, 32, 32)
    keep[:, :, 8:20, 10:24] = 0
    return images, keep


def test_an_old_order_upsample_inpaint_checkpoint_samples_as_the_new_order_model(run, tmp_path, caplog):
    assert run["new"]["input_order"] == ["x", "inpaint_image*inpaint_mask", "inpaint_mask", "upsampled"]  # the marker
    old_path = tmp_path / "old.ckpt"
    torch.save(_to_old_order(run["new"]), old_path)
    torch.manual_seed(3)
    x, t, low_res = torch.randn(2, 3, 32, 32), torch.tensor([3, 15]), torch.rand(2, 3, 16, 16) * 2 - 1
    image, keep = _images_and_mask(2)
    with caplog.at_level("WARNING"):
        for weights, saved in (("ema", "state_dict"), ("raw", "current_model_state")):
            caplog.clear()
            new = load_checkpoint(run["new_path"], weights=weights)
            assert _migration_warnings(caplog) == []  # a marked checkpoint is read as it is
            old = load_checkpoint(old_path, weights=weights)
            [warning] = _migration_warnings(caplog)
            assert "no input_order recorded" in warning and "input_blocks.0.0.weight" in warning
            assert "state_dict, current_model_state" in warning
            expected = {k.removeprefix("model."): v for k, v in run["new"][saved].items() if k.startswith("model.")}
            assert _equal_state(old.model.state_dict(), expected)
            tokens, mask = new.tokenizer(["a red circle", "a blue square"])
            kwargs = dict(low_res=low_res, inpaint_image=image, inpaint_mask=keep, tokens=tokens, mask=mask)
            with torch.no_grad():
                reference = new.model(x, t, **kwargs)
                assert torch.equal(old.model(x, t, **kwargs), reference)
                # the same file read without the conversion: another model
                unconverted = load_checkpoint(run["new_path"], weights=weights).model
                old_weight = expected["input_blocks.0.0.weight"][:, NEW_TO_OLD]
                unconverted.get_parameter("input_blocks.0.0.weight").copy_(old_weight)
                relative = float((unconverted(x, t, **kwargs) - reference).norm() / reference.norm())
            assert relative > 0.01
    config = SamplingConfig(steps="2", guidance_scale=3.0)
    samples = [sample_conditioned(load_checkpoint(p), ["a red circle"], [0], config, low_res=low_res[:1],
                                  image=image[:1], keep=keep[:1]) for p in (run["new_path"], old_path)]
    assert torch.equal(*samples)


def test_resuming_an_old_order_upsample_inpaint_checkpoint_restores_converted_weights_ema_and_adamw_moments(
        run, tmp_path, caplog, monkeypatch):
    torch.save(_to_old_order(run["new"]), tmp_path / "old.ckpt")
    with caplog.at_level("WARNING"):
        probe = _resume(run, tmp_path / "old.ckpt", tmp_path, monkeypatch)
    [warning] = _migration_warnings(caplog)
    assert "state_dict, current_model_state, optimizer_states[0] (exp_avg, exp_avg_sq)" in warning
    _assert_resumed_as_the_new_form(probe, run["new"])
    saved = run["new"]["optimizer_states"][0]["state"]
    shape = run["new"]["state_dict"][FIRST_CONV].shape
    assert sum(m["exp_avg"].shape == shape for m in saved.values()) == 1  # the first convolution's, converted above


def test_the_oldest_form_resumes_and_loads_as_the_current_form(run, tmp_path, caplog, monkeypatch):
    """Every migration at once: earlier input order, one AdamW group (its moments in that order too) and no
    hyper-parameters added later: the regrouping comes first, so the input order finds the moments it converts."""
    model = run["module"]().model
    oldest = _with_flat_tokenizer(_without_later_hyper_parameters(_one_group(_to_old_order(run["new"]), model, 0.01)))
    torch.save(oldest, tmp_path / "oldest.ckpt")
    with caplog.at_level("WARNING"):
        probe = _resume(run, tmp_path / "oldest.ckpt", tmp_path, monkeypatch)
    assert "optimizer_states[0] (exp_avg, exp_avg_sq)" in _migration_warnings(caplog)[-1]
    _assert_resumed_as_the_new_form(probe, run["new"])
    loaded = load_checkpoint(tmp_path / "oldest.ckpt")
    expected = {k.removeprefix("model."): v for k, v in run["new"]["state_dict"].items() if k.startswith("model.")}
    assert _equal_state(loaded.model.state_dict(), expected)
    assert loaded.model_config == load_checkpoint(run["new_path"]).model_config


def _tiny(kind: str) -> SamplingModel:
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY.to_dict(), "kind": kind})
    return SamplingModel(build_model(config).eval(), DiffusionConfig(steps=20), build_tokenizer("clip", TINY.text_ctx),
                         config, "tiny")


def test_a_released_upsample_inpaint_file_loads_unchanged_and_unsound_conversions_are_refused(glide_placeholder,
                                                                                               tmp_path, caplog,
                                                                                               monkeypatch):
    if not GPT2_BPE.is_dir():
        pytest.skip(f"GPT-2 BPE fixture not found at {GPT2_BPE}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(GPT2_BPE))
    state = torch.load(glide_placeholder("upsample-inpaint"), map_location="cpu", weights_only=True)
    state["input_blocks.0.0.weight"] = torch.randn(192, 10, 3, 3)  # distinct columns: a permutation would show
    torch.save(state, tmp_path / "upsample_inpaint.pt")
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(tmp_path / "upsample_inpaint.pt", kind=KIND)
    assert torch.equal(loaded.model.get_parameter("input_blocks.0.0.weight"), state["input_blocks.0.0.weight"])
    assert _migration_warnings(caplog) == []
    model = _tiny(KIND).model
    weight = {FIRST_CONV: torch.zeros(32, 10, 3, 3)}
    with pytest.raises(ValueError, match="is not a reordering of this model's"):
        convert_input_order({"input_order": ["x", "low_res", "mask"], "state_dict": weight}, model, KIND,
                            where="bad.ckpt")
    with pytest.raises(ValueError, match=r"should be a \[out, 10, k, k\] convolution weight, got \[32, 7, 3, 3\]"):
        convert_input_order({"state_dict": {FIRST_CONV: torch.zeros(32, 7, 3, 3)}}, model, KIND, where="bad.ckpt")
    with pytest.raises(ValueError, match="holds 1 parameters"):
        one_parameter = [{"state": {}, "param_groups": [{"params": [0]}]}]
        convert_input_order({"state_dict": weight, "optimizer_states": one_parameter}, model, KIND,
                            where="bad.ckpt", weight_decay=0.0)
    unchanged = {"state_dict": dict(weight)}  # other kinds' order never changed: nothing to convert
    assert convert_input_order(unchanged, _tiny("upsample").model, "upsample", where="x.ckpt") == []
