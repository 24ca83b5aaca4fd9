"""Methods as plug-ins: official recipes resolved into the config, post-hoc heads against formulas written here,
a method registered from a file outside the package and run end to end, and the docs agreeing with the registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script
import torch
from torch import nn

from pih2t_hub.methods import Stage2Context, get_method, list_methods
from pih2t_hub.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _resolved(method: str, **overrides):
    cls = get_method(method)
    return cls.resolve(RunConfig(method=method, **overrides))


@pytest.mark.parametrize("method, expected", [
    ("crt", (10, 0.2, 512, 5e-4, "balanced")),       # classifier-balancing ImageNet-LT cRT config
    ("lws", (5, 0.2, 512, 5e-4, "balanced")),        # LWS: cRT's optimiser for 5 epochs
    ("ldam_drw", (200, 0.1, 128, 2e-4, "instance")),  # LDAM-DRW CIFAR recipe
    ("h2t", (10, 0.02, 128, 5e-4, "dual")),          # H2T CIFAR-100-LT IF 100
    ("crt_progressive", (10, 0.2, 512, 5e-4, "progressive")),
])
def test_official_recipes_are_the_defaults(method: str, expected: tuple) -> None:
    cfg = _resolved(method)
    assert (cfg.stage2_epochs, cfg.stage2_lr, cfg.stage2_batch_size, cfg.stage2_weight_decay, cfg.sampler) == expected


def test_cli_flags_override_the_recipe_and_the_config_records_it(tmp_path: Path) -> None:
    finetune = load_script("recipes/finetune.py", "finetune_m")
    cfg = finetune.resolve_config(["--method", "crt", "--stage2-lr", "0.05"])
    resolved = get_method(cfg.method).resolve(cfg)
    assert (resolved.stage2_lr, resolved.stage2_epochs, resolved.stage2_batch_size) == (0.05, 10, 512)
    resolved.save(tmp_path / "run_config.yaml")
    again = RunConfig.from_yaml(tmp_path / "run_config.yaml")
    assert (again.stage2_lr, again.stage2_epochs, again.loss, again.sampler) == (0.05, 10, "ce", "balanced")


def test_drw_switches_on_at_80_percent_of_the_stage2_epochs() -> None:
    for epochs, drw in [(200, 160), (10, 8)]:
        cfg = _resolved("ldam_drw", stage2_epochs=epochs)
        loss = get_method("ldam_drw")(cfg).make_loss(_ctx(cfg, [50, 20, 5]))
        assert loss.drw_epoch == drw
        loss.set_epoch(drw - 1)
        assert not loss.weights_active
        loss.set_epoch(drw)
        assert loss.weights_active


def _epoch_lrs(method: str, **overrides) -> list[float]:
    """The learning rate of every stage-2 epoch of the method's schedule (stepped as the loop steps it)."""
    cfg = _resolved(method, **overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.stage2_lr))
    sched = get_method(method)(cfg).lr_schedule(opt)
    lrs = []
    for _ in range(int(cfg.stage2_epochs)):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_ldam_schedule_warms_up_then_steps_down() -> None:
    lr = _epoch_lrs("ldam_drw").__getitem__
    assert lr(0) == pytest.approx(0.1 / 5) and lr(4) == pytest.approx(0.1)
    assert lr(159) == pytest.approx(0.1) and lr(160) == pytest.approx(0.1 * 0.01)
    assert lr(180) == pytest.approx(0.1 * 1e-4)


def test_fusion_methods_take_any_loss_and_loss_methods_refuse_another() -> None:
    cfg = _resolved("h2t", loss="logit_adjusted")
    assert cfg.loss == "logit_adjusted"
    loss = get_method("h2t")(cfg).make_loss(_ctx(cfg, [30, 10, 3]))
    assert type(loss).__name__ == "LogitAdjustedLoss"
    with pytest.raises(ValueError, match="cannot be combined"):
        _resolved("focal", loss="ce")
    with pytest.raises(ValueError, match="trains nothing"):
        _resolved("tau_norm", loss="focal")


def test_unknown_method_names_close_ones() -> None:
    with pytest.raises(ValueError, match="Did you mean crt"):
        get_method("ctr")
    assert get_method("PI_H2T") is get_method("pi-h2t")


