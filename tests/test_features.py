"""Feature cache: resumable extraction (same bytes), stale-cache rebuild, fp16, views, memory-mapped reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as TorchDataset

from pih2t_hub.data import FeatureCache, load_or_extract

N, DIM_IN, DIM_OUT = 50, 6, 4
MANIFEST = {"backbone": "toy-linear", "weights": "w-v1", "transform": "identity", "dataset": "toy-50"}
WEIGHT = torch.randn(DIM_IN, DIM_OUT, generator=torch.Generator().manual_seed(0))


class Toy(TorchDataset):
    """Deterministic inputs; ``noise=True`` adds global-RNG noise like a random augmentation would."""

    def __init__(self, noise: bool = False) -> None:
        self.x = torch.arange(N * DIM_IN, dtype=torch.float32).reshape(N, DIM_IN) / 100
        self.y = torch.arange(N) % 5
        self.noise = noise

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        x = self.x[i] + (torch.rand(DIM_IN) if self.noise else 0)
        return {"pixel_values": x, "labels": int(self.y[i])}


class Encoder:
    """Counts calls; optionally raises after ``fail_after`` batches (a simulated crash)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return x @ WEIGHT


def extract(cache_dir, encode=None, dataset=None, **kwargs) -> FeatureCache:
    kwargs = {"batch_size": 4, "shard_size": 8, "progress": False, "num_workers": 0, **kwargs}
    return load_or_extract(encode or Encoder(), dataset or Toy(), cache_dir, kwargs.pop("manifest", MANIFEST), **kwargs)


def files_bytes(cache: FeatureCache) -> tuple[bytes, bytes]:
    return (cache.cache_dir / "features.npy").read_bytes(), (cache.cache_dir / "labels.npy").read_bytes()


def test_values_layout_and_reuse(tmp_path):
    encode = Encoder()
    cache = extract(tmp_path, encode)
    data = Toy()
    assert len(cache) == N and cache.features.shape == (N, DIM_OUT) and cache.features.dtype == np.float32
    np.testing.assert_allclose(cache.features, (data.x @ WEIGHT).numpy(), rtol=1e-6)
    assert cache.labels.tolist() == data.y.tolist()
    assert isinstance(cache.features, np.memmap)
    assert encode.calls == 2 * 6 + 1  # 6 full shards of 8 (2 batches each) + one shard of 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy", "labels.npy", "manifest.json"]
    again = Encoder()
    assert np.array_equal(extract(tmp_path, again).features, cache.features)
    assert again.calls == 0  # a complete, matching cache is reused
    x, y = cache.as_tensor_dataset()[7]
    assert torch.allclose(x, data.x[7] @ WEIGHT) and int(y) == int(data.y[7])


