"""The CLI end to end (``recipes/finetune.py``) on a tiny random backbone and scikit-learn's offline digits.

Runs go through ``main(argv)`` in this process (the import cost of torch/timm/transformers is paid once); the
resume test in ``test_training.py`` runs the literal ``python recipes/finetune.py`` command in a subprocess.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import by huggingface_hub / datasets
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", "digits", "--image-size", "32",
        "--max-per-class", "60", "--imbalance-ratio", "10", "--test-per-class", "20"]
SUMMARY = {"overall", "balanced", "many", "medium", "few", "ece"}
DIGITS_TEST = 10 * 20  # balanced test split held out from digits: 10 classes x --test-per-class


finetune = load_script("recipes/finetune.py", "finetune_recipe")


def _load_evaluate():
    return load_script("recipes/evaluate.py", "evaluate_recipe")


def _run_cli(argv: list[str]) -> dict:
    assert finetune.main(argv) == 0
    out = Path(argv[argv.index("--output-dir") + 1])
    return json.loads((out / "results.json").read_text())


def _check_outputs(out: Path, results: dict, method: str) -> None:
    """What every run must leave behind: model folder, resolved config, results with test metrics."""
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "config.json").is_file()
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["method"] == method and cfg["output_dir"] == str(out)
    assert results["method"] == method
    assert SUMMARY - {"many"} <= set(results["test"])
    for key in ("overall", "balanced", "medium", "few"):
        assert 0.0 <= results["test"][key] <= 1.0, (key, results["test"])
    assert math.isnan(results["test"]["many"])  # max 60 per class: no class has > 100 images
    assert math.isfinite(results["test"]["ece"])
    # overall accuracy on a balanced test set is a multiple of 1/200 and equals the mean per-class accuracy
    assert results["test"]["overall"] * DIGITS_TEST == pytest.approx(round(results["test"]["overall"] * DIGITS_TEST))
    if "per_class" in results:
        assert len(results["per_class"]) == 10
        assert results["test"]["overall"] == pytest.approx(float(np.mean(results["per_class"])), abs=1e-12)


def _reloaded_test_predictions(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of the saved model, reloaded through the Auto class, on the run's test split."""
    from transformers import AutoModelForImageClassification

    import pih2t_hub  # noqa: F401  (registers the Auto classes)
    from pih2t_hub.data.transforms import apply_transform, build_transform
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.run import load_splits

    model = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    assert model.config.backbone_data_config["input_size"][-1] == 32  # --image-size travels with the model
    cfg = RunConfig.from_yaml(out / "run_config.yaml")
    data = load_splits(cfg)
    test = apply_transform(data["test"], build_transform(model.config.backbone_data_config, train=False),
                           label_column=data["label_column"])
    preds, labels = [], []
    with torch.no_grad():
        for start in range(0, len(test), cfg.batch_size):
            batch = test[start:start + cfg.batch_size]
            x = torch.stack(list(batch["pixel_values"])) if isinstance(batch["pixel_values"], list) \
                else batch["pixel_values"]
            preds.append(model(pixel_values=x).logits.argmax(-1).numpy())
            labels.append(np.asarray(batch["labels"]))
    return np.concatenate(preds), np.concatenate(labels)


