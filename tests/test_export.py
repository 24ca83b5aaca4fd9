"""``torch.export`` (and so ONNX export through dynamo) traces the model's forward: the eager NaN / inf check on
``pixel_values`` is a data-dependent branch that export would refuse, so it runs in eager calls only.

Tiny random backbones (timm ``test_resnet`` and a 2-layer Hugging Face ViT): the exported program gives the eager
logits on inputs it was not traced with, and the eager model still refuses non-finite pixels.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig

from pih2t_hub import create_model

BACKBONES = {
    "timm_resnet": "test_resnet",
    "hf_vit": ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8),
}


class _Logits(torch.nn.Module):
    """The classifier as a tensor -> tensor function (what an ONNX or AOTInductor consumer calls)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _images(model, seed: int, batch: int = 2) -> torch.Tensor:
    _, h, w = model.config.backbone_data_config["input_size"]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(BACKBONES))
def test_exported_program_gives_the_eager_logits(key: str) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONES[key], num_labels=3, class_counts=[50, 10, 2]).eval()
    wrapped = _Logits(model).eval()
    program = torch.export.export(wrapped, (_images(model, seed=0),))
    exported = program.module()
    with torch.no_grad():
        for seed in (1, 2):  # inputs other than the tracing example
            x = _images(model, seed)
            torch.testing.assert_close(exported(x), wrapped(x), atol=1e-5, rtol=1e-5)
    # the keyword call of the model itself exports as well
    direct = torch.export.export(model, (), {"pixel_values": _images(model, seed=0)}).module()
    x = _images(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(direct(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", list(BACKBONES))
def test_eager_calls_still_refuse_non_finite_pixels(key: str) -> None:
    model = create_model(BACKBONES[key], num_labels=3).eval()
    x = _images(model, seed=0)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(pixel_values=x)
