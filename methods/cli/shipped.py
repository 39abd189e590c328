"""The models shipped in models/weights/: the moving-shapes teacher and the students distilled from it.

A student folder holds `model.safetensors` and `lineage.json` (role "student", the recipe, the teacher it came
from, the commands that made it, where and how long they ran, and its evaluation); see models/weights/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
SHIPPED_TEACHER = WEIGHTS / "shapes-teacher" / "model.safetensors"


def shipped_students(weights: Path = WEIGHTS) -> dict[str, Path]:
    """{name: model file} of every shipped student (a folder with a lineage.json of role "student"), by folder
    name without its "shapes-" prefix; ValueError naming a lineage.json that cannot be read."""
    students = {}
    for lineage in sorted(weights.glob("*/lineage.json")):
        try:
            role = json.loads(lineage.read_text()).get("role")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{lineage}: not a valid lineage file ({e})") from e
        model = lineage.parent / "model.safetensors"
        if role == "student":
            if not model.is_file():
                raise ValueError(f"{lineage} describes a student but {model} is missing")
            students[lineage.parent.name.removeprefix("shapes-")] = model
    return students


def stored_evaluation(model: Path) -> list[dict] | None:
    """The 256-clip evaluation rows stored beside a shipped model (the teacher's eval_cpu.json, a student's
    lineage.json), or None for a model that is not shipped."""
    folder = model.resolve().parent
    if folder.parent != WEIGHTS.resolve():
        return None
    for name, key in (("lineage.json", "evaluation"), ("eval_cpu.json", None)):
        if (folder / name).is_file():
            report = json.loads((folder / name).read_text())
            return (report[key] if key else report)["rows"]
    return None
