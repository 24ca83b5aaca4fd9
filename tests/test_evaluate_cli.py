"""``recipes/evaluate.py`` on bad input: one ``error: ...`` line (exit code 2) naming the problem, never a traceback
or a number computed from the wrong thing; and on good input, class names met by name or by an explicit map.

One tiny run (random ``test_resnet`` on scikit-learn's digits) is trained once for the module; each case copies or
damages its model folder, or points the recipe at a small image folder made in the test.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

TINY = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", "digits", "--image-size", "32",
        "--max-per-class", "60", "--imbalance-ratio", "10", "--test-per-class", "20", "--method", "ce",
        "--stage1-mode", "linear", "--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "64"]

evaluate = load_script("recipes/evaluate.py", "evaluate_errors")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The output folder of one finished tiny run (its ``model/`` and ``run_config.yaml``)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert load_script("recipes/finetune.py", "finetune_for_evaluate").main(TINY + ["--output-dir", str(out)]) == 0
    return out


def _image_folder(root: Path, names: list[str], per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(rng.normal(40 + 50 * c, 30, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def _refused(argv: list[str], capsys) -> str:
    """Run the recipe; it must exit 2 with one ``error:`` line as the last stderr line and print no table."""
    capsys.readouterr()
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]], captured.err
    assert lines[-1].startswith("error: ") and "Traceback" not in captured.err
    assert captured.out == ""  # refused before any evaluation: no table
    return lines[-1]


def _damage(model: Path, how: str, marker: Path) -> None:
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if how == "header":
        weights.write_bytes(data[:20])
    elif how == "tail":
        weights.write_bytes(data[:-1000])
    elif how == "config":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "num_labels": "ten"}))
    elif how == "pickle":
        class Payload:  # unpickling it would create the marker file
            def __reduce__(self):
                return (open, (str(marker), "w"))

        weights.unlink()
        (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))


@pytest.mark.parametrize("how, words", [
    ("header", "model.safetensors is damaged or truncated"),
    ("tail", "model.safetensors is damaged or truncated"),
    ("config", "config.json: num_labels is 'ten' (a string), the config expects a number"),
    ("pickle", "only pickled weights (pytorch_model.bin), which are not loaded"),
])
def test_a_damaged_model_folder_is_one_line(run: Path, tmp_path: Path, capsys, how: str, words: str) -> None:
    model = tmp_path / "run" / "model"
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "features"))
    marker = tmp_path / "pickle_was_executed"
    _damage(model, how, marker)
    assert words in _refused(["--model", str(model)], capsys)
    assert not marker.exists()


def test_a_missing_model_folder_does_not_exist(tmp_path: Path, capsys) -> None:
    for name in (str(tmp_path / "no" / "model"), "outputs/no_such_run/model"):
        assert _refused(["--model", name], capsys) == f"error: model folder {name} does not exist"


def test_a_missing_split_lists_the_splits(run: Path, tmp_path: Path, capsys) -> None:
    err = _refused(["--model", str(run / "model"), "--split", "validation"], capsys)
    assert "no split 'validation'" in err and "train, val, test" in err
    folder = _image_folder(tmp_path / "pets", ["cat", "dog"])
    err = _refused(["--model", str(run / "model"), "--dataset", str(folder), "--split", "validation"], capsys)
    assert "no split 'validation'" in err and "['train']" in err


@pytest.mark.parametrize("value", ["0", "-4", "two"])
def test_a_bad_batch_size_is_one_line(run: Path, capsys, value: str) -> None:
    err = _refused(["--model", str(run / "model"), "--batch-size", value], capsys)
    assert err.startswith("error: argument --batch-size:") and "positive integer" in err


def test_json_into_a_missing_folder_is_refused_before_the_evaluation(run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "no_such_folder" / "eval.json"
    err = _refused(["--model", str(run / "model"), "--json", str(target)], capsys)
    assert err == f"error: --json: folder {target.parent} does not exist"
    assert not target.parent.exists()


def test_json_is_written_whole_and_progress_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    """stderr is no terminal under pytest: the evaluation's progress is one line, with no carriage return."""
    target = tmp_path / "eval.json"
    capsys.readouterr()
    assert evaluate.main(["--model", str(run / "model"), "--json", str(target), "--batch-size", "64"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("evaluate test")]
    assert len(lines) == 1 and lines[0].startswith("evaluate test: 200/200 ")  # 10 classes x 20 images, all done
    assert "Loading weights" not in err
    record = json.loads(target.read_text())
    assert len(record["per_class"]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary file left behind


def _predictions(model: Path, folder: Path) -> tuple[np.ndarray, list[str]]:
    """The model's class for every image of an image folder, and the folder's class name of each image."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification

    import pih2t_hub  # noqa: F401  (registers the Auto classes)
    from pih2t_hub.data.transforms import build_transform

    net = AutoModelForImageClassification.from_pretrained(model).eval()
    transform = build_transform(net.config.backbone_data_config, train=False)
    paths = sorted(folder.glob("*/*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return net(pixel_values=x).logits.argmax(-1).numpy(), [p.parent.name for p in paths]


def test_label_names_that_differ_are_refused_unless_mapped(run: Path, tmp_path: Path, capsys) -> None:
    model = run / "model"
    pets = _image_folder(tmp_path / "pets", ["cat", "dog"])
    base = ["--model", str(model), "--dataset", str(pets), "--split", "train", "--json", str(tmp_path / "e.json")]
    err = _refused(base, capsys)
    assert "['cat', 'dog']" in err and "--label-map" in err and "--ignore-label-names" in err
    assert "'doge'" in _refused(base + ["--label-map", "{doge: '3'}"], capsys)
    assert "['cat -> seven', 'dog'] (2) meet no model class" in _refused(base + ["--label-map", "{cat: seven}"], capsys)
    assert "not both" in _refused(base + ["--label-map", "{cat: '3'}", "--ignore-label-names"], capsys)

    preds, names = _predictions(model, pets)
    mapped = {"cat": 3, "dog": 5}
    (tmp_path / "map.yaml").write_text("cat: '3'\ndog: '5'\n")
    for extra, target in [(["--label-map", "{cat: '3', dog: '5'}"], mapped),
                          (["--label-map", str(tmp_path / "map.yaml")], mapped),
                          (["--ignore-label-names"], {"cat": 0, "dog": 1})]:
        assert evaluate.main(base + extra) == 0
        per_class = json.loads((tmp_path / "e.json").read_text())["per_class"]
        for name, c in target.items():
            expected = np.mean([p == c for p, n in zip(preds, names) if n == name])
            assert per_class[c] == pytest.approx(expected, abs=1e-12), (extra, name)
        assert sum(not np.isnan(a) for a in per_class) == 2  # the other eight classes have no images


def test_a_subset_of_the_models_classes_is_met_by_name(run: Path, tmp_path: Path) -> None:
    """Folders named '3' and '7' are dataset ids 0 and 1: evaluated as the model's classes 3 and 7, by name."""
    folder = _image_folder(tmp_path / "digits", ["3", "7"])
    target = tmp_path / "e.json"
    assert evaluate.main(["--model", str(run / "model"), "--dataset", str(folder), "--split", "train",
                          "--json", str(target)]) == 0
    per_class = json.loads(target.read_text())["per_class"]
    preds, names = _predictions(run / "model", folder)
    for name in ("3", "7"):
        expected = np.mean([p == int(name) for p, n in zip(preds, names) if n == name])
        assert per_class[int(name)] == pytest.approx(expected, abs=1e-12)
    assert [i for i, a in enumerate(per_class) if not np.isnan(a)] == [3, 7]
