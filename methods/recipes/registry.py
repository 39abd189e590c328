"""The distillation recipes by name: `vdistill distill METHOD` and `methods/train/runs.py` pick from here."""

from __future__ import annotations

from vdistill.methods.recipes.base import DistillRecipe
from vdistill.methods.recipes.consistency import Consistency
from vdistill.methods.recipes.progressive import Progressive
from vdistill.methods.recipes.rcm import RCM
from vdistill.methods.recipes.reflow import ReFlow

RECIPES: dict[str, type[DistillRecipe]] = {
    "reflow": ReFlow,
    "progressive": Progressive,
    "consistency": Consistency,
    "rcm": RCM,
}


def recipe_class(method: str) -> type[DistillRecipe]:
    """The recipe class of `method`; ValueError naming the choices for an unknown one."""
    if method not in RECIPES:
        raise ValueError(f"unknown distillation method {method!r}; choose from {sorted(RECIPES)}")
    return RECIPES[method]
