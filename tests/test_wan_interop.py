"""Wan2.1 checkpoints in and out: tiny random diffusers `WanTransformer3DModel`s saved in the diffusers layout
(single file and sharded) and in the original Wan-AI layout load into a VideoDiT that equals diffusers' forward;
forward-mode JVP through the loaded model equals finite differences of diffusers' forward; exports load with
`from_pretrained` and sample in diffusers as vdistill samples; what does not map is refused by name. No downloads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the hf extra is not installed (pip install -e '.[hf]')")
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from diffusers.models import attention_dispatch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from wan_helpers import (  # noqa: E402
    CHANNELS,
    TEXT_DIM,
    diffusers_forward,
    float64_time_sinusoid,
    original_state,
    save_original,
    tiny_wan,
)

from vdistill.methods.cli.main import main  # noqa: E402
from vdistill.methods.data.batch import Batch  # noqa: E402
from vdistill.methods.recipes.rcm import RCM, RCMConfig  # noqa: E402
from vdistill.methods.sampling.samplers import sample_consistency  # noqa: E402
from vdistill.methods.train.checkpoint import load_dit  # noqa: E402
from vdistill.models.dit import DiTConfig, VideoDiT  # noqa: E402
from vdistill.models.loading import load_model, model_format  # noqa: E402
from vdistill.models.wan_io import write_diffusers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
TOL = 1e-5
# (latent [B, C, T, H, W], text tokens): odd frame counts, non-square grids, one text token
CASES = [((1, CHANNELS, 3, 8, 8), 7), ((2, CHANNELS, 5, 6, 10), 13), ((1, CHANNELS, 1, 4, 4), 1)]


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


@pytest.fixture(scope="module")
def saved(wan, tmp_path_factory):
    """{layout: directory} of the same weights: diffusers (one file), diffusers sharded, original Wan."""
    root = tmp_path_factory.mktemp("wan")
    wan.save_pretrained(root / "diffusers")
    wan.save_pretrained(root / "sharded", max_shard_size="40KB")
    return {"diffusers": root / "diffusers", "sharded": root / "sharded",
            "wan": save_original(wan, root / "original")}


def inputs(shape, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g), torch.rand(shape[0], generator=g),
            torch.randn(shape[0], tokens, TEXT_DIM, generator=g))


def assert_close(got, want):
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= TOL + TOL * scale, (err, scale)


def test_the_original_layout_written_here_is_what_diffusers_converts(wan):
    converted = convert_wan_transformer_to_diffusers(original_state(wan))
    reference = wan.state_dict()
    assert sorted(converted) == sorted(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.parametrize("layout", ["diffusers", "sharded", "wan"])
@pytest.mark.parametrize("shape,tokens", CASES)
def test_loaded_model_equals_diffusers_forward(wan, saved, layout, shape, tokens):
    assert (saved[layout] / "diffusion_pytorch_model.safetensors.index.json").exists() == (layout == "sharded")
    model = load_model(saved[layout])
    assert model_format(saved[layout]) == ("wan" if layout == "wan" else "diffusers")
    assert model.cfg.text_len == 512 and model.cfg.in_channels == CHANNELS
    x, s, text = inputs(shape, tokens)
    with torch.no_grad():
        want = diffusers_forward(wan, x, s, text)
        assert_close(model(x, s, text), want)
        assert (model(x, s, text) - model(x, s.flip(0) * 0.5, text)).abs().max() > 1e-2  # time matters


def test_a_pipeline_directory_loads_its_transformer(wan, saved, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").symlink_to(saved["diffusers"], target_is_directory=True)
    x, s, text = inputs(*CASES[0])
    with torch.no_grad():
        assert_close(load_model(tmp_path)(x, s, text), diffusers_forward(wan, x, s, text))


def test_dtype_is_the_checkpoints_or_the_requested_one(saved, tmp_path):
    half = tiny_wan().half()
    half.save_pretrained(tmp_path / "half")
    assert {p.dtype for p in load_model(tmp_path / "half").parameters()} == {torch.float16}
    assert {p.dtype for p in load_model(saved["wan"], dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_jvp_of_the_loaded_model_equals_diffusers_forward_ad(saved):
    """JVP w.r.t. (latent, RF time) of the loaded model against forward-mode AD through diffusers' own model
    (its math SDPA backend: the default CPU kernel has no forward-AD formula); diffusers' time is 1000·s, its
    sinusoid evaluated in float64 as Wan's release and vdistill do (in float32 the d/ds term is off by 1e-5)."""
    model, wan = load_model(saved["wan"]), float64_time_sinusoid(tiny_wan())
    for shape, tokens in CASES[:2]:
        x, s, text, dx, ds = jvp_inputs(shape, tokens)
        _, got = torch.func.jvp(lambda a, b, text=text: model(a, b, text), (x, s), (dx, ds))
        with attention_dispatch.attention_backend("_native_math"):
            _, want = torch.func.jvp(lambda a, b, text=text: diffusers_forward(wan, a, b, text), (x, s), (dx, ds))
        assert_close(got, want)


