"""The train report: what to expect from the default threshold, shown on the synthetic defects it
was chosen with (a sheet of examples with their maps, recall per defect kind, auto's table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from insightad.decide.decisions import DecisionRecord
from insightad.errors import InsightADError
from insightad.io import atomic_write
from insightad.methods.crossfit import EXAMPLE_IMAGES, untried_kinds
from insightad.render.colormap import MapScale, blend, with_colorbar


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask)
    out = rgb.copy()
    out[edge] = colour
    return out


def _examples(oof: Any, per_kind: int) -> dict[str, list[int]]:
    """Per defect kind (by name, as the recall table), the defects whose images validation kept, at most ``per_kind``."""
    picks: dict[str, list[int]] = {}
    for i, d in enumerate(oof.defects):
        if d.image.size and len(picks.get(d.kind, [])) < per_kind:
            picks.setdefault(d.kind, []).append(i)
    return {k: picks[k] for k in sorted(picks)}


def example_sheet(det: Any, oof: Any, path: Path, per_kind: int = EXAMPLE_IMAGES, tile: int = 128) -> Path | None:
    """Rows per defect kind: each synthetic defect (true mask outlined) and, for map methods, its map;
    the caption says its score and whether the threshold catches it. Validation keeps the images of the first
    ``EXAMPLE_IMAGES`` defects of each kind only. As many columns as the fullest row has (a validation of 2 normals
    drew 2 examples beside a blank third); None, and nothing written, where no defect image was kept."""
    rows = _examples(oof, per_kind)
    if not rows:
        return None
    per = 2 if oof.defect_maps is not None else 1
    cols = per * max(len(picks) for picks in rows.values())
    sheet = Image.new("RGB", (cols * tile, len(rows) * (tile + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    scale = MapScale.for_detector(det)
    for r, (kind, picks) in enumerate(rows.items()):
        for j, i in enumerate(picks):
            d = oof.defects[i]
            rgb = d.image if d.image.ndim == 3 else np.repeat(d.image[..., None], 3, axis=2)
            tiles = [_outline(rgb, d.mask)]
            if oof.defect_maps is not None:
                tiles.append(blend(rgb, oof.defect_maps[i], scale))
            for k, t in enumerate(tiles):
                x = (j * len(tiles) + k) * tile
                sheet.paste(Image.fromarray(t).resize((tile, tile)), (x, r * (tile + 14) + 14))
            hit = "caught" if oof.defect_scores[i] > det.threshold_ else "MISSED"
            draw.text((j * len(tiles) * tile + 2, r * (tile + 14)), f"{kind} {oof.defect_scores[i]:.3g} {hit}",
                      fill=(0, 0, 0) if hit == "caught" else (200, 0, 0))
    picture = with_colorbar(sheet, scale) if oof.defect_maps is not None else sheet
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def write_train_report(det: Any, out_dir: str | Path) -> dict[str, Any]:
    """``report.md``, ``decision.json`` and ``synthetic_examples.png`` in ``out_dir``."""
    rec_d = (getattr(det, "threshold_info_", None) or {}).get("decision")
    oof = getattr(det, "validation_", None)
    if not rec_d or oof is None:
        raise InsightADError("--report: the model has no out-of-fold validation to report")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InsightADError(f"{out}: --report expects a folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    rec = DecisionRecord.from_dict(rec_d)
    sheet = example_sheet(det, oof, out / "synthetic_examples.png")
    if sheet is None:  # an earlier report's sheet would stand beside this report as if it were this model's
        (out / "synthetic_examples.png").unlink(missing_ok=True)
    files = {"examples": sheet.name} if sheet is not None else {}
    body = {"method": det.method, "threshold": det.threshold_, "strategy": det.threshold_strategy_,
            "decision": rec.to_dict(), "selection": getattr(det, "selection_", None), "files": files,
            "untried_kinds": untried_kinds(oof.defect_kinds)}
    atomic_write_text(out / "decision.json", json.dumps(body, indent=2, default=float) + "\n")
    lines = [f"# Training: {det.method}", "", f"- threshold {det.threshold_:.6g} ({det.threshold_strategy_})",
             f"- {rec.summary()}", f"- validation: {rec.validation}, {rec.n_normal} normals scored out of fold, "
             f"{rec.n_synthetic} synthetic defects (one per validation normal)",
             (f"- synthetic AUROC {rec.synthetic_auroc:.4f}" if rec.synthetic_auroc is not None
              else "- no synthetic defects")]
    if rec.pixel_threshold is not None:
        lines.append(f"- pixel threshold {rec.pixel_threshold:.6g} (best pixel F1 on the synthetic masks)")
    lines += [f"- warning: {w}" for w in rec.warnings]
    if rec.recall_by_kind:
        lines += ["", "## Recall per synthetic defect kind", "", "| kind | recall |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in rec.recall_by_kind.items()]
    sel = getattr(det, "selection_", None)
    if sel:
        from insightad.apps.auto import format_table

        lines += ["", "## --method auto", "", "```", format_table(sel["candidates"], sel["chosen"]), "```"]
    lines += ["", "## Synthetic examples (true defect outlined; map in the model's colours)", "",
              f"![examples]({files['examples']})" if files else "No synthetic defect images were kept to show "
              "(the validation made none on the normals it scored).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return body
