"""Run drivers: flow-matching pretraining of a teacher, and distillation of a teacher file into a student.

`distill` works for every recipe in `methods/recipes/registry.py`: teacher file -> `Recipe.from_teacher`
-> trainer -> exported student. The student's export records the teacher's data geometry and text encoder
and the recipe's sampler, so that `vdistill sample/evaluate` work on it unchanged; guidance is baked in
(cfg_scale = 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from vdistill.methods.data.batches import Prefetched, ShapesBatches
from vdistill.methods.data.streaming import NULL_TEXT, LatentBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.eval.evaluate import evaluate_model
from vdistill.methods.recipes.pretrain import FlowMatching
from vdistill.methods.recipes.registry import recipe_class
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train import distributed, run_folder
from vdistill.methods.train.checkpoint import init_from, load_dit
from vdistill.methods.train.presets import DistillRun, RunConfig, shapes_distill
from vdistill.methods.train.trainer import TrainConfig, Trainer
from vdistill.models.dit import DiTConfig, VideoDiT
from vdistill.models.wan_format import WAN_GUIDANCE

log = logging.getLogger("vdistill")


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run uses its folder: a new run (empty folder), `overwrite` (clear the previous run's files first),
    or `resume` (from its newest valid checkpoint; `allow_changes`: with other settings, recorded)."""

    resume: bool = False
    overwrite: bool = False
    allow_changes: bool = False

    def prepare(self, out: str | Path) -> None:
        """Check (and clear, with `overwrite`) the run folder before any model is built."""
        if self.allow_changes and not self.resume:
            raise ValueError("--allow-changes applies to --resume only")
        run_folder.prepare(out, self.resume, self.overwrite)
        distributed.barrier()


def pretrain(run: RunConfig, out: Path, start: Start = Start(), init: Path | None = None,
             data_dir: Path | None = None) -> dict[str, Path]:
    """Flow-matching pretraining of `run.model` on moving shapes, or on the latent shards in `data_dir`
    (`vdistill prepare`); returns the exported weight files.

    `init`: start from an exported model's weights (continued training; its config must match).
    """
    start.prepare(out)
    distributed.set_context_parallel(run.train.context_parallel)
    torch.manual_seed(run.train.seed)
    device = str(run.train.resolved_device())
    if data_dir is None:
        text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
        data = Prefetched(ShapesBatches(run.data, text, run.train.batch_size, seed=run.train.seed, device=device))
    else:
        data = latent_data(data_dir, run.model, run.train, device)
    model = VideoDiT(run.model)
    if init is not None:
        init_from(model, init)
    recipe = FlowMatching(model, run.method)
    run_config = run.to_dict() | ({} if data_dir is None else {"data_dir": str(data_dir)})
    return _fit_and_export(Trainer(recipe, data, run.train, out, run_config=run_config), data, start)


def latent_data(data_dir: Path, model: DiTConfig, train: TrainConfig, device: str) -> Prefetched:
    """Batches streamed from the shards in `data_dir`; ValueError naming what does not fit the model."""
    batches = LatentBatches(data_dir, train.batch_size, seed=train.seed, device=device)
    (c, *grid), (length, dim) = batches.dataset.latent_shape, batches.dataset.text_shape
    if c != model.in_channels or dim != model.text_dim or any(n % p for n, p in zip(grid, model.patch)):
        raise ValueError(f"--data {data_dir}: latents [{c}, {', '.join(map(str, grid))}] and text [{length}, {dim}] do "
                         f"not fit the model (in_channels {model.in_channels}, text_dim {model.text_dim}, patch "
                         f"{model.patch})")
    if train.eval_every:
        raise ValueError("train.eval_every scores students on the moving-shapes benchmark; with --data set it to 0")
    if batches.null_is_zeros:
        log.warning("--data %s has no %s: CFG's unconditional branch gets zeros", data_dir, NULL_TEXT)
    return Prefetched(batches)


