"""Put a distilled student into models/weights/<name>/ with its lineage, so `vdistill demo` shows it beside the
teacher: model.safetensors (the export to ship, e.g. a tune-times copy) and lineage.json (role "student", the recipe,
the teacher and its SHA-256, the commands that made it, the run's steps and wall time, the machine, the commit,
and the evaluation report of `vdistill evaluate --out`).

    python scripts/ship_student.py --name shapes-consistency --run runs/cd --model runs/cd/tuned.safetensors \
        --eval runs/cd/eval_seed0.json --command "vdistill distill consistency ..." --command "vdistill tune-times ..."
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from vdistill.bench.harness import run_meta
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train.logs import read_metrics

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="folder under models/weights/ (e.g. shapes-consistency)")
    p.add_argument("--run", type=Path, required=True, help="the distillation run directory")
    p.add_argument("--model", type=Path, required=True, help="the export to ship")
    p.add_argument("--eval", type=Path, required=True, help="`vdistill evaluate --out` report of that export")
    p.add_argument("--command", action="append", required=True, help="a command that made it, in order")
    p.add_argument("--machine", required=True, help="where it ran, e.g. '2-core AMD EPYC (AVX2), fp32'")
    args = p.parse_args(argv)
    bundle = ModelBundle.load(args.model)  # refuses a model that cannot be sampled
    run_config = bundle.meta["run_config"]
    rows = [r for r in read_metrics(args.run) if "wall_s" in r]  # training rows (evaluation rows have none)
    teacher = Path(run_config["teacher"])
    lineage = {
        "role": "student",
        "recipe": run_config["method"],
        "teacher": str(teacher),
        "teacher_sha256": sha256(teacher) if teacher.is_file() else None,
        "commands": args.command,
        "train": {"steps": bundle.meta.get("step"), "batch_size": run_config["train"]["batch_size"],
                  "wall_s_at_last_log": rows[-1]["wall_s"] if rows else None},
        "sampler": bundle.meta.get("sampler"),
        "machine": args.machine,
        **{k: v for k, v in run_meta(torch.device("cpu"), sys.argv[1:] if argv is None else argv).items()
           if k in ("date", "commit", "torch")},
        "evaluation": json.loads(args.eval.read_text()),
    }
    folder = WEIGHTS / args.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, folder / "model.safetensors")
    (folder / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
    print(f"wrote {folder}/model.safetensors and lineage.json")
    return folder


if __name__ == "__main__":
    main()