def test_jvp_of_the_loaded_model_equals_finite_differences_of_diffusers(saved):
    """The same JVP against central differences of diffusers' forward in float64. diffusers keeps its norms and
    modulations in float32, so the quotient is good to ~1e-4 (measured: 6e-5 at h = 1e-5, worse at smaller and
    larger h)."""
    model, reference = load_model(saved["wan"], dtype=torch.float64), float64_time_sinusoid(tiny_wan().double())
    x, s, text, dx, ds = (a.double() for a in jvp_inputs(*CASES[1]))
    _, jvp = torch.func.jvp(lambda a, b: model(a, b, text), (x, s), (dx, ds))
    h = 1e-5
    with torch.no_grad():
        fd = (diffusers_forward(reference, x + h * dx, s + h * ds, text)
              - diffusers_forward(reference, x - h * dx, s - h * ds, text)) / (2 * h)
    err, scale = (jvp - fd).abs().max().item(), fd.abs().max().item()
    assert scale > 1e-2 and err <= 2e-4 * scale, (err, scale)


def jvp_inputs(shape, tokens):
    x, s, text = inputs(shape, tokens)
    g = torch.Generator().manual_seed(5)
    return x, s, text, torch.randn(x.shape, generator=g), torch.linspace(1.0, -0.5, shape[0])


@pytest.mark.parametrize("problem,match", [
    ({"image_dim": 1280, "added_kv_proj_dim": 48}, "image_dim=1280"),
    ({"qk_norm": "rms_norm"}, "qk_norm='rms_norm'"),
    ({"out_channels": 8}, "output channels 8 != input channels 4"),
])
def test_diffusers_configs_that_do_not_map_are_refused_by_name(saved, tmp_path, problem, match):
    config = json.loads((saved["diffusers"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **problem}))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(
        saved["diffusers"] / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


@pytest.mark.parametrize("config,match", [({"model_type": "i2v"}, "model_type='i2v'"),
                                          ({"window_size": [256, 256]}, "window_size=\\[256, 256\\]")])
def test_original_configs_that_do_not_map_are_refused_by_name(wan, tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        load_model(save_original(wan, tmp_path / "m", **config))


def test_unmapped_missing_and_non_finite_tensors_are_refused_by_name(wan, saved, tmp_path):
    state = load_file(saved["wan"] / "diffusion_pytorch_model.safetensors")
    cases = {
        "i2v": ({**state, "blocks.0.cross_attn.k_img.weight": torch.zeros(48, 48)}, "image conditioning"),
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}, "blocks.1.ffn.2.bias"),
        "nan": ({**state, "head.head.bias": torch.full((16,), float("nan"))}, "'head.bias' has non-finite"),
    }
    for name, (tensors, match) in cases.items():
        directory = save_original(wan, tmp_path / name)
        save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_model(directory)


