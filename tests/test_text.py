"""Text encoders: determinism, shapes, padding, null embedding, errors."""

import pytest
import torch

from vdistill.methods.data.shapes import all_prompts
from vdistill.methods.data.text import PrecomputedText, TextEncoder, WordTextEncoder


def test_word_encoder_shape_determinism_and_padding():
    enc = WordTextEncoder(dim=64, max_len=8, seed=0)
    assert isinstance(enc, TextEncoder)
    prompts = ["a red circle moving left", "a blue square moving up"]
    e = enc.encode(prompts)
    assert e.shape == (2, 8, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e, WordTextEncoder(dim=64, max_len=8, seed=0).encode(prompts), rtol=0, atol=0)
    assert not torch.equal(e, WordTextEncoder(dim=64, max_len=8, seed=1).encode(prompts))
    assert e[:, 5:].abs().max() == 0 and (e[:, :5].abs().amax(dim=2) > 0).all()


def test_word_encoder_distinguishes_all_prompts():
    enc = WordTextEncoder()
    e = enc.encode(all_prompts()).flatten(1)
    dist = torch.cdist(e, e) + torch.eye(len(e)) * 1e9
    assert dist.min() > 1.0


def test_null_is_empty_prompt():
    enc = WordTextEncoder(dim=16, max_len=6)
    torch.testing.assert_close(enc.null(3), enc.encode(["", "", ""]), rtol=0, atol=0)
    assert enc.null(3).shape == (3, 6, 16)


def test_word_encoder_errors():
    enc = WordTextEncoder(max_len=5)
    with pytest.raises(ValueError, match="unknown word"):
        enc.encode(["a red dragon moving left"])
    with pytest.raises(ValueError, match="max_len"):
        enc.encode(["a red circle moving left left"])
    with pytest.raises(TypeError, match="prompts"):
        enc.encode("a red circle moving left")
    with pytest.raises(ValueError, match="dim"):
        WordTextEncoder(dim=7)


def test_precomputed_lookup_padding_and_null():
    emb = {"a cat": torch.randn(3, 8), "a dog runs": torch.randn(5, 8), "": torch.randn(2, 8)}
    enc = PrecomputedText(emb, max_len=6)
    assert isinstance(enc, TextEncoder)
    out = enc.encode(["a dog runs", "a cat"])
    assert out.shape == (2, 6, 8)
    torch.testing.assert_close(out[1, :3], emb["a cat"])
    assert out[1, 3:].abs().max() == 0
    torch.testing.assert_close(enc.null(2)[0, :2], emb[""])
    with pytest.raises(ValueError, match="no precomputed"):
        enc.encode(["a bird"])
    with pytest.raises(ValueError, match="max_len"):
        PrecomputedText(emb, max_len=4)
    stacked = PrecomputedText.from_tensor(["x", "y"], torch.randn(2, 4, 8))
    assert stacked.encode(["y"]).shape == (1, 4, 8)
    assert stacked.null(1).abs().max() == 0