@pytest.mark.parametrize("stage2_mode", ["cached", "online"])
def test_cli_stage1_finetune_then_stage2_h2t(tmp_path: Path, stage2_mode: str, capsys) -> None:
    out = tmp_path / "run"
    argv = TINY + ["--method", "h2t", "--stage1-mode", "finetune", "--stage2-mode", stage2_mode,
                   "--stage1-epochs", "2", "--stage2-epochs", "2", "--batch-size", "32", "--output-dir", str(out)]
    results = _run_cli(argv)
    _check_outputs(out, results, "h2t")
    printed = capsys.readouterr().out
    assert "balanced" in printed and "h2t" in printed and str(out / "model") in printed

    # both stages ran for their epochs; model selection on validation picked one of them
    assert [h["epoch"] for h in results["stage1"]["history"]] == [0, 1]
    assert [h["epoch"] for h in results["stage2"]["history"]] == [0, 1]
    assert results["stage2"]["best_epoch"] in (0, 1)
    assert all("val_balanced" in h for h in results["stage2"]["history"])
    assert results["global_batch"] == 32 and results["num_processes"] == 1
    # stage 2 started from the stage-1 backbone: cached features were extracted from the fine-tuned weights
    assert (out / "checkpoints" / "stage1").is_dir() and (out / "checkpoints" / "stage2").is_dir()
    assert (out / "features" / "train").is_dir() == (stage2_mode == "cached")

    # the saved model reloads with the Auto class and reproduces the reported test accuracy, class by class
    preds, labels = _reloaded_test_predictions(out)
    assert len(labels) == DIGITS_TEST and np.bincount(labels, minlength=10).tolist() == [20] * 10
    per_class = np.array([(preds[labels == c] == c).mean() for c in range(10)])
    np.testing.assert_allclose(per_class, results["per_class"], atol=1e-12)
    assert (preds == labels).mean() == pytest.approx(results["test"]["overall"], abs=1e-12)


def test_cli_stage2_weights_differ_from_stage1_head(tmp_path: Path) -> None:
    """Stage 2 retrains the head: the saved classifier is not the stage-1 classifier (guards a no-op stage 2)."""
    out = tmp_path / "run"
    argv = TINY + ["--method", "ce", "--stage1-mode", "linear", "--stage1-epochs", "1", "--stage2-epochs", "1",
                   "--batch-size", "32", "--checkpoint-every", "0", "--output-dir", str(out)]
    _run_cli(argv)
    final = load_file(str(out / "model" / "model.safetensors"))
    stage1 = load_file(str(out / "checkpoints" / "stage1" / "checkpoint-7" / "model.safetensors"))
    assert set(stage1) == {"weight", "bias"}  # stage 1 linear trains the head alone
    assert not torch.equal(final["classifier.weight"], stage1["weight"])


def _other_methods() -> list:
    from pih2t_hub.methods import list_methods

    return [pytest.param(name, id=name) for name in list_methods() if name != "h2t"]