# ------------------------------------------------------------------------------------------ post-hoc heads


def _ctx(cfg, counts, train=None, val=None) -> Stage2Context:
    return Stage2Context(cfg=cfg, class_counts=np.asarray(counts), generator=torch.Generator().manual_seed(0),
                         train_features=train, val_features=val)


def _linear(d: int, c: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.5, 3.0, c)[:, None])  # head classes get larger norms
    return head


def test_tau_norm_divides_by_the_norm_power_and_drops_the_bias() -> None:
    g = torch.Generator().manual_seed(1)
    xv, yv = torch.randn(60, 6, generator=g), torch.arange(60) % 4
    head = _linear(6, 4)
    cfg = _resolved("tau_norm")
    ctx = _ctx(cfg, [40, 20, 10, 5], val=(xv, yv))
    out = get_method("tau_norm")(cfg).finalize(head, ctx)
    tau = ctx.results["tau"]
    w = head.weight.detach().numpy()
    expected = w / np.linalg.norm(w, axis=1, keepdims=True) ** tau
    np.testing.assert_allclose(out.weight.detach().numpy(), expected, rtol=1e-5)
    assert out.bias is None
    kept = get_method("tau_norm")(_resolved("tau_norm", method_kwargs={"keep_bias": True})).finalize(head, ctx)
    assert torch.equal(kept.bias, head.bias)


def test_posthoc_logit_adjustment_subtracts_tau_log_prior_from_the_bias() -> None:
    counts = [80, 15, 5]
    head = _linear(5, 3)
    cfg = _resolved("logit_adjusted_posthoc", method_kwargs={"tau": 1.5})
    out = get_method("logit_adjusted_posthoc")(cfg).finalize(head, _ctx(cfg, counts))
    prior = np.asarray(counts) / sum(counts)
    np.testing.assert_allclose(out.bias.detach().numpy(), head.bias.detach().numpy() - 1.5 * np.log(prior), rtol=1e-5)
    assert torch.equal(out.weight, head.weight)


