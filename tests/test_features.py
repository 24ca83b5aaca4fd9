"""Feature cache: resumable extraction (same bytes), stale-cache rebuild, fp16, views, memory-mapped reads."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------------------------- integrity


def _reference_bytes(tmp_path) -> tuple[bytes, bytes]:
    return files_bytes(extract(tmp_path / "ref"))


def test_manifest_records_per_shard_checksums_and_value_summary(tmp_path):
    """Checksums and statistics recomputed here from the file, independently of the writer."""
    import hashlib

    cache = extract(tmp_path, dataset=Toy(noise=True))
    raw = (tmp_path / "features.npy").read_bytes()
    with open(tmp_path / "features.npy", "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        header = handle.tell()
    row = DIM_OUT * 4
    blocks = [hashlib.sha256(raw[header + k * 8 * row : header + min(N, (k + 1) * 8) * row]).hexdigest()
              for k in range(7)]  # 6 shards of 8 rows + one of 2
    stored = json.loads((tmp_path / "manifest.json").read_text())
    record = stored["files"]["features.npy"]
    assert record["bytes"] == len(raw) and record["block_rows"] == 8
    assert record["header_sha256"] == hashlib.sha256(raw[:header]).hexdigest()
    assert record["blocks_sha256"] == blocks
    labels_raw = (tmp_path / "labels.npy").read_bytes()
    assert stored["files"]["labels.npy"] == {"bytes": len(labels_raw), "sha256": hashlib.sha256(labels_raw).hexdigest()}
    values = np.load(tmp_path / "features.npy").astype(np.float64)
    stats = stored["stats"]
    assert stats["values"] == N * DIM_OUT and stats["nonfinite"] == 0
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-5)  # float32 products, float64 totals
    assert stats["zeros"] == int((values == 0).sum())
    assert cache.nbytes == len(raw)


def _zero(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[200:] = bytes(len(data) - 200)  # keep the header, zero the rows
    path.write_bytes(bytes(data))


def _flip(path: Path) -> None:
    """One bit of row 27 (of a features file), or of the middle byte (any other file)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    if path.name == "features.npy":
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            np.lib.format.read_array_header_1_0(handle)
            offset = handle.tell() + 27 * DIM_OUT * 4 + 1
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 40)


@pytest.mark.parametrize(("damage", "expected"), [(_zero, "rows"), (_flip, "rows 24-31"), (_truncate, "bytes")])
def test_damaged_features_are_reported_in_one_line_and_extracted_again(tmp_path, caplog, damage, expected):
    reference = _reference_bytes(tmp_path)
    run_dir = tmp_path / "run"
    extract(run_dir)
    damage(run_dir / "features.npy")
    encode = Encoder()
    with caplog.at_level("WARNING", logger="pih2t_hub.data.features"):
        cache = extract(run_dir, encode)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(run_dir / "features.npy") in warnings[0] and expected in warnings[0]
    assert encode.calls == 13  # the whole split again
    assert files_bytes(cache) == reference


def test_truncated_or_flipped_files_fail_open_with_the_file_named(tmp_path):
    from pih2t_hub.data.features import CacheIntegrityError, CacheRowReader

    extract(tmp_path)
    _flip(tmp_path / "labels.npy")
    FeatureCache.open(tmp_path)  # sizes only: a flipped bit is found by verify=True
    with pytest.raises(CacheIntegrityError, match="labels.npy fails its SHA-256"):
        FeatureCache.open(tmp_path, verify=True)
    _truncate(tmp_path / "features.npy")
    for opener in (FeatureCache.open, CacheRowReader):  # not NumPy's "mmap length is greater than file size"
        with pytest.raises(CacheIntegrityError, match=r"features.npy has \d+ bytes, its manifest recorded"):
            opener(tmp_path)