# DLSA: flows and classifiers shrunk to a couple of epochs on a handful of clusters (DLSAConfig fields).
DLSA_TINY = "{num_clusters: 4, flow_epochs: 2, cls_epochs: 2, flow_batch_size: 64, cls_batch_size: 64}"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One feature cache for the per-method runs: same backbone, data and seed, so features are extracted once (the
    manifest would refuse a mismatch)."""
    return tmp_path_factory.mktemp("features")


@pytest.mark.parametrize("method", _other_methods())
def test_cli_every_method_runs(tmp_path: Path, method: str, shared_cache: Path) -> None:
    from pih2t_hub.methods import get_method

    trains = get_method(method).recipe is not None
    out = tmp_path / "run"
    argv = TINY + ["--method", method, "--stage1-mode", "linear", "--stage2-mode", "cached", "--stage1-epochs", "1",
                   "--batch-size", "64", "--output-dir", str(out), "--cache-dir", str(shared_cache)]
    argv += ["--stage2-epochs", "1"] if trains else []  # refused for a post-hoc stage 2
    if method == "dlsa":
        argv += ["--method-kwargs", DLSA_TINY]
    results = _run_cli(argv)
    _check_outputs(out, results, method)
    assert ("stage2" in results) == trains
    if trains:
        assert len(results["stage2"]["history"]) == 1
    if method == "tau_norm":
        assert results["tau"] >= 0.0
    assert method in results["table"]
    # what is saved is what is reported: recipes/evaluate.py on the saved model gives the run's test numbers
    report = tmp_path / "eval.json"
    assert _load_evaluate().main(["--model", str(out / "model"), "--json", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    np.testing.assert_allclose(evaluated["per_class"], results["per_class"], atol=1e-12)
    assert evaluated["balanced"] == pytest.approx(results["test"]["balanced"], abs=1e-12)
    card = (out / "model" / "README.md").read_text()
    assert f"{100 * results['test']['balanced']:.2f}" in card
    if method == "ldam_drw":  # the re-weighting epoch it derived, int(0.8 · 1 epoch) = 0, is recorded with the run
        recorded = yaml.safe_load((out / "run_config.yaml").read_text())
        assert results["derived_loss_kwargs"] == {"drw_epoch": 0} == {"drw_epoch": recorded["loss_kwargs"]["drw_epoch"]}
        assert "drw_epoch" in card


def test_cli_config_file_with_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("method: crt\nstage2_epochs: 7\nbatch_size: 16\nloss_kwargs: {tau: 2.0}\n")
    cfg = finetune.resolve_config(["--config", str(recipe), "--stage2-epochs", "3", "--resume", "--seed", "5",
                                   "--loss-kwargs", "{gamma: 1.5}", "--max-per-class", "40"])
    assert (cfg.method, cfg.stage2_epochs, cfg.batch_size, cfg.resume, cfg.seed) == ("crt", 3, 16, True, 5)
    assert cfg.max_per_class == 40
    assert cfg.loss_kwargs == {"gamma": 1.5}  # the CLI mapping replaces the recipe's
    demo = finetune.resolve_config(["--config", "demo"])  # a name in recipes/configs/
    assert demo.backbone


def test_cli_none_overrides_default(tmp_path: Path) -> None:
    cfg = finetune.resolve_config(["--max-per-class", "none", "--imbalance-ratio", "none"])
    assert cfg.max_per_class is None and cfg.imbalance_ratio is None
    assert finetune.resolve_config([]).max_per_class == 300  # not given: the default stays


@pytest.mark.parametrize("argv, match", [
    (["--stage", "3"], "argument --stage: invalid choice"),
    (["--stage1-mode", "frozen"], "argument --stage1-mode: invalid choice"),
    (["--imbalance-ratio", "0.5"], "imbalance_ratio must be finite and >= 1"),
    (["--push-to-hub"], "--push-to-hub needs --hub-model-id"),
    (["--config", "no_such_recipe"], "recipe 'no_such_recipe' not found"),
    (["--resume", "maybe"], "argument --resume"),
])
def test_cli_rejects_bad_input(argv: list[str], match: str) -> None:
    from pih2t_hub.training.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        finetune.resolve_config(argv)


def test_flags_that_do_nothing_count_only_when_given(tmp_path: Path, capsys) -> None:
    """A recipe's stage-2 values, resume_strict or mixup are not the user's claim: ``--stage 1``, no ``--resume`` and
    a linear stage 1 accept them; the same values as flags are refused (tests/test_cli_errors.py)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage2_epochs: 3\nstage2_lr: 0.1\nresume_strict: true\nmixup_alpha: 0.2\nbackbone: test_vit\n")
    cfg = finetune.resolve_config(["--config", str(recipe), "--stage", "1", "--init-from", str(tmp_path)])
    assert (cfg.stage, cfg.stage2_epochs, cfg.resume_strict, cfg.mixup_alpha) == ("1", 3, True, 0.2)
    for argv in (["--mixup-alpha", "0"], ["--resume-strict", "false"], ["--mixup-alpha", "0.2", "--stage1-mode", "finetune"],
                 ["--resume", "--resume-strict"], ["--stage", "both", "--stage2-lr", "0.1"]):
        finetune.resolve_config(argv)  # given, but meaningful (or a no-op value)
    assert capsys.readouterr().err == ""


def test_stage2_without_init_from_warns_in_one_line(tmp_path: Path, capsys) -> None:
    finetune.resolve_config(["--stage", "2"])
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()]
    assert err.startswith("warning: --stage 2 without --init-from trains stage 2 on a classifier head that stage 1 "
                          "never trained")
    (tmp_path / "config.json").write_text("{}")
    finetune.resolve_config(["--stage", "2", "--init-from", str(tmp_path)])
    finetune.resolve_config(["--stage", "both"])
    assert capsys.readouterr().err == ""