def test_ncm_logits_are_minus_squared_distance_to_centred_normalised_centroids() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 4, generator=g) + 3.0, torch.arange(50) % 5
    cfg = _resolved("ncm")
    head = get_method("ncm")(cfg).finalize(_linear(4, 5), _ctx(cfg, [10] * 5, train=(x, y)))
    xn = x.numpy()
    mean = xn.mean(0)
    z = (xn - mean) / np.linalg.norm(xn - mean, axis=1, keepdims=True)
    centroids = np.stack([z[y.numpy() == c].mean(0) for c in range(5)])
    q = torch.randn(7, 4, generator=g)
    qz = (q.numpy() - mean) / np.linalg.norm(q.numpy() - mean, axis=1, keepdims=True)
    expected = -((qz[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_allclose(head(q).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lws_export_is_a_plain_linear_head_with_the_same_logits() -> None:
    cfg = _resolved("lws")
    method = get_method("lws")(cfg)
    trainable = method.setup_head(_linear(6, 3), _ctx(cfg, [9, 3, 1]))
    with torch.no_grad():
        trainable.scales.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(4, 6)
    linear = method.finalize(trainable, _ctx(cfg, [9, 3, 1]))
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), trainable(x))


# ------------------------------------------------------------------------------------------ extending


def _docs_example() -> str:
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text.split("## Adding a method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_method_from_a_file_outside_the_package_registers_and_runs(tmp_path: Path) -> None:
    """The worked example of docs/methods.md, as a user's own module, end to end through run(cfg)."""
    from pih2t_hub.training.run import run

    path = tmp_path / "my_methods" / "cb_focal.py"
    path.parent.mkdir()
    path.write_text(_docs_example())
    load_script(path, "my_cb_focal")  # registers the method, as a user's own file would
    assert "cb_focal_balanced" in list_methods()
    out = tmp_path / "run"
    cfg = RunConfig(backbone="test_resnet", pretrained=False, dataset="digits", image_size=32, max_per_class=40,
                    imbalance_ratio=10, test_per_class=10, batch_size=64, stage1_epochs=1, stage2_epochs=2,
                    stage2_batch_size=64, method="cb_focal_balanced", output_dir=str(out))
    results = run(cfg)
    assert results["method"] == "cb_focal_balanced" and len(results["stage2"]["history"]) == 2
    recorded = RunConfig.from_yaml(out / "run_config.yaml")
    assert (recorded.sampler, recorded.loss, recorded.stage2_lr) == ("balanced", "cb", 0.2)
    assert json.loads((out / "model" / "config.json").read_text())["method"] == "cb_focal_balanced"
    assert math.isfinite(results["test"]["balanced"])


def test_every_registered_method_is_documented() -> None:
    import pih2t_hub.methods  # noqa: F401

    from pih2t_hub.training.cli import build_parser

    docs = (ROOT / "docs" / "methods.md").read_text()
    readme = (ROOT / "README.md").read_text()
    help_text = " ".join(build_parser().format_help().split())
    builtin = [m for m in list_methods() if get_method(m).__module__.startswith("pih2t_hub.")]
    for name in builtin:
        assert f"| `{name}` |" in docs, f"{name} missing from the table in docs/methods.md"
        assert f"`{name}`" in readme, f"{name} missing from the README's method table"
        assert get_method(name).summary and get_method(name).paper
        assert name in help_text, f"{name} missing from --help"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_search_spaces_suggest_each_parameter_once_and_contain_the_recipe() -> None:
    """Optuna returns the first value for a name suggested twice; the recipe must lie inside the searched range."""
    import optuna

    for name in list_methods():
        cls = get_method(name)
        if not cls.__module__.startswith("pih2t_hub."):
            continue
        seen: list[str] = []
        study = optuna.create_study()
        trial = study.ask()
        original = trial._suggest
        trial._suggest = lambda n, d: (seen.append(n), original(n, d))[1]  # type: ignore[method-assign]
        cls.search_space(trial)
        assert len(seen) == len(set(seen)), f"{name} suggests {seen}"
        if cls.recipe is not None:
            low, high, step = cls.epoch_range
            assert low <= cls.recipe.epochs <= high and (cls.recipe.epochs - low) % step == 0, name


def test_pi_h2t_default_distance_is_the_one_chosen_on_validation():
    """The default H2TF candidate is the recorded choice of benchmarks/h2tf_distance.py, recomputed here from
    its per-setting validation scores (best mean rank; ties by mean score)."""
    import json
    import statistics
    from pathlib import Path

    from pih2t_hub.methods.pi_h2t import DEFAULT_DISTANCE, DEFAULT_MAPPING

    study = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h2tf_distance.json")
                       .read_text())
    settings = study["settings"]
    labels = [c for c in next(iter(settings.values())) if "/" in c]
    ranks = {c: [] for c in labels}
    for rows in settings.values():
        for position, c in enumerate(sorted(labels, key=lambda c: -rows[c]["mean"]), start=1):
            ranks[c].append(position)
    best = min(labels, key=lambda c: (statistics.fmean(ranks[c]),
                                      -statistics.fmean(rows[c]["mean"] for rows in settings.values())))
    assert study["chosen"] == best == f"{DEFAULT_DISTANCE}/{DEFAULT_MAPPING}"
    assert "test never read" in study["selection"]


# ============================================================================================ a method's own knobs


@pytest.mark.parametrize("method, kwargs, words", [
    ("h2t", {"bogus_key": 1}, "unknown method_kwargs key(s) 'bogus_key' for method h2t; valid keys: fusion_ratio"),
    ("crt", {"fusion_ratio": 0.3}, "for method crt; valid keys: none (the method has no parameters)"),
    ("pi-h2t", {"distance": "pair"}, "PI-H2T distance 'pair' is not available in stage 2"),
    ("pi-h2t", {"h2tf_mode": "mix"}, "h2tf_mode must be one of 'interpolate', 'replace'; got 'mix'"),
    ("h2t", {"fusion_ratio": 1.5}, "fusion_ratio must lie in [0, 1], got 1.5"),
    ("logit_adjusted_posthoc", {"tau": -1}, "tau must be a finite number >= 0, got -1"),
])
def test_method_kwargs_are_the_methods_parameters_and_bad_ones_are_one_line(method, kwargs, words) -> None:
    with pytest.raises(ValueError) as err:
        _resolved(method, method_kwargs=kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_resolved_config_records_every_parameter_and_the_aliases_fill_them() -> None:
    assert _resolved("h2t").method_kwargs == {"fusion_ratio": 0.25}
    assert _resolved("crt").method_kwargs == {}
    assert _resolved("pi-h2t", h2tf_mode="replace").method_kwargs == {
        "distance": "frequency", "mapping": "fragment", "h2tf_mode": "replace"}
    cfg = RunConfig(fusion_ratio=0.4)  # --fusion-ratio 0.4
    assert (cfg.fusion_ratio, cfg.method_kwargs) == (None, {"fusion_ratio": 0.4})
    assert get_method("h2t")(get_method("h2t").resolve(cfg)).params.fusion_ratio == 0.4
    with pytest.raises(ValueError, match="given twice"):
        RunConfig(fusion_ratio=0.4, method_kwargs={"fusion_ratio": 0.3})


def test_comparison_defaults_and_fusion_methods_come_from_the_registry() -> None:
    from pih2t_hub.methods import fusion_methods

    # the published values the comparison enqueued as every method's first trial, written out: γ 2 (focal),
    # β 0.9999 (cb), max margin 0.5 (LDAM), τ 1 (logit adjustment), p 0.25 (H2T), PI-H2T's distance / mapping / mode
    published = {"tau": 1.0, "gamma": 2.0, "beta": 0.9999, "max_m": 0.5, "fusion_ratio": 0.25,
                 "h2tf_mode": "interpolate", "distance": "frequency", "mapping": "fragment"}
    searched = {"focal": ["gamma"], "cb": ["beta"], "ldam_drw": ["max_m"], "logit_adjusted": ["tau"],
                "logit_adjusted_posthoc": ["tau"], "h2t": ["fusion_ratio"], "h2t_bsm": ["fusion_ratio"],
                "pi-h2t": ["h2tf_mode", "distance", "mapping"]}
    for name in ("ce", "crt", "crt_progressive", "lws", "balanced_softmax", "harmonized", "ncm", "tau_norm", "dlsa",
                 *searched):
        assert get_method(name).default_trial() == {k: published[k] for k in searched.get(name, [])}, name
    assert fusion_methods() == ["h2t", "pi-h2t"]  # h2t_bsm's loss is fixed: it is not an "X + H2T" partner


def test_ldam_drw_records_the_derived_reweighting_epoch() -> None:
    for epochs, drw in [(10, 8), (200, 160), (7, 5)]:
        cfg = _resolved("ldam_drw", stage2_epochs=epochs)
        ctx = _ctx(cfg, [50, 20, 5])
        assert get_method("ldam_drw")(cfg).make_loss(ctx).drw_epoch == drw == int(0.8 * epochs)
        assert ctx.results["derived_loss_kwargs"] == {"drw_epoch": drw}
    cfg = _resolved("ldam_drw", stage2_epochs=10, loss_kwargs={"drw_epoch": 3})  # given: nothing derived
    ctx = _ctx(cfg, [50, 20, 5])
    assert get_method("ldam_drw")(cfg).make_loss(ctx).drw_epoch == 3 and "derived_loss_kwargs" not in ctx.results


def test_deferred_reweighting_has_one_meaning() -> None:
    """``drw_epoch``: the first weighted epoch; 0 from the start, None never, for cb and LDAM alike."""
    from pih2t_hub.losses import build_loss

    counts = [50, 20, 5]
    for name, kwargs in [("cb", {}), ("ldam", {"drw_epoch": 0})]:
        assert build_loss(name, class_counts=counts, **kwargs).weights_active  # from the start
    for name in ("cb", "ldam"):
        loss = build_loss(name, class_counts=counts, drw_epoch=None)
        loss.set_epoch(10 ** 6)
        assert not loss.weights_active  # never
        loss = build_loss(name, class_counts=counts, drw_epoch=4)
        loss.set_epoch(3)
        assert not loss.weights_active
        loss.set_epoch(4)
        assert loss.weights_active
