"""linattn.summary: one line per self-attention layer of a (converted) model."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, TextIO, Union

from torch import nn

from . import maps
from .processor import converted_layers
from .selectors import Selector, resolve_selector


@dataclass(frozen=True)
class LayerReport:
    index: int
    name: str
    kind: str                 # "softmax" | "linear" | "hybrid"
    gate: Optional[float]     # r of a hybrid layer
    feature_map: str          # "-" for softmax layers; "+ local mixing KtxKhxKw" when it has one
    params: int               # parameters linattn added to the layer (maps, gate, local mixing)


def layer_report(model: nn.Module, selector: Union[None, str, Selector] = None) -> list[LayerReport]:
    """The rows summary() prints, for programs."""
    converted = {name: processor for name, _, processor in converted_layers(model)}
    if selector is None and converted:
        sel = next(iter(converted.values())).selector
    else:
        sel = resolve_selector(model, selector)
    rows = []
    for index, (name, _) in enumerate(sel.layers(model)):
        processor = converted.get(name)
        if processor is None:
            rows.append(LayerReport(index, name, "softmax", None, "-", 0))
            continue
        q, k = maps.describe(processor.q_map), maps.describe(processor.k_map)
        gate = processor.gate
        fmap = q if q == k else f"q: {q} / k: {k}"
        if processor.local_mixing is not None:
            fmap += " + local mixing " + "x".join(map(str, processor.local_mixing.kernel))
        rows.append(LayerReport(
            index, name, processor.mode,
            # A model built on the meta device has no gate values to show.
            float(gate.detach()) if gate is not None and not gate.is_meta else None, fmap,
            sum(p.numel() for p in processor.parameters())))
    return rows


def summary(model: nn.Module, selector: Union[None, str, Selector] = None,
            file: Optional[TextIO] = None) -> None:
    """Print, per self-attention layer: softmax / linear / hybrid (with r), feature map and the
    number of parameters linattn added, then the totals."""
    rows = layer_report(model, selector)
    out = file if file is not None else sys.stdout
    counts = {kind: sum(r.kind == kind for r in rows) for kind in ("softmax", "linear", "hybrid")}
    print(f"{type(model).__name__}: {len(rows)} self-attention layers, "
          + ", ".join(f"{n} {kind}" for kind, n in counts.items()), file=out)
    width = max([len("layer")] + [len(r.name) for r in rows])
    fmap_width = max([len("feature map")] + [len(r.feature_map) for r in rows])
    print(f"{'#':>4}  {'layer':<{width}}  {'kind':<7}  {'r':>6}  {'feature map':<{fmap_width}}  "
          f"{'params':>10}", file=out)
    for r in rows:
        gate = f"{r.gate:.4f}" if r.gate is not None else "-"
        print(f"{r.index:>4}  {r.name:<{width}}  {r.kind:<7}  {gate:>6}  "
              f"{r.feature_map:<{fmap_width}}  {r.params:>10,}", file=out)
    print(f"parameters added by linattn: {sum(r.params for r in rows):,}", file=out)
