"""The one config path: `--set SECTION.KEY=VALUE` over run configs, and the option meanings `--help` shows."""

import dataclasses

import pytest

from vdistill.methods.recipes.registry import RECIPES
from vdistill.methods.train.config import apply_overrides, describe, field_docs
from vdistill.methods.train.presets import PRESETS, distill_preset, preset


def _all_config_classes():
    run = preset("tiny")
    classes = {type(run), *(type(getattr(run, f.name)) for f in dataclasses.fields(run)
                            if dataclasses.is_dataclass(getattr(run, f.name)))}
    return sorted(classes | {r.Config for r in RECIPES.values()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: c.__name__)
def test_every_option_has_a_one_line_meaning(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: options without a comment: {missing}"


def test_sections_and_bare_keys_reach_their_fields():
    run = distill_preset("shapes", "rcm")
    out = apply_overrides(run, ["train.lr=3e-4", "method.dmd_weight=0.05", "tangent_warmup=7",
                                "train.profile_window=2,4", "train.fsdp=true", "method.mid_times_2=1.0"])
    assert (out.train.lr, out.train.profile_window, out.train.fsdp) == (3e-4, (2, 4), True)
    assert (out.method.dmd_weight, out.method.tangent_warmup, out.method.mid_times_2) == (0.05, 7, (1.0,))
    assert run.train.lr == 1e-4 and run.method.dmd_weight == 0.01  # the preset itself is untouched
    pre = apply_overrides(preset("tiny"), ["method.logit_mean=1.5", "model.layers=1", "text_max_len=6", "steps=4"])
    assert (pre.method.logit_mean, pre.model.layers, pre.text_max_len, pre.train.steps) == (1.5, 1, 6, 4)


@pytest.mark.parametrize("assignment, match", [
    ("train.lrr=1", "train has no option 'lrr'"),
    ("optim.lr=1", "no section 'optim'"),
    ("dmd_wieght=1", "no option 'dmd_wieght'"),
    ("train.steps=many", "cannot parse 'many'"),
    ("train.fsdp=maybe", "expected true/false"),
    ("method.dmd_weight", "expects key=value"),
    ("method.p_std=-1", "p_std"),
])
def test_bad_assignments_are_clear_errors(assignment, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(distill_preset("shapes", "rcm"), [assignment])


@dataclasses.dataclass
class _Part:
    seed: int = 0  # a key both sections have


@dataclasses.dataclass
class _Run:
    a: _Part = dataclasses.field(default_factory=_Part)
    b: _Part = dataclasses.field(default_factory=_Part)


def test_a_bare_key_two_sections_have_must_be_qualified():
    with pytest.raises(ValueError, match="ambiguous, say a.seed or b.seed"):
        apply_overrides(_Run(), ["seed=3"])
    assert apply_overrides(_Run(), ["b.seed=3"]) == _Run(b=_Part(3))


def test_describe_lists_every_option_with_the_preset_value():
    text = describe(distill_preset("tiny", "consistency"))
    run = distill_preset("tiny", "consistency")
    for section in ("train", "method"):
        for f in dataclasses.fields(getattr(run, section)):
            assert f"\n  {section}.{f.name} = " in "\n" + text
    assert "train.steps = 3" in text  # the tiny preset's value, not the dataclass default
    assert set(PRESETS) >= {"tiny", "shapes"}
