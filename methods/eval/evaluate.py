"""Benchmark metrics for generated moving-shapes clips.

``evaluate_clips(videos, labels)`` reports, from :func:`methods.eval.analyzer.analyze`:

* ``acc_shape``, ``acc_colour``, ``acc_direction``, ``acc_all`` — prompt accuracy;
* ``acc_circle``, ``acc_square``, ``acc_triangle`` — shape accuracy among the clips prompted with that
  shape (nan if none), and ``square_fill`` — median box fill ratio of the clips prompted as squares
  (real squares >= 0.976; below ``analyzer.FILL_SQUARE`` = 0.93 a shape reads as a circle): where
  few-step students lose accuracy, it is rounded corners;
* ``detected`` — fraction of clips with a shape in at least two frames;
* ``smoothness`` — mean residual (px) of a straight-line fit to the centroid track;
* ``diversity`` — mean pairwise feature distance among clips that share a prompt;
* ``fd`` — Fréchet distance (Heusel et al. 2017, Eq. 6) between the analyzer features of the
  clips and of real clips:
  FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
  The matrix square roots come from symmetric eigendecompositions in float64, with negative
  round-off eigenvalues clipped to zero, so FD is real and >= 0 up to round-off.

``mean_over_seeds(per_seed)`` averages evaluations of one model under several noise seeds: each
metric's mean, ``<metric>_se`` its standard error from the spread over seeds, and for ``acc_all``
also ``acc_all_binomial_se`` = sqrt(p (1 - p) / (seeds * num)), the error of a proportion over all
clips (rougher from the spread when there are only two or three seeds).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from vdistill.methods.data.shapes import SHAPES, MovingShapes, ShapesConfig
from vdistill.methods.eval.analyzer import FEATURE_NAMES, analyze
from vdistill.methods.sampling.generate import ModelBundle, balanced_labels, generate

log = logging.getLogger("vdistill")

REFERENCE_SEED = 10_007  # real clips for FD come from a seed no training stream uses by default


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix [D, D] via eigh, negative eigenvalues clipped."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feats_a [N, D] and feats_b [M, D] (N, M >= 2)."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feats_a, feats_b: expected [N, D] and [M, D], got {list(feats_a.shape)}, "
                         f"{list(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("feats_a, feats_b: need at least 2 rows each to estimate a covariance")
    a, b = feats_a.double(), feats_b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("feats_a, feats_b: non-finite features")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(fd), 0.0)


@functools.lru_cache(maxsize=4)
def _reference_cached(n: int, seed: int, cfg: ShapesConfig) -> torch.Tensor:
    ds = MovingShapes(cfg, seed=seed)
    chunks = [analyze(ds.batch(range(i, min(i + 256, n)))[0]).features for i in range(0, n, 256)]
    return torch.cat(chunks)


def reference_features(n: int = 1024, seed: int = REFERENCE_SEED,
                       cfg: ShapesConfig | None = None) -> torch.Tensor:
    """Analyzer features [n, F] float64 of real clips 0..n-1 of ``MovingShapes(cfg, seed)`` (cached)."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    return _reference_cached(n, seed, cfg or ShapesConfig()).clone()


def diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise distance of features [B, F] among clips with equal labels [B, 3]; nan if no pair."""
    groups = torch.unique(labels, dim=0, return_inverse=True)[1]
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    if not same.any():
        return float("nan")
    dist = torch.cdist(features.double(), features.double())
    return float(dist[same].mean())


def _median_fill(features: torch.Tensor, rows: torch.Tensor) -> float:
    fill = features[rows, FEATURE_NAMES.index("fill")]
    return float(fill.median()) if len(fill) else float("nan")


def evaluate_clips(videos: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
                   cfg: ShapesConfig | None = None) -> dict[str, float]:
    """Metrics for videos [B, 3, T, H, W] in [-1, 1] generated for labels [B, 3] (see module docstring).

    ``reference``: real-clip features [M, F] for FD; default :func:`reference_features` of ``cfg``
    (default ``ShapesConfig()``), whose (C, T, H, W) must match the videos.
    """
    if labels.dim() != 2 or labels.shape[1] != 3 or labels.shape[0] != videos.shape[0]:
        raise ValueError(f"labels: expected [{videos.shape[0]}, 3], got {list(labels.shape)}")
    cfg = cfg or ShapesConfig()
    if reference is None and tuple(videos.shape[1:]) != cfg.clip_shape:
        raise ValueError(f"videos: clip shape {list(videos.shape[1:])} differs from cfg "
                         f"{list(cfg.clip_shape)}; pass the matching cfg or reference features")
    result = analyze(videos)
    labels = labels.to("cpu", torch.long)
    correct = result.labels == labels  # [B, 3]
    if reference is None:
        reference = reference_features(cfg=cfg)
    metrics = {
        "acc_shape": float(correct[:, 0].double().mean()),
        "acc_colour": float(correct[:, 1].double().mean()),
        "acc_direction": float(correct[:, 2].double().mean()),
        "acc_all": float(correct.all(dim=1).double().mean()),
        **{f"acc_{name}": float(correct[labels[:, 0] == i, 0].double().mean()) for i, name in enumerate(SHAPES)},
        "square_fill": _median_fill(result.features, result.detected & (labels[:, 0] == SHAPES.index("square"))),
        "detected": float(result.detected.double().mean()),
        "smoothness": float(result.smoothness.nanmean()) if result.detected.any() else float("nan"),
        "diversity": diversity(result.features, labels),
        "fd": frechet_distance(result.features, reference) if len(videos) >= 2 else float("nan"),
    }
    return metrics



TIMINGS = ("sample_s", "wall_s")  # seconds: summed over seeds, not averaged


def mean_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Rows of one evaluation per seed (same step counts, same ``num``) -> one row per step count."""
    if len(per_seed) < 2:
        raise ValueError(f"per_seed: need evaluations under at least 2 seeds, got {len(per_seed)}")
    k = len(per_seed)
    rows = []
    for same_steps in zip(*per_seed, strict=True):
        first = same_steps[0]
        if any(r["steps"] != first["steps"] or r["num"] != first["num"] for r in same_steps):
            raise ValueError("per_seed: the seeds' rows differ in steps or num")
        row = {key: value for key, value in first.items() if not isinstance(value, float)}
        for key, value in first.items():
            if isinstance(value, float) and key not in TIMINGS:
                values = torch.tensor([r[key] for r in same_steps], dtype=torch.float64)
                row[key] = float(values.mean())
                row[f"{key}_se"] = float(values.std() / math.sqrt(k))
        p = row["acc_all"]
        row["acc_all_binomial_se"] = math.sqrt(p * (1 - p) / (k * first["num"]))
        row["seeds"] = k
        row |= {key: sum(r[key] for r in same_steps) for key in TIMINGS if key in first}
        rows.append(row)
    return rows


def evaluate_model(
    bundle: ModelBundle,
    steps: list[int],
    num: int,
    solver: str = "euler",
    cfg_scale: float | None = None,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    shift: float | None = None,
    on_clips: Callable[[int, torch.Tensor], object] | None = None,
) -> list[dict]:
    """One metrics row per step count (`num` clips balanced over the prompts, or `labels` [num, 3]; `sample_s` the
    sampling time, `wall_s` sampling and scoring); `on_clips(steps, clips)` sees each step count's clips."""
    labels = balanced_labels(num) if labels is None else labels
    reference = reference_features(cfg=bundle.data)
    rows = []
    # progress in clip-steps (a 50-step clip costs 50 one-step ones), so the ETA holds across step counts
    with tqdm(total=sum(steps) * len(labels), desc="evaluate", unit="clip-step", dynamic_ncols=True) as bar:
        for n in steps:
            start = time.perf_counter()
            clips = generate(bundle, labels, n, cfg_scale=cfg_scale, solver=solver, seed=seed, shift=shift,
                             progress=lambda k, n=n: bar.update(k * n))
            sampled = time.perf_counter()
            metrics = evaluate_clips(clips, labels, reference=reference, cfg=bundle.data)
            rows.append({"steps": n, "num": num, "solver": solver, **metrics, "sample_s": sampled - start,
                         "wall_s": time.perf_counter() - start})
            if on_clips is not None:
                on_clips(n, clips)
            log.info("steps=%d acc_all=%.3f fd=%.3f", n, metrics["acc_all"], metrics["fd"])
    return rows


def to_json(value, indent: int = 2) -> str:
    """JSON text of `value` with every NaN/inf float written as null (a bare NaN is not JSON: `diversity` is
    NaN when no two clips share a prompt)."""

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        return [clean(v) for v in item] if isinstance(item, list | tuple) else item

    return json.dumps(clean(value), indent=indent, allow_nan=False)


METRIC_KEY = ("acc_all: share of clips whose shape, colour and direction all match the prompt; fd: Fréchet "
              "distance to real clips (lower is better; real vs real 0.26); smoothness: px off a straight track; "
              "diversity: spread among clips of one prompt (null with one clip per prompt)")


def format_table(rows: list[dict]) -> str:
    cols = ["steps", "acc_all", "acc_shape", "acc_square", "square_fill", "acc_colour", "acc_direction", "fd",
            "smoothness", "diversity"]
    cols += [c for c in ("acc_all_se", "acc_all_binomial_se", "fd_se") if c in rows[0]]  # rows over seeds
    lines = [" | ".join(f"{c:>13}" for c in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols))
    return "\n".join(lines)
