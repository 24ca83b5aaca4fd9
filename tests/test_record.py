"""What is recorded is what ran: the mixed precision the device applies, the image size the transforms use."""

from __future__ import annotations

import warnings

import pytest
import torch

from pih2t_hub.training.config import RunConfig
from pih2t_hub.training.record import recorded_config, resolve_mixed_precision, used_image_size


@pytest.fixture()
def fresh_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    made = []

    def make(mp: str):
        AcceleratorState._reset_state(True)
        made.append(Accelerator(mixed_precision=mp, cpu=True))
        return made[-1]

    yield make
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("requested", ["no", "fp16", "bf16"])
def test_mixed_precision_is_resolved_to_what_autocast_does_on_cpu(fresh_accelerator, requested) -> None:
    accelerator = fresh_accelerator(requested)
    # independent of the probe: the dtype a layer inside a prepared model computes in during a forward, which is
    # what training runs (prepare wraps the forward in autocast and casts the outputs back to float32)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad():
        accelerator.prepare(model)(torch.zeros(1, 2))
    expected = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[seen[0]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = resolve_mixed_precision(accelerator, requested)
    assert used == expected
    assert bool(caught) == (used != requested)
    if requested == "fp16":  # accelerate 1.x has no fp16 autocast on CPU: the run is float32, recorded as such
        assert used == "no" and "not supported on cpu" in str(caught[0].message)


def test_image_size_none_records_the_backbones_own() -> None:
    import timm

    from pih2t_hub import create_model

    model = create_model("test_resnet", num_labels=3)
    native = timm.create_model("test_resnet", pretrained=False).pretrained_cfg["input_size"]
    assert used_image_size(model.config.backbone_data_config) == native[-1]
    assert used_image_size({"input_size": [3, 24, 32]}) == [24, 32]
    cfg = RunConfig(image_size=None)
    recorded = recorded_config(cfg, image_size=native[-1], mixed_precision=None)
    assert recorded.image_size == native[-1] and recorded.mixed_precision == cfg.mixed_precision
    assert cfg.image_size is None  # the requested config is left alone (resume compares it)