def test_cli_unknown_method_is_reported(tmp_path: Path, capsys) -> None:
    assert finetune.main(TINY + ["--method", "h2tt", "--output-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown method 'h2tt'")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_help_documents_every_flag_in_groups(capsys) -> None:
    import dataclasses

    from pih2t_hub.training.config import GROUPS, RunConfig

    assert finetune.main(["--help"]) == 0
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"\n{group}:\n" in text
    parser = finetune.build_parser()
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags and flags[flag].help, flag
        assert flag in text
    assert flags["--stage"].choices == ("1", "2", "both") and "(default: both)" in text
    assert "--stage1-epochs" in text and "--stage2-epochs" in text and "--epochs " not in text


def test_failed_save_on_a_rerun_keeps_the_previous_outputs(tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk while a rerun saves into an existing output dir: the old model folder, results and config stay
    and the old model predicts exactly as before (the rerun used to mix its config.json with the old weights)."""
    import errno
    import hashlib
    import warnings

    out = tmp_path / "run"
    base = TINY + ["--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "64", "--method", "ce",
                   "--output-dir", str(out)]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # earlier runs in this process fixed the precision to "no"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            first = _run_cli(base + ["--mixed-precision", "fp16"])
        finally:  # accelerate keeps one mixed-precision setting per process; the runs after this one use "no"
            AcceleratorState._reset_state(True)
    # fp16 on a CPU computes in float32 (accelerate): recorded as what ran, with a warning
    assert first["mixed_precision"] == "no" and first["image_size"] == 32
    assert any("--mixed-precision fp16 is not supported on cpu" in str(w.message) for w in caught)
    assert yaml.safe_load((out / "run_config.yaml").read_text())["mixed_precision"] == "no"
    digest = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
              if p.is_file() and "checkpoints" not in p.parts and "features" not in p.parts}
    preds_before, _ = _reloaded_test_predictions(out)

    import transformers.modeling_utils as mu

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    capsys.readouterr()
    assert finetune.main(base[:-4] + ["--method", "crt", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()  # progress bars, then the error as the last line
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]]
    assert "No space left on device" in err.splitlines()[-1] and "Traceback" not in err
    after = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
             if p.is_file() and "checkpoints" not in p.parts and "features" not in p.parts}
    assert after == digest
    preds_after, _ = _reloaded_test_predictions(out)
    np.testing.assert_array_equal(preds_after, preds_before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_stage2_alone_starts_from_a_saved_stage1_model(tmp_path: Path) -> None:
    """`--stage 1` then `--stage 2 --init-from <stage-1 model>` continues from the fine-tuned backbone and head."""
    s1 = tmp_path / "s1"
    _run_cli([*TINY, "--stage", "1", "--stage1-mode", "finetune", "--stage1-epochs", "1", "--batch-size", "32",
              "--method", "ce", "--output-dir", str(s1)])
    s2 = tmp_path / "s2"
    res = _run_cli([*TINY[4:], "--stage", "2", "--init-from", str(s1 / "model"), "--method", "h2t", "--stage2-epochs", "1",
                    "--batch-size", "32", "--output-dir", str(s2)])
    _check_outputs(s2, res, "h2t")
    w1, w2 = load_file(str(s1 / "model" / "model.safetensors")), load_file(str(s2 / "model" / "model.safetensors"))
    backbone_keys = [k for k in w1 if not k.startswith("classifier.")]
    assert backbone_keys and all(torch.equal(w1[k], w2[k]) for k in backbone_keys)  # frozen in stage 2
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("classifier."))  # the head moved
    recorded = (s2 / "run_config.yaml").read_text()  # the saved model's backbone, not the config's default one
    assert "backbone: test_resnet" in recorded and "effnet" not in recorded
    assert "effnet" not in (s2 / "model" / "README.md").read_text()


def test_init_from_with_a_different_class_count_is_refused(tmp_path: Path) -> None:
    from pih2t_hub import create_model
    from pih2t_hub.training.run import _load_initial_model

    create_model("test_resnet", num_labels=3).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="has 3 classes but the dataset has 10"):
        _load_initial_model(str(tmp_path / "m"), 10, np.ones(10, dtype=int), "h2t")


def test_cli_pi_h2t_trains_pif_in_stage1_and_h2tf_online(tmp_path: Path) -> None:
    """PI-H2T end to end: PIF is inserted and trained in stage 1, H2TF needs stage-1 prototypes on the online path."""
    out = tmp_path / "run"
    results = _run_cli(TINY + ["--method", "pi-h2t", "--stage1-mode", "finetune", "--stage2-mode", "online",
                               "--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "32", "--output-dir", str(out)])
    _check_outputs(out, results, "pi-h2t")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["pif"] is True and config["method"] == "pi-h2t"
    weights = load_file(str(out / "model" / "model.safetensors"))
    pif = {k: v for k, v in weights.items() if ".pif." in k}
    assert len(pif) == 6  # 2→4→2→1: three linear layers, weight + bias each
    stage1 = load_file(str(out / "checkpoints" / "stage1" / sorted(
        p.name for p in (out / "checkpoints" / "stage1").iterdir())[-1] / "model.safetensors"))
    assert all(torch.equal(stage1[k], v) for k, v in pif.items())  # stage 2 keeps the stage-1 PIF
    preds, labels = _reloaded_test_predictions(out)
    assert (preds == labels).mean() == pytest.approx(results["test"]["overall"], abs=1e-12)


def test_cli_push_to_hub_uploads_the_validated_model_folder(tmp_path: Path, monkeypatch) -> None:
    """`--push-to-hub --hub-model-id` creates the repo and uploads one folder holding weights, code and card."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    calls: list[tuple[str, dict]] = []

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))
            return None

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir()),
                                            "card": (folder / "README.md").read_text()}))
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")  # the CLI checks for one up front
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (the recording API sends nothing)
    out = tmp_path / "run"
    _run_cli(TINY + ["--method", "h2t", "--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "32",
                     "--push-to-hub", "--hub-model-id", "me/h2t-digits-lt", "--output-dir", str(out)])
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "me/h2t-digits-lt" and calls[1][1]["repo_id"] == "me/h2t-digits-lt"
    files = set(calls[1][1]["files"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_pih2t.py", "README.md",
            "accuracy_vs_frequency.png"} <= files
    card = ModelCard(calls[1][1]["card"])
    results = card.data.eval_results
    assert {r.metric_type for r in results} >= {"accuracy", "balanced_accuracy", "medium_shot_accuracy"}


def test_cli_report_to_tensorboard_logs_every_epoch(tmp_path: Path) -> None:
    """`--report-to tensorboard` sends each epoch record (loss, lr, validation metrics) to accelerate's tracker."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _run_cli(TINY + ["--method", "h2t", "--stage1-epochs", "2", "--stage2-epochs", "2", "--batch-size", "32",
                     "--report-to", "tensorboard", "--output-dir", str(out)])
    events = list((out / "pih2t").rglob("events.out.tfevents*"))
    assert events, sorted(str(p) for p in out.rglob("*"))[:20]
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val_balanced"} <= tags
    assert len(acc.Scalars("val_balanced")) == 4  # 2 stage-1 epochs + 2 stage-2 epochs


@pytest.mark.parametrize("method", ["tau_norm", "logit_adjusted_posthoc"])
def test_cli_export_timm_gives_the_same_logits(tmp_path: Path, method: str, shared_cache: Path) -> None:
    """--export timm: the run's model also as a plain timm folder (bias-free τ-norm, folded post-hoc adjustment)."""
    import timm
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    _run_cli(TINY + ["--method", method, "--stage1-epochs", "1", "--batch-size", "64", "--export", "timm",
                     "--output-dir", str(out), "--cache-dir", str(shared_cache)])
    ours = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    plain = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_string_label_column_works_end_to_end(tmp_path: Path) -> None:
    """An image folder whose classes are a string metadata column (not sub-folders): encoded with the train
    split's sorted names, carried into the model's id2label, and every class evaluated."""
    from PIL import Image

    folder = tmp_path / "pets"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file_name,species"]
    for c, name in enumerate(["emu", "cat", "dog"]):  # not in sorted order on purpose
        for i in range(30):
            image = np.clip(rng.normal(60 + 70 * c, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    results = _run_cli(["--backbone", "test_resnet", "--pretrained", "false", "--dataset", str(folder),
                        "--label-column", "species", "--image-size", "32", "--max-per-class", "20",
                        "--imbalance-ratio", "2", "--test-per-class", "5", "--method", "ce", "--stage1-epochs", "1",
                        "--stage2-epochs", "1", "--batch-size", "16", "--output-dir", str(out)])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "emu"}
    assert len(results["per_class"]) == 3 and sum(results["class_counts"]) > 0
    assert results["test"]["overall"] * 15 == pytest.approx(round(results["test"]["overall"] * 15))  # 3 x 5 images


def test_skipped_unreadable_images_are_named_and_listed(tmp_path: Path, caplog) -> None:
    """``--skip-unreadable-images``: a truncated JPEG and a file that is no image are dropped, named in a warning,
    and listed in ``results.json`` with the dataset split and row they are read from, their path and the decoder's
    message; the counts match the list."""
    import logging

    from PIL import Image

    from pih2t_hub.data.sources import load_dataset_any

    folder = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square", "star"]):
        (folder / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.clip(rng.normal(60 + 70 * c, 20, (8, 8)), 0, 255).astype(np.uint8)).save(
                folder / name / f"{i}.jpg")
    good = (folder / "circle" / "0.jpg").read_bytes()
    bad = {folder / "square" / "truncated.jpg": good[: len(good) // 2], folder / "star" / "garbage.jpg": b"not an image"}
    for path, data in bad.items():
        path.write_bytes(data)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pih2t_hub.data.splits"):
        results = _run_cli(["--backbone", "test_resnet", "--pretrained", "false", "--dataset", str(folder),
                            "--image-size", "32", "--imbalance-ratio", "none", "--test-per-class", "5",
                            "--skip-unreadable-images", "true", "--method", "ce", "--stage1-epochs", "1",
                            "--stage2-epochs", "1", "--batch-size", "16", "--output-dir", str(out)])
    listed = results["unreadable_images"]
    assert sorted(r["path"] for r in listed) == sorted(str(p) for p in bad)
    assert sum(results["skipped_images"].values()) == len(listed) == 2
    assert {r["split"] for r in listed} <= {"train", "test"}
    for split, count in results["skipped_images"].items():
        assert count == sum(r["split"] == split for r in listed)
    by_path = {r["path"]: r for r in listed}
    assert "truncated" in by_path[str(folder / "square" / "truncated.jpg")]["error"].lower()
    assert by_path[str(folder / "star" / "garbage.jpg")]["error"]  # PIL's "cannot identify image file ..."
    # the recorded (dataset split, row) is where the file sits in the dataset as the user loads it
    source = load_dataset_any(str(folder), split="train")
    from datasets import Image as ImageFeature

    source = source.cast_column("image", ImageFeature(decode=False))
    for r in listed:
        assert r["dataset_split"] == "train"  # an image folder has no test split: it is held out of train
        assert source[r["row"]]["image"]["path"] == r["path"]
    warned = " ".join(rec.getMessage() for rec in caplog.records if "unreadable" in rec.getMessage())
    for r in listed:
        assert f"train[{r['row']}] {r['path']}" in warned
