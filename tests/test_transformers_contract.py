"""The transformers behaviours users rely on, checked directly (these run without transformers' sdist).

transformers' common tests (test_transformers_common.py) cover the same ground generically; these pin the cases
that were broken: re-labelling a checkpoint with class counts, the losses per problem_type against their formulas,
attn_implementation reaching an HF encoder, hidden states, return_dict, NaN inputs, meta-device BN statistics.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForImageClassification, ViTConfig

from pih2t_hub import create_model
from pih2t_hub.models.pih2t import PIH2TForImageClassification

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def tiny_vit() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)


def _pixels(batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_relabel_a_checkpoint_with_class_counts(tmp_path, caplog):
    model = create_model("test_resnet", num_labels=3, id2label=LABELS, class_counts=[50, 10, 2]).eval()
    model.save_pretrained(tmp_path / "old")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "old", num_labels=5)
    with caplog.at_level(logging.WARNING):
        new = AutoModelForImageClassification.from_pretrained(tmp_path / "old", num_labels=5,
                                                              ignore_mismatched_sizes=True).eval()
    assert "dropping the saved class_counts" in caplog.text
    assert new.config.num_labels == 5 and new.config.class_counts is None
    assert new.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert new.classifier.weight.shape == (5, model.config.num_features)
    # the new head holds a fresh nn.Linear initialisation (uniform within 1/sqrt(fan_in)), not uninitialised memory
    bound = model.config.num_features ** -0.5
    assert 0 < new.classifier.weight.abs().max() <= bound and new.classifier.bias.abs().max() <= bound
    for key, value in model.pih2t.state_dict().items():  # the backbone is the saved one
        assert torch.equal(new.pih2t.state_dict()[key], value), key
    new.save_pretrained(tmp_path / "new")  # a re-labelled model saves and reloads
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "new").eval()
    x = _pixels(2, 64)
    with torch.no_grad():
        assert torch.equal(again(x).logits, new(x).logits)


def test_setting_num_labels_drops_stale_counts(caplog):
    model = create_model("test_resnet", num_labels=3, class_counts=[5, 3, 1])
    with caplog.at_level(logging.WARNING):
        model.config.num_labels = 4
    assert model.config.class_counts is None and "dropping them" in caplog.text


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_loss_follows_problem_type(problem):
    num_labels = 1 if problem == "regression" else 3
    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=num_labels).eval()
    x = _pixels(4, 64)
    g = torch.Generator().manual_seed(1)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1, 2])
    elif problem == "multi_label_classification":
        labels = (torch.rand(4, 3, generator=g) > 0.5).float()
    else:
        labels = torch.randn(4, generator=g)
    with torch.no_grad():
        out = model(x, labels=labels)
    assert model.config.problem_type == problem  # inferred from the labels and recorded, as transformers does
    z = out.logits.double()
    if problem == "single_label_classification":  # -log softmax of the true class
        expected = -(z.gather(1, labels[:, None]).squeeze(1) - z.exp().sum(1).log()).mean()
    elif problem == "multi_label_classification":  # -[y log σ(z) + (1-y) log(1-σ(z))]
        p = torch.sigmoid(z)
        y = labels.double()
        expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    else:
        expected = ((z.squeeze(1) - labels.double()) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_attn_implementation_reaches_the_hf_encoder(tmp_path):
    create_model(tiny_vit(), num_labels=3).save_pretrained(tmp_path)
    for impl in ("eager", "sdpa"):
        model = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation=impl)
        encoder = model.pih2t.backbone.model
        assert encoder.config._attn_implementation == impl
        assert model.config.backbone_config is encoder.config  # one config object, as transformers expects
    model.set_attn_implementation("eager")  # at run time, too
    assert encoder.config._attn_implementation == "eager"


def test_hidden_states_attentions_and_tuples():
    hf = create_model(tiny_vit(), num_labels=3).eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        out = hf(_pixels(), output_hidden_states=True, output_attentions=True)
        tup = hf(_pixels(), return_dict=False)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (4, 17, 32)  # embeddings + 2 layers
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 2, 17, 17)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, 2, 17))  # rows are softmax weights
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)
    cnn = create_model("test_resnet", num_labels=3).eval()
    with torch.no_grad():
        states = cnn(_pixels(2, 64), output_hidden_states=True).hidden_states
    assert [tuple(s.shape[1:]) for s in states] == [(32, 32, 32), (32, 16, 16), (48, 8, 8), (192, 4, 4), (96, 2, 2)]
    with pytest.raises(ValueError, match="does not return attention maps"):
        cnn(_pixels(2, 64), output_attentions=True)


def test_nan_pixels_are_refused():
    model = create_model("test_resnet", num_labels=3).eval()
    x = _pixels(2, 64)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x)


def test_meta_device_build_has_fresh_batchnorm_statistics():
    config = create_model("test_resnet", num_labels=3).config
    with torch.device("meta"):
        model = PIH2TForImageClassification(config)
    model.to_empty(device="cpu")
    for module in model.modules():  # garbage before init_weights; put them to NaN to be sure
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(float("nan"))
    model.init_weights()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)


@pytest.mark.parametrize("backbone", ["test_resnet", "hf_vit"])
def test_trainer_with_gradient_checkpointing(tmp_path, backbone):
    """`Trainer(gradient_checkpointing=True)` trains, and the checkpointed layers really recompute in backward."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(0)
    model = create_model(tiny_vit() if backbone == "hf_vit" else backbone, num_labels=3)
    size = model.config.backbone_data_config["input_size"][-1] if backbone == "hf_vit" else 32
    ds = Dataset.from_dict({"pixel_values": _pixels(8, size).numpy(), "labels": [i % 3 for i in range(8)]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                             gradient_checkpointing=True, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # runs of the first checkpointed layer's body, seen as calls of its first sub-module (a pre-hook: the
    # non-reentrant recompute stops early, once the tensors backward needs are back, possibly before hooks after)
    calls = []
    next(layers[0].children()).register_forward_pre_hook(lambda *_: calls.append(1))
    out = Trainer(model=model, args=args, train_dataset=ds.with_format("torch")).train()
    assert model.is_activation_checkpointing and out.global_step == 2
    assert torch.isfinite(torch.tensor(out.training_loss))
    # each step runs the first checkpointed layer's body twice: the forward, then the recompute in backward
    assert len(calls) == 4
