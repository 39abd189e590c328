"""Distillation driver shared by every recipe: teacher file -> recipe -> trainer -> exported student.

Each recipe module (`DISTILLERS`) exposes
    Config                      a dataclass of the method's hyperparameters (with defaults);
    build_recipe(teacher, cfg)  -> Recipe whose `.student` starts from the teacher's weights;
                                   `teacher` is the loaded `ModelBundle` (model, text encoder, data geometry,
                                   the teacher's CFG scale);
    sampler_meta(cfg)           -> dict stored in the export, telling `generate` how to sample the student
                                   ({"kind": "ode"} or {"kind": "consistency", "times": {...}});
    default_train()             -> TrainConfig for the moving-shapes benchmark.
Method options come from the command line as `--set key=value` and are parsed with the type of
the dataclass field. The student's export records the teacher's data geometry and text encoder
so that `vdistill sample/evaluate` work on it unchanged; guidance is baked in (cfg_scale = 1).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import typing
from pathlib import Path

import torch

from vdistill.methods.cli.commands import evaluate_model, init_from
from vdistill.methods.data.batches import Prefetched, ShapesBatches
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train import distributed
from vdistill.methods.train.trainer import TrainConfig, Trainer

log = logging.getLogger("vdistill")

DISTILLERS: dict[str, str] = {
    "reflow": "vdistill.methods.recipes.reflow",
    "progressive": "vdistill.methods.recipes.progressive",
    "consistency": "vdistill.methods.recipes.consistency",
    "rcm": "vdistill.methods.recipes.rcm",
}


def distiller(method: str):
    """The recipe module for `method`; ValueError for an unknown one."""
    if method not in DISTILLERS:
        raise ValueError(f"unknown distillation method {method!r}; choose from {sorted(DISTILLERS)}")
    return importlib.import_module(DISTILLERS[method])


def _parse_value(text: str, kind):
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(kind) or (float,)
        return origin(_parse_value(t, inner) for t in text.split(",") if t)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if text.lower() == "none" else _parse_value(text, options[0])
    return kind(text)


def apply_overrides(cfg, assignments: list[str]):
    """Return a copy of dataclass `cfg` with `key=value` assignments applied (typed by the field)."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            raise ValueError(f"--set: {type(cfg).__name__} has no option {key!r}; options: {sorted(hints)}")
        try:
            changes[key] = _parse_value(value, hints[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set {key}: cannot parse {value!r} as {hints[key]}: {e}") from e
    return dataclasses.replace(cfg, **changes)


RESUME_KEYS = ("method", "init", "method_config", "model", "data", "text_max_len", "teacher_cfg_scale")


def check_resumable(out: str | Path, run_config: dict) -> None:
    """ValueError if the run in `out` (its config.json) was made with another teacher/student set-up."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot resume: {path} is corrupt ({e})") from e
    new = json.loads(json.dumps(run_config, default=str))
    for key in RESUME_KEYS:
        if saved.get(key) != new.get(key):
            raise ValueError(
                f"cannot resume the run in {out}: its {key} differs from this run's "
                f"(saved {saved.get(key)}, now {new.get(key)}); use another --out"
            )


EVAL_STEPS = (1, 2, 4)


def student_evaluator(teacher: ModelBundle, meta: dict, num: int):
    """student -> {acc_all_<n>, fd_<n>} at n in EVAL_STEPS sampling steps: `num` balanced clips, scored as
    `vdistill evaluate` scores the exported student (same seeds, guidance baked in)."""

    def evaluate(student: torch.nn.Module) -> dict[str, float]:
        bundle = ModelBundle(student, teacher.text, teacher.data, 1.0, meta)
        rows = evaluate_model(bundle, list(EVAL_STEPS), num)
        return {f"{key}_{r['steps']}": r[key] for r in rows for key in ("acc_all", "fd")}

    return evaluate


def distill(
    method: str,
    teacher_path: str | Path,
    out: str | Path,
    train: TrainConfig | None = None,
    method_cfg=None,
    resume: bool = False,
    init: str | Path | None = None,
    teacher_cfg: float | None = None,
) -> dict[str, Path]:
    """Distil the teacher at `teacher_path` with `method`; returns the exported student files.

    `init`: start the student from an exported student's weights instead of the teacher's (e.g. a
    DMD/rCM fine-tune of a consistency student); the teacher, and rCM's critic, stay the teacher.
    `teacher_cfg`: the teacher's guidance scale to bake into the student (default: the teacher's own).
    """
    if teacher_cfg is not None and not (math.isfinite(teacher_cfg) and teacher_cfg > 0):
        raise ValueError(f"--teacher-cfg must be a finite number > 0, got {teacher_cfg}")
    module = distiller(method)
    train = train or module.default_train()
    cfg = method_cfg or module.Config()
    device = train.resolved_device()
    teacher = ModelBundle.load(teacher_path, device)
    if teacher_cfg is not None:
        teacher = dataclasses.replace(teacher, cfg_scale=teacher_cfg)
    torch.manual_seed(train.seed)
    recipe = module.build_recipe(teacher, cfg)
    if init is not None:
        init_from(recipe.student, Path(init))
    teacher_run = teacher.meta.get("run_config", {})
    run_config = {
        "method": method,
        "teacher": str(teacher_path),
        "init": None if init is None else str(init),
        "method_config": dataclasses.asdict(cfg),
        "model": teacher.model.cfg.to_dict(),
        "data": dataclasses.asdict(teacher.data),
        "text_max_len": teacher.text.max_len,
        "teacher_cfg_scale": teacher.cfg_scale,
        "cfg_scale": 1.0,  # guidance is baked into the student
        "teacher_run": teacher_run.get("train"),
    }
    if resume:
        check_resumable(out, run_config)
    data = Prefetched(ShapesBatches(teacher.data, teacher.text, train.batch_size, seed=train.seed, device=str(device)))
    trainer = Trainer(recipe, data, train, out, run_config=run_config)
    trainer.export_meta = {"sampler": module.sampler_meta(cfg)}
    if train.eval_every:
        trainer.evaluator = student_evaluator(teacher, trainer.export_meta, train.eval_num)
    try:
        trainer.fit(resume=resume)
    finally:
        data.close()
    paths = trainer.export()
    if distributed.is_main():
        (Path(out) / "method_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        log.info("exported %s", ", ".join(str(p) for p in paths.values()))
    return paths
