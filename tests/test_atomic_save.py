"""Files and model folders are replaced whole or not at all: a full disk during a re-save keeps the old ones."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from pih2t_hub import create_model
from pih2t_hub._atomic import atomic_folder, atomic_write, atomic_write_bytes, atomic_write_text, swap_folder
from pih2t_hub.hub.save import ModelFolderError, save_model_folder, save_run_outputs, verify_model_folder


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model("test_resnet", num_labels=5).eval()


def _digest(folder: Path) -> dict[str, str]:
    """Every file of a folder and its SHA-256 (recomputed here, independently of the code under test)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForImageClassification

    with torch.no_grad():
        return AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=x).logits


X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _full_disk(monkeypatch) -> None:
    """Weights writes raise ENOSPC after writing part of the file, as a full disk does (config.json is written
    before the weights, so this is the order in which the defect mixed the two runs)."""
    import transformers.modeling_utils as mu

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mu, "safe_save_file", failing)


def test_full_disk_on_resave_leaves_the_previous_model_intact(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "model"
    old = _model(0)
    save_model_folder(old, dest, extra_files={"README.md": "old card"})
    before, logits_before = _digest(dest), _logits(dest, X)
    new = _model(1)
    assert not torch.equal(new(pixel_values=X).logits, old(pixel_values=X).logits)  # the save would change them

    _full_disk(monkeypatch)
    with pytest.raises(OSError) as err:
        save_model_folder(new, dest, extra_files={"README.md": "new card"})
    assert err.value.errno == errno.ENOSPC
    assert _digest(dest) == before  # every file, config.json included, is the old one
    torch.testing.assert_close(_logits(dest, X), logits_before, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp sibling left behind


def test_resave_replaces_the_whole_folder(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    save_model_folder(_model(0), dest, extra_files={"README.md": "old", "stale.txt": b"only in the old folder"})
    new = _model(1)
    save_model_folder(new, dest, extra_files={"README.md": "new", "plot.png": lambda p: p.write_bytes(b"png")})
    assert (dest / "README.md").read_text() == "new" and (dest / "plot.png").read_bytes() == b"png"
    assert not (dest / "stale.txt").exists()  # swapped, not merged
    with torch.no_grad():  # a reloaded model may take another kernel path: equal to float rounding, not bitwise
        torch.testing.assert_close(_logits(dest, X), new(pixel_values=X).logits, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_that_does_not_hold_the_model_is_never_swapped_in(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    save_model_folder(_model(0), dest)
    before = _digest(dest)

    def flip_a_weight(path: Path) -> None:  # a silent corruption between writing and the swap
        from safetensors.torch import load_file, save_file

        weights = load_file(str(path.parent / "model.safetensors"))
        key = sorted(weights)[0]
        weights[key] = weights[key] + 1
        save_file(weights, str(path.parent / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ModelFolderError, match="differs from the model"):
        save_model_folder(_model(1), dest, extra_files={"corrupt": flip_a_weight})
    assert _digest(dest) == before


def test_verify_reports_missing_tensors_and_a_bad_config(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _model(0)
    model.save_pretrained(tmp_path / "m")
    verify_model_folder(tmp_path / "m", model)
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    weights.pop(sorted(weights)[-1])
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="lacks 1 tensors"):
        verify_model_folder(tmp_path / "m", model)
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(ModelFolderError, match="config.json does not load"):
        verify_model_folder(tmp_path / "m", model)


def test_run_outputs_are_one_unit(tmp_path: Path, monkeypatch) -> None:
    """results.json and run_config.yaml change only together with the model folder."""
    save_run_outputs(tmp_path, _model(0), side_files={"results.json": '{"run": 1}', "run_config.yaml": "seed: 0\n"})
    before = _digest(tmp_path)
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        save_run_outputs(tmp_path, _model(1), side_files={"results.json": '{"run": 2}', "run_config.yaml": "seed: 1\n"})
    assert _digest(tmp_path) == before
    monkeypatch.undo()
    save_run_outputs(tmp_path, _model(1), side_files={"results.json": '{"run": 2}'})
    assert (tmp_path / "results.json").read_text() == '{"run": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json", "run_config.yaml"]


def test_atomic_folder_and_swap_primitives(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with atomic_folder(dest) as stage:
        (stage / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as stage:
            (stage / "a").write_text("2")
            raise RuntimeError("writer failed")
    assert (dest / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "b").write_text("3")
    swap_folder(other, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and not other.exists()


def test_a_failed_file_write_keeps_the_old_bytes_and_leaves_no_temp_file(tmp_path: Path) -> None:
    dest = tmp_path / "results.json"
    old = b'{"run": 1}\n\x00\xff'  # not valid UTF-8: compared as bytes, not as text
    dest.write_bytes(old)

    def full_disk(handle) -> None:  # half the new content reaches the temp file, then the disk is full
        handle.write(b'{"run": 2')
        assert dest.read_bytes() == old  # the new bytes go to a temp sibling, never over the old file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))

    with pytest.raises(OSError) as err:
        atomic_write(dest, full_disk)
    assert err.value.errno == errno.ENOSPC
    assert dest.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_file_write_puts_the_new_bytes_in_place_with_ordinary_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "card.md"
    dest.write_bytes(b"old")
    assert atomic_write_bytes(dest, b"\x89PNG\r\n") == dest
    assert dest.read_bytes() == b"\x89PNG\r\n"
    atomic_write_text(dest, "r\u00e9sum\u00e9\nline 2\n")
    assert dest.read_bytes() == "r\u00e9sum\u00e9\nline 2\n".encode("utf-8")  # UTF-8, line ends untranslated
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]


def test_a_file_write_needs_an_existing_folder(tmp_path: Path) -> None:
    """The primitive never creates folders (it would bring back one that was removed on purpose)."""
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "gone" / "trainer_state.json", "{}")
    assert not (tmp_path / "gone").exists()


def test_json_and_published_folders_go_through_the_one_module(tmp_path: Path) -> None:
    """JSON (checkpoints, results) and a folder written by other code (the timm export) use the same file write
    and the same swap: complete or absent, ordinary permissions, an existing folder only replaced when asked."""
    import json
    import tempfile

    from pih2t_hub._atomic import atomic_write_json, publish_folder
    from pih2t_hub.training.checkpoint import write_atomic_json

    assert write_atomic_json is atomic_write_json
    path = atomic_write_json(tmp_path / "new" / "r.json", {"b": 1, "a": float("nan")}, parents=True)
    assert path.read_text() == '{\n  "a": NaN,\n  "b": 1\n}'  # indent 2, sorted keys, as json.dumps writes them
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]

    target = tmp_path / "timm"
    for content in ("1", "2"):
        staged = Path(tempfile.mkdtemp(prefix=".timm.", dir=tmp_path))  # 0700, as mkdtemp makes it
        (staged / "config.json").write_text(content)
        publish_folder(staged, target, overwrite=True)
        assert (target / "config.json").read_text() == content and not staged.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    staged = Path(tempfile.mkdtemp(prefix=".timm.", dir=tmp_path))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        publish_folder(staged, target, overwrite=False)
    assert (target / "config.json").read_text() == "2"
