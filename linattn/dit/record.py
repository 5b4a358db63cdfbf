"""The conversion record: which layers are converted, their mode and feature maps.

It lives in the model's diffusers config under the private key "_linattn", so that diffusers'
own ``model.save_pretrained(path)`` writes it into config.json next to the weights (the maps' and
gates' parameters are in the state dict already: the processors are submodules). It is derived
from the installed processors and rewritten after every convert / revert / finalize; nothing
else writes it. diffusers ignores private config keys when it builds a model, so a plain
``from_pretrained`` of a converted checkpoint gives the unconverted model (and warns about the
unused linattn weights); ``linattn.load_converted`` reads the record and rebuilds the layers.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from . import local_mixing, maps
from .processor import MODES, converted_layers

KEY = "_linattn"
FORMAT = 1


def build(model: nn.Module) -> Optional[dict[str, Any]]:
    layers, selector = {}, None
    for name, _, processor in converted_layers(model):
        layers[name] = {"mode": processor.mode, "q_map": maps.spec(processor.q_map),
                        "k_map": maps.spec(processor.k_map)}
        if processor.local_mixing is not None:
            # Only when present, so records without local mixing stay as they were.
            layers[name]["local_mixing"] = local_mixing.spec(processor.local_mixing)
        selector = processor.selector.name
    if not layers:
        return None
    return {"format": FORMAT, "selector": selector, "layers": layers}


def sync(model: nn.Module) -> None:
    """Rewrite the record in `model`'s config from its processors (diffusers models only: a
    model without a diffusers config converts and runs, but has no save_pretrained to carry it).
    Every change of the converted layers ends here, so it also registers or removes the token
    grid hook that local mixing needs (local_mixing.sync_hook), for any model."""
    local_mixing.sync_hook(model)
    config = getattr(model, "_internal_dict", None)
    if config is None or not hasattr(model, "register_to_config"):
        return
    current = build(model)
    if current is None:
        # FrozenDict forbids deleting a key, so the config is rebuilt without it.
        model._internal_dict = type(config)({k: v for k, v in config.items() if k != KEY})
    else:
        model.register_to_config(**{KEY: current})


def read(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The record of a saved config, checked; `where` names the checkpoint in messages."""
    record = config.get(KEY)
    if record is None:
        raise ValueError(f"{where}: config.json has no {KEY!r} record, so the model was not saved "
                         f"from a linattn-converted model; load it with diffusers' "
                         f"from_pretrained and call linattn.convert")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where}: the {KEY!r} record has format "
                         f"{record.get('format') if isinstance(record, dict) else record!r}; this "
                         f"linattn reads format {FORMAT}")
    layers = record.get("layers")
    if not isinstance(layers, dict) or not isinstance(record.get("selector"), str):
        raise ValueError(f"{where}: the {KEY!r} record is malformed (needs 'selector' and 'layers')")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            raise ValueError(f"{where}: layer {name!r} has no valid mode in the {KEY!r} record "
                             f"(expected one of {MODES}): {entry!r}")
        if not all(isinstance(entry.get(role), dict) for role in ("q_map", "k_map")):
            raise ValueError(f"{where}: layer {name!r} lacks its 'q_map' and 'k_map' in the "
                             f"{KEY!r} record: {entry!r}")
    return record
