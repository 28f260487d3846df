"""A run record's layer rows summed per block: the one definition of per-block sparsity that plots and cards read."""
from __future__ import annotations

from .errors import UserError


def layer_size(row: dict, structured: bool = False) -> int:
    """A record row's parameter count before pruning: ``shape_before`` when the solver recorded it (rows of
    structured runs), else ``shape``. A row's ``achieved`` is the fraction of these parameters removed (zeroed, or cut
    away with their rows / columns). Rows of a ``structured`` run written before ``shape_before`` was recorded hold
    the kept shape; they give the size back from kept = before * (1 - achieved)."""
    if "shape_before" in row:
        return row["shape_before"][0] * row["shape_before"][1]
    n = row["shape"][0] * row["shape"][1]
    if not structured:
        return n
    if row["achieved"] >= 1.0:
        raise UserError(f"block {row.get('block')} {row.get('name')}: the record has no shape before pruning for a "
                        "fully removed linear; rerun the prune with this version of layerprune")
    return round(n / (1.0 - row["achieved"]))


def block_sparsity(record: dict) -> dict:
    """Per block (``blocks``): ``target`` and ``achieved`` sparsity, each the mean of the block's rows weighted by
    their parameters before pruning (``layer_size``), and the parameters ``before`` and ``removed``; ``overall``:
    achieved over all rows. The one definition that plots and cards read."""
    structured = bool(record.get("structure"))
    by_block: dict[int, list] = {}
    for row in record["layers"]:
        n = layer_size(row, structured)
        t = by_block.setdefault(row["block"], [0.0, 0.0, 0])
        t[0] += row["target"] * n
        t[1] += row["achieved"] * n
        t[2] += n
    blocks = sorted(by_block)
    before = [by_block[b][2] for b in blocks]
    removed = [by_block[b][1] for b in blocks]
    return {"blocks": blocks, "target": [by_block[b][0] / by_block[b][2] for b in blocks],
            "achieved": [r / n for r, n in zip(removed, before)], "before": before, "removed": removed,
            "overall": sum(removed) / sum(before) if before else None}