def _fit_and_export(trainer: Trainer, data: Prefetched, start: Start) -> dict[str, Path]:
    """Train, stop the data thread whatever happens, export; the exported files by name."""
    try:
        trainer.fit(resume=start.resume, allow_changes=start.allow_changes)
    finally:
        data.close()
    paths = trainer.export()
    if distributed.is_main():
        log.info("exported %s", ", ".join(str(p) for p in paths.values()))
    return paths


EVAL_STEPS = (1, 2, 4)


def latent_teacher(path: str | Path, device: torch.device) -> ModelBundle:
    """A teacher for latent data: the model in float32 (the student copies it and trains in float32), its guidance
    from its own export or Wan's default; no benchmark text encoder or clip geometry."""
    model, meta = load_dit(path, device)
    scale = meta.get("run_config", {}).get("cfg_scale", WAN_GUIDANCE)
    return ModelBundle(model.float(), None, None, float(scale), meta)


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
    run: DistillRun | None = None,
    start: Start = Start(),
    init: str | Path | None = None,
    teacher_cfg: float | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Distil the teacher at `teacher_path` with `method` on moving shapes, or on the latent shards in `data_dir`
    (a Wan2.1 teacher directory, or any model file; guidance `teacher_cfg`, else the file's, else Wan's 5.0);
    returns the exported student files.

    `init`: start the student from an exported student's weights instead of the teacher's (e.g. a
    DMD/rCM fine-tune of a consistency student); the teacher, and rCM's critic, stay the teacher.
    `teacher_cfg`: the teacher's guidance scale to bake into the student (default: the teacher's own).
    """
    if teacher_cfg is not None and not (math.isfinite(teacher_cfg) and teacher_cfg > 0):
        raise ValueError(f"--teacher-cfg must be a finite number > 0, got {teacher_cfg}")
    recipe_cls = recipe_class(method)
    run = run or shapes_distill(method)
    train, cfg = run.train, run.method
    start.prepare(out)
    distributed.set_context_parallel(train.context_parallel)
    if not isinstance(cfg, recipe_cls.Config):
        raise TypeError(f"run.method must be a {recipe_cls.Config.__name__} for {method!r}, got {type(cfg).__name__}")
    device = train.resolved_device()
    teacher = ModelBundle.load(teacher_path, device) if data_dir is None else latent_teacher(teacher_path, device)
    if teacher_cfg is not None:
        teacher = dataclasses.replace(teacher, cfg_scale=teacher_cfg)
    torch.manual_seed(train.seed)
    recipe = recipe_cls.from_teacher(teacher, cfg)
    if init is not None:
        init_from(recipe.student, Path(init))
    teacher_run = teacher.meta.get("run_config", {})
    run_config = {
        "method": method,
        "teacher": str(teacher_path),
        "init": None if init is None else str(init),
        "method_config": dataclasses.asdict(cfg),
        "model": teacher.model.cfg.to_dict(),
        "teacher_cfg_scale": teacher.cfg_scale,
        "cfg_scale": 1.0,  # guidance is baked into the student
        "teacher_run": teacher_run.get("train"),
    }
    if data_dir is None:
        run_config |= {"data": dataclasses.asdict(teacher.data), "text_max_len": teacher.text.max_len}
        data = Prefetched(ShapesBatches(teacher.data, teacher.text, train.batch_size, seed=train.seed,
                                        device=str(device)))
    else:
        run_config["data_dir"] = str(data_dir)
        data = latent_data(data_dir, teacher.model.cfg, train, str(device))
    trainer = Trainer(recipe, data, train, out, run_config=run_config)
    trainer.export_meta = {"sampler": recipe_cls.sampler_meta(cfg)}
    if train.eval_every:
        trainer.evaluator = student_evaluator(teacher, trainer.export_meta, train.eval_num)
    paths = _fit_and_export(trainer, data, start)
    if distributed.is_main():
        (Path(out) / "method_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    return paths