def test_crash_then_resume_gives_same_bytes(tmp_path):
    reference = files_bytes(extract(tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(tmp_path / "run", Encoder(fail_after=5))  # shards 0 and 1 done, shard 2 half way
    assert sorted(p.name for p in (tmp_path / "run").glob("shard-*")) == ["shard-00000.npz", "shard-00001.npz"]
    resumed = Encoder()
    cache = extract(tmp_path / "run", resumed)
    assert resumed.calls == 13 - 4  # the two finished shards were skipped
    assert files_bytes(cache) == reference


def test_killed_process_resumes_to_same_bytes(tmp_path):
    """A real SIGKILL in the middle of extraction, then a resume in this process."""
    reference = files_bytes(extract(tmp_path / "ref"))
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_features import Toy, WEIGHT, MANIFEST
        from pih2t_hub.data import load_or_extract
        def slow(x):
            time.sleep(0.15)
            return x @ WEIGHT
        load_or_extract(slow, Toy(), {str(run_dir)!r}, MANIFEST, batch_size=4, shard_size=8, progress=False)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "shard-00001.npz").exists():
            assert proc.poll() is None, "the extraction process ended early"
            assert time.monotonic() < deadline, "the extraction process made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run_dir / "features.npy").exists()
    resumed = Encoder()
    cache = extract(run_dir, resumed)
    assert 0 < resumed.calls < 13
    assert files_bytes(cache) == reference


@pytest.mark.parametrize("change", [{"transform": "resize-48"}, {"weights": "w-v2"}, {"dataset": "toy-51"}])
def test_changed_manifest_rebuilds(tmp_path, change):
    extract(tmp_path)
    encode = Encoder()
    cache = extract(tmp_path, encode, manifest={**MANIFEST, **change})
    assert encode.calls == 13  # recomputed from scratch, never silently reused
    assert cache.manifest["request"]["transform"] == {**MANIFEST, **change}["transform"]
    with pytest.raises(ValueError, match="different request"):
        FeatureCache.open(tmp_path, manifest=MANIFEST)


def test_changed_options_rebuild(tmp_path):
    extract(tmp_path)
    encode = Encoder()
    extract(tmp_path, encode, batch_size=4, shard_size=16)
    assert encode.calls == 13
    encode = Encoder()
    extract(tmp_path, encode, shard_size=16, dtype="float16")
    assert encode.calls == 13


def test_hf_dataset_fingerprint_is_used(tmp_path):
    from datasets import Dataset

    def as_hf(offset: float) -> Dataset:
        ds = Dataset.from_dict({"x": (Toy().x + offset).tolist(), "labels": Toy().y.tolist()})
        return ds.with_format("torch", columns=["x", "labels"]).rename_column("x", "pixel_values")

    manifest = {k: v for k, v in MANIFEST.items() if k != "dataset"}
    first = extract(tmp_path, dataset=as_hf(0.0), manifest=manifest)
    assert first.manifest["request"]["dataset"] == as_hf(0.0)._fingerprint
    encode = Encoder()
    second = extract(tmp_path, encode, dataset=as_hf(1.0), manifest=manifest)
    assert encode.calls == 13
    np.testing.assert_allclose(second.features, ((Toy().x + 1.0) @ WEIGHT).numpy(), rtol=1e-5)


def test_fp16_storage(tmp_path):
    cache = extract(tmp_path, dtype=torch.float16)
    assert cache.features.dtype == np.float16
    assert np.array_equal(cache.features, (Toy().x @ WEIGHT).numpy().astype(np.float16))
    assert cache.as_tensor_dataset()[0][0].dtype == torch.float16


def test_views_are_random_but_reproducible_after_a_crash(tmp_path):
    state = torch.get_rng_state()
    reference = extract(tmp_path / "ref", dataset=Toy(noise=True), num_views=3)
    assert torch.equal(state, torch.get_rng_state())  # global RNG restored
    assert reference.features.shape == (N, 3, DIM_OUT) and reference.feature_shape == (DIM_OUT,)
    assert not np.allclose(reference.features[:, 0], reference.features[:, 1])
    with pytest.raises(RuntimeError):
        extract(tmp_path / "run", Encoder(fail_after=20), dataset=Toy(noise=True), num_views=3)
    resumed = extract(tmp_path / "run", dataset=Toy(noise=True), num_views=3)
    assert files_bytes(resumed) == files_bytes(reference)
    flat = reference.as_tensor_dataset()
    assert len(flat) == 3 * N
    assert torch.equal(flat[3 * 5 + 2][0], torch.from_numpy(np.array(reference.features[5, 2])))
    assert len(reference.as_tensor_dataset(view=1)) == N


def test_unpooled_feature_maps(tmp_path):
    cache = extract(tmp_path, lambda x: x.reshape(len(x), 2, 3, 1))
    assert cache.features.shape == (N, 2, 3, 1) and cache.feature_shape == (2, 3, 1)


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="manifest lacks"):
        extract(tmp_path, manifest={"backbone": "x"})
    with pytest.raises(ValueError, match="fingerprint"):
        extract(tmp_path, manifest={k: v for k, v in MANIFEST.items() if k != "dataset"})
    with pytest.raises(ValueError, match="bfloat16"):
        extract(tmp_path, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="JSON"):
        extract(tmp_path, manifest={**MANIFEST, "transform": object()})
    with pytest.raises(ValueError, match="encode must return"):
        extract(tmp_path, lambda x: x[:1])
    with pytest.raises(FileNotFoundError):
        FeatureCache.open(tmp_path / "nothing")


