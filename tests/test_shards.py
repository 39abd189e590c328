"""Shards of precomputed latents + text: round trip, validation errors, resumable loader."""

import json

import pytest
import torch
from safetensors.torch import save_file

from vdistill.methods.data.shards import FORMAT, ShardDataset, ShardLoader, read_shard, write_shard


def _tensors(n=4, c=4, t=2, h=3, w=5, length=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, c, t, h, w, generator=g)
    text = torch.randn(n, length, d, generator=g)
    mask = torch.arange(length).expand(n, length) < torch.randint(1, length + 1, (n, 1), generator=g)
    return latents, text, mask


def _raw(path, tensors, meta=None, **header):
    """Write a safetensors file directly, bypassing write_shard's checks."""
    latents, text = tensors.get("latents"), tensors.get("text")
    meta = meta if meta is not None else {
        "n": latents.shape[0], "latents_shape": list(latents.shape[1:]), "text_shape": list(text.shape[1:]),
        "latents_dtype": str(latents.dtype), "text_dtype": str(text.dtype),
        "has_text_mask": "text_mask" in tensors}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": "1", "meta": json.dumps(meta), **header})
    return path


def test_round_trip_across_shards(tmp_path):
    a, b = _tensors(n=3, seed=0), _tensors(n=5, seed=1)
    write_shard(tmp_path / "s0.safetensors", *a, extra={"encoder": "umt5"})
    write_shard(tmp_path / "s1.safetensors", *b)
    ds = ShardDataset(tmp_path)
    assert len(ds) == 8 and ds.latent_shape == (4, 2, 3, 5) and ds.text_shape == (6, 8)
    assert torch.equal(ds[4][0], b[0][1]) and torch.equal(ds[4][1], b[1][1]) and torch.equal(ds[4][2], b[2][1])
    assert torch.equal(ds[2][0], a[0][2])
    assert ds.meta[0]["extra"] == {"encoder": "umt5"}
    batch = ds.batch([0, 7])
    assert batch.latents.shape == (2, 4, 2, 3, 5) and batch.text_mask.dtype == torch.bool
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_bf16_without_mask(tmp_path):
    latents, text, _ = _tensors()
    write_shard(tmp_path / "x.safetensors", latents.bfloat16(), text.half())
    lat, txt, mask, _ = read_shard(tmp_path / "x.safetensors")
    assert lat.dtype == torch.bfloat16 and txt.dtype == torch.float16 and mask is None
    assert torch.equal(lat, latents.bfloat16())


def test_overwrite_is_atomic_replace(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, *_tensors(seed=0))
    latents = _tensors(seed=1)
    write_shard(path, *latents)
    assert torch.equal(read_shard(path)[0], latents[0])
    with pytest.raises(ValueError, match="NaN"):
        bad = latents[0].clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        write_shard(path, bad, latents[1])
    assert torch.equal(read_shard(path)[0], latents[0]), "failed write damaged the existing shard"


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("garbage", "not a readable safetensors"),
    ("truncated", "not a readable safetensors"),
    ("no_format", "format"),
    ("version", "version"),
    ("no_text", r"missing tensor.*text"),
    ("extra_tensor", "unexpected tensor"),
    ("n_mismatch", "N=4 clips but text has N=3"),
    ("nan", "NaN"),
    ("inf_text", "text contains NaN or Inf"),
    ("rank", "latents must be"),
    ("int_latents", "floating point"),
    ("mask_shape", "text_mask shape"),
    ("mask_dtype", "text_mask must be bool"),
    ("meta_mismatch", "metadata disagrees"),
    ("meta_not_json", "not JSON"),
])
def test_malformed_shard_errors_name_the_file(tmp_path, case, match):
    path = tmp_path / "bad.safetensors"
    latents, text, mask = _tensors()
    good = {"latents": latents, "text": text, "text_mask": mask}
    if case == "garbage":
        path.write_bytes(b"this is not a safetensors file at all")
    elif case == "truncated":
        write_shard(path, latents, text, mask)
        path.write_bytes(path.read_bytes()[:-50])
    elif case == "no_format":
        save_file(good, str(path))
    elif case == "version":
        _raw(path, good, version="99")
    elif case == "no_text":
        _raw(path, {"latents": latents}, meta={})
    elif case == "extra_tensor":
        _raw(path, {**good, "labels": torch.zeros(4)})
    elif case == "n_mismatch":
        _raw(path, {"latents": latents, "text": text[:3]})
    elif case == "nan":
        latents[1, 0, 0, 0, 0] = float("nan")
        _raw(path, good)
    elif case == "inf_text":
        text[0, 0, 0] = float("inf")
        _raw(path, good)
    elif case == "rank":
        _raw(path, {"latents": latents[:, 0], "text": text})
    elif case == "int_latents":
        _raw(path, {"latents": latents.long(), "text": text})
    elif case == "mask_shape":
        _raw(path, {**good, "text_mask": mask[:, :3]})
    elif case == "mask_dtype":
        _raw(path, {**good, "text_mask": mask.float()})
    elif case == "meta_mismatch":
        _raw(path, good, meta={"n": 4, "latents_shape": [9, 9, 9, 9]})
    elif case == "meta_not_json":
        save_file(good, str(path), metadata={"format": FORMAT, "version": "1", "meta": "{oops"})
    with pytest.raises(ValueError, match=match) as info:
        ShardDataset([path])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field, other, match", [
    ("latents", dict(c=8), r"latents \[C, T, H, W\]"),
    ("text", dict(d=16), r"text \[L, D\]"),
    ("text", dict(length=7), r"text \[L, D\]"),
    ("mask", {}, "text_mask present"),
    ("dtype", {}, "latents dtype"),
])
def test_mismatched_shards(tmp_path, field, other, match):
    write_shard(tmp_path / "a.safetensors", *_tensors())
    latents, text, mask = _tensors(**other, seed=1)
    if field == "mask":
        mask = None
    if field == "dtype":
        latents = latents.bfloat16()
    write_shard(tmp_path / "b.safetensors", latents, text, mask)
    with pytest.raises(ValueError, match=match) as info:
        ShardDataset(tmp_path)
    assert "b.safetensors" in str(info.value)


def test_empty_dir_and_write_errors(tmp_path):
    with pytest.raises(ValueError, match="no .safetensors shards"):
        ShardDataset(tmp_path)
    latents, text, _ = _tensors()
    with pytest.raises(ValueError, match="must end in"):
        write_shard(tmp_path / "x.pt", latents, text)
    with pytest.raises(ValueError, match="N=4 clips but text has N=2"):
        write_shard(tmp_path / "x.safetensors", latents, text[:2])
    assert not list(tmp_path.iterdir())


def test_loader_epochs_and_exact_resume(tmp_path):
    write_shard(tmp_path / "a.safetensors", *_tensors(n=5, seed=0))
    write_shard(tmp_path / "b.safetensors", *_tensors(n=5, seed=1))
    ds = ShardDataset(tmp_path)
    loader = ShardLoader(ds, batch_size=3, seed=4)
    flat = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)

    def ids(batch):
        return [int((flat == row).all(1).nonzero()) for row in batch.latents.flatten(1)]

    first_epoch = [i for _ in range(3) for i in ids(next(loader))]  # partial 4th batch is dropped
    assert len(set(first_epoch)) == 9
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    resumed = ShardLoader(ds, batch_size=3, seed=4)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4)), strict=True):
        assert torch.equal(want.latents, got.latents) and torch.equal(want.text_mask, got.text_mask)
    assert loader.epoch == 2
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(ds, batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        ShardLoader(ds, batch_size=11)