def test_pickled_weights_and_other_directories_are_refused(wan, tmp_path):
    directory = save_original(wan, tmp_path / "pickle")
    (directory / "diffusion_pytorch_model.safetensors").rename(directory / "model.pth")
    with pytest.raises(ValueError, match="only pickled weights"):
        load_model(directory)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a Wan2.1 transformer"):
        load_model(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def wan_like_dit(seed=0) -> VideoDiT:
    """A VideoDiT with a Wan-expressible config and every weight random (its head starts at zero)."""
    model = VideoDiT(DiTConfig(in_channels=CHANNELS, patch=(1, 2, 2), dim=48, heads=2, layers=2, ffn_dim=64,
                               text_dim=TEXT_DIM, freq_dim=32)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return model


@pytest.mark.parametrize("shard_bytes", [5 * 1024**3, 30_000])
def test_export_loads_in_diffusers_with_identical_outputs(tmp_path, shard_bytes):
    model = wan_like_dit()
    out = write_diffusers(model, tmp_path / "exported", shard_bytes=shard_bytes)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists() == (shard_bytes < 1e6)
    loaded = WanTransformer3DModel.from_pretrained(out).eval()
    for shape, tokens in CASES:
        x, s, text = inputs(shape, tokens)
        with torch.no_grad():
            assert_close(loaded(x, 1000 * s, text, return_dict=False)[0], model(x, s, text))
    assert not list(tmp_path.glob(".exported*")), "staging directories left behind"


def test_export_refuses_non_finite_weights_and_non_wan_models(tmp_path):
    model = wan_like_dit()
    with torch.no_grad():
        model.blocks[0].ffn.fc1.bias[3] = float("inf")
    with pytest.raises(ValueError, match="'blocks.0.ffn.fc1.bias' has non-finite"):
        write_diffusers(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    shapes_like = VideoDiT(DiTConfig(in_channels=3, dim=48, heads=2, layers=1, ffn_dim=64, text_dim=16,
                                     freq_dim=32, absolute_positions=True))
    with pytest.raises(ValueError, match="absolute_positions"):
        write_diffusers(shapes_like, tmp_path / "shapes")


def diffusers_consistency_sample(transformer, times, noise_seed, renoise_seed, shape, text):
    """The docs/wan.md snippet: a consistency student in diffusers, FlowMatchEulerDiscreteScheduler with
    stochastic sampling (x0 = x - σ·v, then re-noised to the next σ) at the student's RF times."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=times)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
    renoise = torch.Generator().manual_seed(renoise_seed)
    for t in scheduler.timesteps:
        velocity = transformer(latents, t.expand(shape[0]), text, return_dict=False)[0]
        latents = scheduler.step(velocity, t, latents, generator=renoise, return_dict=False)[0]
    return latents


def test_an_exported_student_samples_in_diffusers_as_in_vdistill(tmp_path):
    model = wan_like_dit(seed=3)
    times = [1.0, 0.6, 0.3]
    out = write_diffusers(model, tmp_path / "student", extra={"vdistill_sampling.json": {"times": {"3": times}}})
    assert json.loads((out / "vdistill_sampling.json").read_text())["times"]["3"] == times
    transformer = WanTransformer3DModel.from_pretrained(out).eval()
    shape, text = (2, CHANNELS, 3, 8, 8), torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = diffusers_consistency_sample(transformer, times, 11, 12, shape, text)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        want = sample_consistency(lambda x, s: model(x, s, text), noise, times, torch.Generator().manual_seed(12))
    assert_close(got, want)


def test_import_wan_and_export_diffusers_commands(wan, saved, tmp_path, capsys):
    vd = tmp_path / "wan.safetensors"
    assert main(["import-wan", str(saved["wan"]), "--out", str(vd)]) == 0
    assert str(vd) in capsys.readouterr().out
    model, meta = load_dit(vd)
    assert meta["source"]["layout"] == "wan" and model.cfg.text_len == 512
    x, s, text = inputs(*CASES[0])
    with torch.no_grad():
        assert_close(model(x, s, text), diffusers_forward(wan, x, s, text))
    out = tmp_path / "back"
    assert main(["export", "--model", str(vd), "--format", "diffusers", "--out", str(out)]) == 0
    with torch.no_grad():
        back = WanTransformer3DModel.from_pretrained(out).eval()
        assert_close(diffusers_forward(back, x, s, text), diffusers_forward(wan, x, s, text))


def test_an_rcm_step_distils_from_a_loaded_wan_teacher(saved):
    """One rCM step (sCM JVP term and DMD term) with a Wan-layout teacher: finite loss, gradients in the
    student only, and one optimiser step changes it."""
    teacher = load_model(saved["wan"])
    recipe = RCM(teacher, RCMConfig(dmd_start=0, tangent_warmup=0), cfg_scale=2.0)
    g = torch.Generator().manual_seed(0)
    batch = Batch(x0=torch.randn(2, CHANNELS, 3, 8, 8, generator=g), text=torch.randn(2, 7, TEXT_DIM, generator=g),
                  null_text=torch.randn(1, 7, TEXT_DIM, generator=g))
    loss, logs = recipe.loss(batch, step=1)
    loss.backward()
    assert torch.isfinite(loss) and "dmd" in " ".join(logs)
    grads = [p.grad for p in recipe.student.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for p in recipe.teacher.parameters())


@pytest.mark.slow
def test_loading_holds_about_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of a fresh process loading a 275 MiB bf16 checkpoint (one file) grows by < 1.5 copies
    (measured 1.39 here, 1.17 at 788 MiB; a memory-mapped read measured 1.85)."""
    cfg = DiTConfig(in_channels=16, dim=1024, heads=8, layers=8, ffn_dim=4096, text_dim=1024, freq_dim=256)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    write_diffusers(model, tmp_path / "m")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    code = ("import resource, sys\nfrom vdistill.models.loading import load_model\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nload_model(sys.argv[1])\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.split()[-1])
    assert growth < 1.5 * weights, growth / weights


@pytest.mark.slow
def test_the_gpu_check_script_runs_at_tiny_size_on_cpu(tmp_path):
    """scripts/wan_gpu_check.py (the device session's Wan check) end to end at its --tiny size."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "wan_gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("wan-check_cpu_*.json")).read_text())
    assert result["tokens"] == 48 and result["forward"]["median_ms"] > 0 and result["forward_jvp"]["median_ms"] > 0
    assert [r["provider"] for r in result["rcm_step"]] == ["triton", "triton-recompute"]
    assert all("error" not in r and r["step_ms"] > 0 for r in result["rcm_step"]), result["rcm_step"]


def test_benchmark_commands_refuse_a_latent_model_by_name(saved, capsys):
    """evaluate runs the moving-shapes benchmark: a Wan model (4 latent channels here) is refused with the way out."""
    assert main(["evaluate", "--model", str(saved["diffusers"]), "--steps", "1", "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert "takes 4-channel latents, not the moving-shapes benchmark's 3-channel clips" in err and "--data" in err