def test_corrupt_shard_is_extracted_again(tmp_path, caplog):
    reference = _reference_bytes(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(run_dir, Encoder(fail_after=5))
    _flip(run_dir / "shard-00001.npz")  # the zip CRC catches it when the shard is read
    encode = Encoder()
    with caplog.at_level("WARNING", logger="pih2t_hub.data.features"):
        cache = extract(run_dir, encode)
    assert any("shard-00001.npz is unreadable" in r.getMessage() for r in caplog.records)
    assert encode.calls == 13 - 4 + 2  # shard 0 kept, shard 1 extracted again
    assert files_bytes(cache) == reference


# ---------------------------------------------------------------------------------------------- input pipeline


def test_workers_and_batch_size_do_not_change_the_bytes(tmp_path):
    """Random views are seeded per sample: 2 workers with batch 3 give the bytes of 0 workers with batch 4."""
    reference = files_bytes(extract(tmp_path / "ref", dataset=Toy(noise=True), num_views=2))
    cache = extract(tmp_path / "workers", dataset=Toy(noise=True), num_views=2, num_workers=2, batch_size=3)
    assert files_bytes(cache) == reference
    assert (tmp_path / "ref" / "manifest.json").read_bytes() == (tmp_path / "workers" / "manifest.json").read_bytes()


def test_default_workers_follow_the_cores_per_process(monkeypatch):
    from pih2t_hub.data.features import default_num_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers() == max(0, min(8, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert default_num_workers() == 0  # one core each: decode in the process itself


def test_channels_last_and_autocast_are_part_of_the_request(tmp_path):
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.manual_seed(0)
    images = torch.randn(12, 3, 8, 8)
    data = torch.utils.data.TensorDataset(images, torch.arange(12) % 3)
    seen_formats = []

    def encode(x):
        seen_formats.append(x.is_contiguous(memory_format=torch.channels_last))
        return conv(x)

    manifest = {**MANIFEST, "dataset": "conv-12"}
    plain = extract(tmp_path / "plain", encode, dataset=data, manifest=manifest, device="cpu")
    assert plain.manifest["request"]["channels_last"] is False and plain.manifest["request"]["autocast"] is None
    assert plain.manifest["extracted_on"] == "cpu" and not any(seen_formats)
    last = extract(tmp_path / "last", encode, dataset=data, manifest=manifest, device="cpu", channels_last=True)
    assert last.manifest["request"]["channels_last"] is True and all(seen_formats[-3:])
    with torch.no_grad():
        expected = conv(images).numpy()
    np.testing.assert_allclose(last.features, expected, rtol=1e-5, atol=1e-6)
    bf16 = extract(tmp_path / "bf16", encode, dataset=data, manifest=manifest, device="cpu", autocast="bf16")
    assert bf16.manifest["request"]["autocast"] == "bf16"
    np.testing.assert_allclose(bf16.features, expected, rtol=0.05, atol=0.02)  # bf16 keeps ~3 significant digits
    assert not np.array_equal(bf16.features, plain.features)
    with pytest.raises(ValueError, match="autocast needs device"):
        extract(tmp_path / "x", encode, dataset=data, manifest=manifest, autocast="fp16")
    with pytest.raises(ValueError, match="autocast must be"):
        extract(tmp_path / "x", encode, dataset=data, manifest=manifest, device="cpu", autocast="int8")


def test_bad_process_options(tmp_path):
    with pytest.raises(ValueError, match="rank < world_size"):
        extract(tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        extract(tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="num_workers"):
        extract(tmp_path, num_workers=-1)


# ---------------------------------------------------------------------------------------------- training reads


def test_open_for_training_switches_to_pread_above_the_threshold(tmp_path):
    from pih2t_hub.data.features import CacheRowReader, open_for_training

    cache = extract(tmp_path)
    small = open_for_training(cache, threshold_bytes=cache.nbytes)
    large = open_for_training(cache, threshold_bytes=cache.nbytes - 1)
    assert isinstance(small, torch.utils.data.TensorDataset) and isinstance(large, CacheRowReader)
    assert isinstance(open_for_training(tmp_path), torch.utils.data.TensorDataset)  # default threshold: 256 MiB
    whole = np.load(tmp_path / "features.npy")
    for k in (0, 17, 49):
        assert np.array_equal(large[k][0].numpy(), whole[k]) and int(large[k][1]) == int(small[k][1])
    for a, b in zip(small.tensors, large.tensors):  # the columns, for prototypes / tau-norm
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="threshold_bytes"):
        open_for_training(cache, threshold_bytes=-1)


# ---------------------------------------------------------------------------------------------- several processes

RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    import torch, torch.distributed as dist
    tests, out, kill_rank, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sys.path.insert(0, tests)
    from test_features import Toy, WEIGHT, MANIFEST
    from pih2t_hub.data import load_or_extract
    dist.init_process_group("gloo")
    rank, images = dist.get_rank(), []
    def encode(x):
        if rank == kill_rank and len(images) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-extraction
        images.append(len(x))
        return x @ WEIGHT
    cache = load_or_extract(encode, Toy(noise=True), out, MANIFEST, batch_size=4, shard_size=8, num_views=2,
                            num_workers=0, progress=False)
    whole = hashlib.sha256(cache.features.tobytes()).hexdigest()  # what this rank reads: the whole cache
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"encoded": sum(images), "rows": len(cache), "sha256": whole}, handle)
    dist.destroy_process_group()
""")


def _launch_two(tmp_path: Path, out: Path, kill_rank: int = -1, kill_after: int = 0) -> subprocess.Popen:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    log = open(tmp_path / f"torchrun-{out.name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(Path(__file__).parent), str(out), str(kill_rank), str(kill_after)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_processes_write_the_bytes_of_one_each_extracting_half(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) against one process; every file is compared byte for byte."""
    import hashlib

    two = tmp_path / "two"
    proc = _launch_two(tmp_path, two)
    one = extract(tmp_path / "one", dataset=Toy(noise=True), num_views=2)  # meanwhile, in this process
    assert _wait(proc) == 0, (tmp_path / "torchrun-two.log").read_text(errors="replace")[-3000:]
    for name in ("features.npy", "labels.npy", "manifest.json"):
        assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list(two.glob("shard-*"))
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 7 shards (6 of 8 samples, one of 2), split 3 + 4: 24 and 26 of the 50 samples, 2 views each
    assert [r["encoded"] for r in ranks] == [24 * 2, 26 * 2]
    assert sum(r["encoded"] for r in ranks) == 2 * N
    for r in ranks:
        assert 0.4 * 2 * N <= r["encoded"] <= 0.6 * 2 * N  # about half each
        assert r["rows"] == N and r["sha256"] == hashlib.sha256(np.asarray(one.features).tobytes()).hexdigest()


def test_a_killed_rank_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL rank 0 in one 2-process run and rank 1 in another; a resume writes the bytes of an uninterrupted run."""
    runs = {kill: tmp_path / f"killed-rank{kill}" for kill in (0, 1)}
    procs = {kill: _launch_two(tmp_path, out, kill_rank=kill, kill_after=5) for kill, out in runs.items()}
    reference = files_bytes(extract(tmp_path / "ref", dataset=Toy(noise=True), num_views=2))
    for kill, proc in procs.items():
        assert _wait(proc) != 0  # the launcher reports the killed rank and stops the other one
        out = runs[kill]
        assert not (out / "features.npy").exists()
        done = {int(p.stem.split("-")[1]) for p in out.glob("shard-*.npz")}
        assert done != set(range(7))
        # the resume extracts exactly the missing shards: 2 batches of 4 per view for a full shard, 1 for the last
        expected = sum((1 if s == 6 else 2) * 2 for s in range(7) if s not in done)
        encode = Encoder()
        cache = extract(out, encode, dataset=Toy(noise=True), num_views=2)
        assert encode.calls == expected
        assert files_bytes(cache) == reference


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_extraction.py --smoke: every backbone, both precisions, both paths, and the stage-2 epoch."""
    root = Path(__file__).parent.parent
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root),
           "CUDA_VISIBLE_DEVICES": ""}
    script = root / "benchmarks" / "gpu_extraction.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU numbers are pending" in proc.stdout
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["gpu"] is None
    assert set(result["extraction"]) == {"test_efficientnet", "test_resnet", "test_vit"}
    for entry in result["extraction"].values():
        assert entry["outputs_max_abs_diff_fp32"] < 1e-3
        for precision in ("fp32", "bf16"):
            assert all(v > 0 for v in entry[precision]["images_per_second"].values())
    epoch = result["stage2_epoch"]
    assert epoch["steps"] == -(-2000 // 512) and epoch["epoch_seconds_including_validation"] > 0
    # without a GPU and without --smoke, the script refuses instead of reporting CPU numbers as GPU ones
    import runpy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(root / "benchmarks" / "gpu_extraction.py")])
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(root / "benchmarks" / "gpu_extraction.py"), run_name="__main__")
    assert refused.value.code == 2 and "GPU numbers are pending" in capsys.readouterr().out


def test_non_finite_features_are_counted_and_reported(tmp_path, caplog):
    def encode(x):
        out = x @ WEIGHT
        out[0, 1] = float("nan")  # one value per batch
        return out

    with caplog.at_level("WARNING", logger="pih2t_hub.data.features"):
        cache = extract(tmp_path, encode)
    assert cache.manifest["stats"]["nonfinite"] == 13  # 13 batches
    assert any("13 of 200 stored values are NaN or infinite" in r.getMessage() for r in caplog.records)
    finite = np.load(tmp_path / "features.npy").astype(np.float64)
    assert cache.manifest["stats"]["mean"] == pytest.approx(finite[np.isfinite(finite)].mean(), rel=1e-6)
