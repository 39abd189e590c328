"""Sampling and the command line under bad input: non-finite options and outputs, damaged model metadata,
unwritable outputs found before any compute, prompts that must not reach file names; property tests of the
config and metadata parsers."""

import json
import math
import os

import pytest
import torch
from distill_helpers import one_thread  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vdistill.methods.cli.main import main
from vdistill.methods.sampling.generate import ModelBundle, NonFiniteOutput, balanced_labels, check_sampler, generate
from vdistill.methods.train.config import apply_overrides
from vdistill.methods.train.presets import tiny
from vdistill.models.config_fields import check_fields
from vdistill.models.dit import DiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_teacher_file):
    return tiny_teacher_file


def _rewrite(src, dst, tensors=None, config=None):
    """A copy of model file `src` with some tensors replaced and config fields changed (as a damaged or
    hand-edited file would have them: written without vdistill's checks)."""
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    header["config"] = json.dumps({**json.loads(header["config"]), **(config or {})})
    save_file({**load_file(str(src)), **(tensors or {})}, str(dst), metadata=header)
    return dst


def _sample(model, out, *extra):
    return main(["sample", "--model", str(model), "--steps", "2", "--device", "cpu", "--out", str(out), *extra])


# ---- 7: non-finite options and outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("option", [("--cfg", "nan"), ("--cfg", "inf"), ("--shift", "nan"), ("--shift", "0"),
                                    ("--steps", "0")])
def test_sample_refuses_non_finite_or_out_of_range_options(model, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        _sample(model, tmp_path / "out", *option)
    assert exit_.value.code == 2
    assert f"argument {option[0]}: expected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_with_nan_weights_is_refused_naming_the_tensor(model, tmp_path, capsys):
    name = "blocks.0.self_attn.q.weight"
    nan = _rewrite(model, tmp_path / "nan.safetensors", {name: torch.full_like(load_file(str(model))[name], math.nan)})
    assert _sample(nan, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert name in err and "non-finite" in err
    assert not (tmp_path / "out").exists()


def test_non_finite_output_is_refused_by_sample_and_evaluate(model, tmp_path, capsys):
    """A huge finite weight (as a flipped exponent bit gives) makes the clips NaN/inf: was written as images and
    scored with a plausible FD, rc 0."""
    state = load_file(str(model))
    name = "patch_embed.weight"
    huge = _rewrite(model, tmp_path / "huge.safetensors", {name: state[name] * 1e36})
    with pytest.raises(NonFiniteOutput, match="NaN/inf values in 8 of 8 clips"):
        generate(ModelBundle.load(huge), balanced_labels(8), 2)
    assert _sample(huge, tmp_path / "out") == 2
    assert "NaN/inf" in capsys.readouterr().err and not (tmp_path / "out").exists()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(huge), "--steps", "1", "--num", "4", "--device", "cpu",
                 "--out", str(report)]) == 2
    assert "NaN/inf" in capsys.readouterr().err and not report.exists()


def test_guidance_that_overflows_is_refused(model):
    with pytest.raises(NonFiniteOutput):
        generate(ModelBundle.load(model), balanced_labels(2), 2, cfg_scale=1e38)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        generate(ModelBundle.load(model), balanced_labels(2), 2, cfg_scale=math.nan)