def test_only_own_files_are_removed(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    extract(tmp_path)
    extract(tmp_path, manifest={**MANIFEST, "transform": "other"})
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_end_to_end_image_dataset_with_timm_backbone(tmp_path):
    """digits -> with_transform -> a tiny random timm backbone; a changed transform rebuilds the cache."""
    import timm

    from pih2t_hub.data import apply_transform, build_transform, load_digits_dataset

    digits = load_digits_dataset().select(range(24))
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0}
    manifest = {"backbone": "resnet10t", "weights": "random"}
    transform = build_transform(cfg)
    cache = load_or_extract(model, apply_transform(digits, transform), tmp_path,
                            {**manifest, "transform": repr(transform)}, batch_size=8, progress=False)
    assert cache.features.shape == (24, model.num_features)
    assert cache.labels.tolist() == digits["label"][:]
    with torch.no_grad():
        first = model(transform(digits[0]["image"])[None])[0].numpy()
    np.testing.assert_allclose(cache.features[0], first, rtol=1e-4, atol=1e-5)

    smaller = build_transform(cfg, input_size=28)
    calls = []
    rebuilt = load_or_extract(lambda x: calls.append(len(x)) or model(x), apply_transform(digits, smaller), tmp_path,
                              {**manifest, "transform": repr(smaller)}, batch_size=8, progress=False)
    assert sum(calls) == 24 and rebuilt.manifest["request"]["transform"] == repr(smaller)


# ---------------------------------------------------------------------------------------------- CacheRowReader


def _mapped_paths() -> set[str]:
    with open("/proc/self/maps") as handle:
        return {line.split(maxsplit=5)[-1].strip() for line in handle if len(line.split()) >= 6}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_reader_returns_the_stored_rows_in_request_order(tmp_path, dtype):
    """Rows read by pread equal the file read whole by NumPy (no mmap), in any order, with repeats and negatives."""
    from torch.utils.data import DataLoader

    from pih2t_hub.data.features import CacheRowReader
    from pih2t_hub.data.samplers import DualBranchDataset, DualBranchSampler

    extract(tmp_path, dtype=dtype)
    whole = np.load(tmp_path / "features.npy", allow_pickle=False)  # independent full read
    labels = np.load(tmp_path / "labels.npy", allow_pickle=False)
    reader = CacheRowReader(tmp_path)
    assert len(reader) == N and reader.labels.tolist() == labels.tolist()
    order = [7, 3, 49, 3, 0, -1]
    rows = reader.read(order)
    assert rows.dtype == np.dtype(dtype) and rows.shape == (6, DIM_OUT)
    assert np.array_equal(rows, whole[[7, 3, 49, 3, 0, 49]])
    x, y = reader[12]
    assert np.array_equal(x.numpy(), whole[12]) and int(y) == labels[12]

    # a dual-branch loader over the reader gives the same batches as over the memory-mapped TensorDataset
    sampler = DualBranchSampler(labels, seed=3)
    def batches(base):
        return list(DataLoader(DualBranchDataset(base), batch_size=16, sampler=sampler))
    for ours, mapped in zip(batches(reader), batches(FeatureCache.open(tmp_path).as_tensor_dataset())):
        for branch in ("fused", "fusing"):
            assert torch.equal(ours[branch][0], mapped[branch][0]) and torch.equal(ours[branch][1], mapped[branch][1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_row_reader_never_maps_the_feature_file(tmp_path):
    """The point of the reader: reading every row leaves the file unmapped, so it adds nothing to RSS."""
    from pih2t_hub.data.features import CacheRowReader

    extract(tmp_path)
    reader = CacheRowReader(tmp_path)
    reader.read(np.arange(N)[::-1])
    assert str((tmp_path / "features.npy").resolve()) not in _mapped_paths()
    mapped = FeatureCache.open(tmp_path)  # contrast: the ordinary cache does map it
    assert str((tmp_path / "features.npy").resolve()) in _mapped_paths()
    del mapped


def test_row_reader_views_and_bad_input(tmp_path):
    from pih2t_hub.data.features import CacheRowReader

    extract(tmp_path, dataset=Toy(noise=True), num_views=3)
    whole = np.load(tmp_path / "features.npy", allow_pickle=False)  # (N, 3, D)
    labels = np.load(tmp_path / "labels.npy", allow_pickle=False)
    assert np.array_equal(CacheRowReader(tmp_path, view=2).read([5, 1]), whole[[5, 1], 2])
    flat = CacheRowReader(tmp_path)
    assert len(flat) == 3 * N
    assert np.array_equal(flat.read([3 * 5 + 1]), whole[5, 1][None])  # sample 5, view 1
    assert flat.labels.tolist() == np.repeat(labels, 3).tolist()
    with pytest.raises(ValueError, match="view"):
        CacheRowReader(tmp_path, view=3)
    with pytest.raises(IndexError, match="out of range"):
        flat.read([3 * N])
    with pytest.raises(TypeError, match="integers"):
        flat.read([0.5])
    with pytest.raises(FileNotFoundError, match="no complete feature cache"):
        CacheRowReader(tmp_path / "missing")
