"""transformers' own common model tests run on PIH2T, with a tiny timm CNN and a tiny HF ViT backbone.

``ModelTesterMixin`` and ``ConfigTester`` come from the source distribution of the *installed* transformers (see
``transformers_suite.py``); this module only points them at PIH2T, in the style of transformers' ViT tests. It
skips, saying why, when the sdist is not in the cache (``.ci/run`` fetches it).

What runs and what does not:

* Every mixin test runs on both backbone kinds, except those in ``NOT_APPLICABLE`` below, each with its reason
  (token embeddings, text generation, cross-attention ...). Tests that the mixin itself skips on CPU
  (accelerator-only, flash attention, multi-GPU, bitsandbytes) skip with transformers' own reason.
* The timm tester overrides ``test_hidden_states_output`` as transformers' own CNN testers (ResNet, ConvNeXt) do:
  the common version checks ``[seq_length, hidden_size]`` token shapes, which a CNN's per-stage maps do not have;
  the override checks the stages against timm's ``feature_info`` (channels, stride). The HF ViT tester runs the
  common version unchanged.
* The torch.export tests (``tests/exporters``) are not in the sdist, so they are not run.
* ``test_can_init_all_missing_weights`` is skipped by the mixin itself ("Not a prioritized model"): it runs only for
  models whose configuration file carries a copyright year from 2023 on, and transformers exempts timm weights from
  it anyway (timm initialises in its constructors, which ``_init_weights`` does not replay).
"""

from __future__ import annotations

import copy
import json
import unittest
from unittest import mock

import pytest
import torch

from transformers_suite import load_common

try:
    modeling_common, configuration_common = load_common()
except (FileNotFoundError, ImportError) as err:  # ImportError: a test dependency of the mixin (parameterized)
    pytest.skip(f"transformers' common tests unavailable: {err}", allow_module_level=True)

from transformers import ViTConfig  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from pih2t_hub.models.pih2t import PIH2TConfig, PIH2TForImageClassification, PIH2TModel  # noqa: E402

ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor = modeling_common.floats_tensor

NOT_APPLICABLE = {
    "test_inputs_embeds": "image classifier: no token embeddings to feed instead of pixel_values",
    "test_inputs_embeds_matches_input_ids": "image classifier: no input_ids / token embeddings",
    "test_model_get_set_embeddings": "image classifier: no token embeddings",
    "test_resize_tokens_embeddings": "image classifier: no token vocabulary to resize",
    "test_resize_embeddings_untied": "image classifier: no token vocabulary to resize",
    "test_resize_embeddings_untied_no_reinit_on_post_init": "image classifier: no token vocabulary to resize",
    "test_enable_input_require_grads": "image classifier: no input embeddings to hook (pixels are the input)",
    "test_enable_input_require_grads_with_gradient_checkpointing": "image classifier: no input embeddings to hook",
    "test_generation_tester_mixin_inheritance": "image classifier: cannot generate (the generation mixin is a shim)",
    "test_encoder_decoder_loss_no_double_shift": "image classifier: not an encoder-decoder",
    "test_causal_lm_loss_honors_shift_labels": "image classifier: no language-model head",
    "test_bc_cache_name_forward": "image classifier: no KV cache",
}


def _skip_not_applicable(cls: type) -> type:
    """Mark each not-applicable mixin test as skipped with its reason (the list above is the whole truth)."""
    for name, reason in NOT_APPLICABLE.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


class _TinyTester:
    """Shared part of the model testers: a batch of random images and a 3-class config."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, image_size: int = 32, num_labels: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.num_labels = num_labels
        self.is_training = True

    def get_config(self) -> PIH2TConfig:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare_config_and_inputs(self) -> tuple[PIH2TConfig, torch.Tensor]:
        pixels = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixels

    def prepare_config_and_inputs_for_common(self) -> tuple[PIH2TConfig, dict]:
        config, pixels = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixels}


class TimmCNNTester(_TinyTester):
    """timm's ``test_resnet`` (5 stages: stem + 4 residual stages)."""

    def get_config(self) -> PIH2TConfig:
        return PIH2TConfig(backbone="test_resnet", backbone_source="timm", num_labels=self.num_labels,
                           backbone_data_config={"input_size": [3, self.image_size, self.image_size]})


class HFViTTester(_TinyTester):
    """A 2-layer HF ViT: 32×32 images in 8×8 patches → 16 patch tokens + CLS."""

    def __init__(self, parent: unittest.TestCase, **kwargs):
        super().__init__(parent, **kwargs)
        self.patch_size = 8
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1

    def get_config(self) -> PIH2TConfig:
        vit = ViTConfig(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size,
                        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return PIH2TConfig(backbone="config:vit", backbone_source="hf", backbone_config=vit,
                           num_labels=self.num_labels)


class _PIH2TCommonTests(ModelTesterMixin):
    """The mixin, with PIH2T registered in transformers' auto mappings for the duration of the test class.

    The mixin decides which tests apply (labels, problem types, re-labelling) by looking the class name up in
    transformers' mapping of image classifiers, where every in-library classifier is listed.
    """

    all_model_classes = (PIH2TModel, PIH2TForImageClassification)
    test_resize_embeddings = False
    tiny_tester: type = _TinyTester

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        for mapping, name in ((modeling_auto.MODEL_MAPPING_NAMES, "PIH2TModel"),
                              (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                               "PIH2TForImageClassification")):
            patcher = mock.patch.dict(mapping, {"pih2t": name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self) -> None:
        self.model_tester = self.tiny_tester(self)
        self.config_tester = ConfigTester(self, config_class=PIH2TConfig, has_text_modality=False,
                                          **self.config_kwargs())

    def config_kwargs(self) -> dict:
        return {}

    def test_config(self):
        self.config_tester.run_common_tests()


@_skip_not_applicable
class PIH2TTimmCNNModelTest(_PIH2TCommonTests, unittest.TestCase):
    tiny_tester = TimmCNNTester
    has_attentions = False  # timm blocks do not return attention maps

    def config_kwargs(self) -> dict:
        return {"backbone": "test_resnet", "head_type": "cosine", "cosine_scale": 8.0, "pif": True}

    def test_hidden_states_output(self):
        """Per-stage maps of a CNN (the common test checks token shapes), by argument and by config."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        size = self.model_tester.image_size
        for model_class in self.all_model_classes:
            for by_config in (False, True):
                cfg = copy.deepcopy(config)
                cfg.output_hidden_states = by_config
                model = model_class(cfg).eval()
                stages = model.get_backbone().model.feature_info
                with torch.no_grad():
                    out = model(**inputs, **({} if by_config else {"output_hidden_states": True}))
                self.assertEqual(len(out.hidden_states), len(stages))
                for state, info in zip(out.hidden_states, stages):
                    stride = info["reduction"]
                    self.assertEqual(tuple(state.shape),
                                     (self.model_tester.batch_size, info["num_chs"], size // stride, size // stride))


@_skip_not_applicable
class PIH2THFViTModelTest(_PIH2TCommonTests, unittest.TestCase):
    tiny_tester = HFViTTester
    _is_composite = True  # an HF encoder (its own PreTrainedModel and sub-config) inside PIH2T

    def config_kwargs(self) -> dict:
        # the encoder config as it lies in a config.json (string label ids, no version: a nested config has none),
        # which ConfigTester expects to find unchanged in the serialised config
        vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        image_size=32, patch_size=8)
        as_json = json.loads(vit.to_json_string(use_diff=False))
        as_json.pop("transformers_version")
        return {"backbone": "config:vit", "backbone_source": "hf", "backbone_config": as_json, "hf_pooling": "mean"}