# ---- 9: model metadata -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("dim", "192", "DiTConfig.dim must be int, got '192'"),
    ("heads", 0, "heads=0 must be >= 1"),
    ("absolute_positions", "false", "DiTConfig.absolute_positions must be bool, got 'false'"),
    ("eps", None, "DiTConfig.eps must be a finite number, got None"),
    ("colour", 1, "unknown fields ['colour']"),
])
def test_wrong_model_metadata_is_a_clear_error(model, tmp_path, capsys, field, value, message):
    bad = _rewrite(model, tmp_path / "bad.safetensors", config={field: value})
    assert _sample(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "its model config is not valid" in err


def test_wrong_run_metadata_is_a_clear_error(model, tmp_path, capsys):
    with safe_open(str(model), framework="pt") as f:
        header = dict(f.metadata())
    run = json.loads(header["run_config"])
    for key, value, message in [("text_max_len", "8", "text_max_len must be an integer"),
                                ("cfg_scale", "nan", "cfg_scale must be a finite number"),
                                ("data", {**run["data"], "frames": 4.5}, "ShapesConfig.frames must be int")]:
        bad = tmp_path / f"{key}.safetensors"
        save_file(load_file(str(model)), str(bad), metadata={**header, "run_config": json.dumps({**run, key: value})})
        assert _sample(bad, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert message in err and "metadata is not valid" in err, err


# ---- 9: outputs checked first, prompts in file names, non-finite training options -------------------------
def test_unwritable_outputs_are_found_before_any_compute(model, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    missing = tmp_path / "no_such_model.safetensors"  # loading it would fail: the output check comes first
    assert _sample(missing, a_file) == 2
    assert "--out" in capsys.readouterr().err
    assert _sample(missing, a_file / "below") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(missing), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "tiny", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_a_clear_error(model, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert _sample(model, locked / "out") == 2
    assert "cannot write in" in capsys.readouterr().err


def test_prompts_with_tabs_and_newlines_do_not_reach_file_names(model, tmp_path):
    prompts = ("--prompt", "a red\tcircle moving\nleft", "--prompt", " A  blue square moving up")
    assert _sample(model, tmp_path, *prompts) == 0
    names = sorted(p.name for p in tmp_path.glob("*.gif"))
    assert names == ["000_a_red_circle_moving_left.gif", "001_a_blue_square_moving_up.gif"]


@pytest.mark.parametrize("assignment, message", [
    ("train.lr=inf", "TrainConfig.lr must be a finite number, got inf"),
    ("method.logit_std=nan", "FlowMatchingConfig.logit_std must be a finite number, got nan"),
    ("train.time_limit_s=-1", "time_limit_s must be > 0"),
    ("train.grad_clip=-1", "grad_clip must be >= 0"),
    ("train.adam_betas=0.9,1.5", "adam_betas must be in [0, 1)"),
])
def test_non_finite_or_out_of_range_training_options_are_refused(tmp_path, capsys, assignment, message):
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", assignment]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- property tests of the parsers ----------------------------------------------------------------------
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.integers(0, 5), max_size=4))
TINY = tiny()
OPTION_KEYS = [f"{s}.{f}" for s in ("train", "method", "model", "data")
               for f in type(getattr(TINY, s)).__dataclass_fields__]
OPTION_TEXT = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "2.5", "true", "none", "1,2", "",
                                         "1e400", "abc"]), st.text(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(list(DiTConfig.__dataclass_fields__) + ["extra"]), JSON_VALUES, max_size=4))
def test_model_config_parser_gives_a_valid_config_or_a_clear_error(changes):
    try:
        cfg = DiTConfig.from_dict({**DiTConfig(dim=48, heads=2, text_dim=16).to_dict(), **changes})
    except ValueError:
        return
    check_fields(cfg)  # what was accepted has the annotated types and finite numbers
    assert cfg.dim % cfg.heads == 0 and min(cfg.patch) >= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPTION_KEYS), OPTION_TEXT), min_size=1, max_size=3))
def test_option_parser_gives_a_valid_config_or_a_clear_error(assignments):
    try:
        run = apply_overrides(TINY, [f"{key}={value}" for key, value in assignments])
    except ValueError:
        return
    for section in (run.train, run.method, run.model, run.data):
        check_fields(section)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "shift", "times"]),
                       st.one_of(JSON_VALUES, st.sampled_from(["ode", "consistency"]),
                                 st.dictionaries(st.sampled_from(["1", "2", "x"]), st.lists(st.floats(), max_size=3)))))
def test_sampler_metadata_parser_accepts_only_what_generate_runs(spec):
    try:
        check_sampler(spec)
    except ValueError:
        return
    assert spec["kind"] in ("ode", "consistency")
    assert all(len(times) == int(n) and all(0 < t <= 1 for t in times) for n, times in spec.get("times", {}).items())
