"""Comparison rows: one per (model, quantity), with the largest absolute and relative difference.

The relative difference is taken against the scale of anomalib's tensor, not element by element:
    max_rel_diff = max|ours - theirs| / max(max|theirs|, tiny)
so that an element that happens to be near zero (a centred feature, a gradient entry) does not turn float32
rounding into a huge ratio. A quantity holds when max_rel_diff <= tolerance (1e-4 in float32 by default).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

DEFAULT_TOLERANCE = 1e-4
_TINY = 1e-30
COLUMNS = ("model", "quantity", "max_abs_diff", "max_rel_diff", "tolerance", "holds", "note")


def compare_tensors(model: str, quantity: str, ours: Any, theirs: Any, tolerance: float = DEFAULT_TOLERANCE,
                    note: str = "") -> dict[str, Any]:
    """One parity row. Shapes must match exactly (after squeezing nothing): a shape mismatch is a failed row
    with the two shapes in the note, never a broadcast."""
    a = torch.as_tensor(ours).detach().to("cpu", torch.float64)
    b = torch.as_tensor(theirs).detach().to("cpu", torch.float64)
    row = {"model": model, "quantity": quantity, "max_abs_diff": None, "max_rel_diff": None,
           "tolerance": tolerance, "holds": False, "note": note}
    if a.shape != b.shape:
        row["note"] = _join(note, f"shape mismatch: ours {tuple(a.shape)}, anomalib {tuple(b.shape)}")
        return row
    if a.numel() == 0:
        row["note"] = _join(note, "empty tensors")
        return row
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b) or not bool(finite_a.all()):
        row["note"] = _join(note, f"non-finite values: ours {int((~finite_a).sum())}, anomalib {int((~finite_b).sum())}")
        return row
    abs_diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    rel = abs_diff / max(scale, _TINY)
    row.update(max_abs_diff=abs_diff, max_rel_diff=rel, holds=bool(rel <= tolerance))
    return row


def compare_grads(model: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                  tolerance: float = DEFAULT_TOLERANCE, note: str = "", quantity: str = "gradients"
                  ) -> dict[str, Any]:
    """One row over all parameter gradients (already under anomalib's names), taken as ONE vector: the largest
    absolute difference over every parameter, relative to the largest gradient entry of anomalib's (a tensor
    whose own gradients are ~1e-9 would otherwise turn rounding into a large ratio). Every parameter must be
    present on both sides; the note names the parameter with the largest difference."""
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        return {"model": model, "quantity": quantity, "max_abs_diff": None, "max_rel_diff": None,
                "tolerance": tolerance, "holds": False,
                "note": _join(note, f"{len(missing)} parameters on one side only, e.g. {missing[:3]}")}
    if not ours:
        return failed_row(model, quantity, _join(note, "no gradients on either side"), tolerance)
    worst, worst_abs, scale = None, -1.0, 0.0
    for name in sorted(ours):
        row = compare_tensors(model, quantity, ours[name], theirs[name], tolerance)
        if row["max_abs_diff"] is None:
            row["note"] = _join(note, f"{name}: {row['note']}")
            return row
        scale = max(scale, float(torch.as_tensor(theirs[name]).abs().max()))
        if row["max_abs_diff"] > worst_abs:
            worst, worst_abs = name, row["max_abs_diff"]
    rel = worst_abs / max(scale, _TINY)
    return {"model": model, "quantity": quantity, "max_abs_diff": worst_abs, "max_rel_diff": rel,
            "tolerance": tolerance, "holds": bool(rel <= tolerance),
            "note": _join(note, f"{len(ours)} tensors, relative to the largest gradient entry; largest "
                                f"difference in {worst}")}


def failed_row(model: str, quantity: str, note: str, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """A model or quantity that could not be compared: holds=false, with the reason."""
    return {"model": model, "quantity": quantity, "max_abs_diff": None, "max_rel_diff": None,
            "tolerance": tolerance, "holds": False, "note": note}


def align_signs(ours: torch.Tensor, theirs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """PCA components are defined up to sign: flip each of our rows (dim=0) or columns (dim=1) to agree with
    anomalib's in sign (by their inner product)."""
    dot = (ours.double() * theirs.double()).sum(dim=1 - dim, keepdim=True)
    return ours * torch.where(dot < 0, -1.0, 1.0).to(ours.dtype)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.2e}" if (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    models = sorted({r["model"] for r in rows})
    held = [m for m in models if all(r["holds"] for r in rows if r["model"] == m)]
    return {"rows": len(rows), "rows_holding": sum(bool(r["holds"]) for r in rows), "models": len(models),
            "models_holding": held, "models_failing": [m for m in models if m not in held]}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
