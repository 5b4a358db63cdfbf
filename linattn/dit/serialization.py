"""linattn.load_converted: rebuild a converted model from what ``save_pretrained`` wrote.

Saving needs nothing from linattn: the processors are submodules, so their maps and gates are in
the state dict, and the conversion record is in config.json (record.py). Loading builds the model
from its config, converts the recorded layers with the recorded modes and maps, and loads every
tensor with its saved dtype (``assign=True``), so the loaded model computes bit-identical outputs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import local_mixing, maps, record
from .convert import Plan, check_backend, check_convertible, device_of, install
from .processor import converted_layers
from .selectors import Selector, builtin_selector

_SHOWN = 8  # keys listed per kind of mismatch


def load_converted(path: Union[str, Path], *, subfolder: Optional[str] = None,
                   model: Optional[nn.Module] = None, selector: Optional[Selector] = None,
                   feature_map: Optional[maps.FeatureMapArg] = None,
                   backend: str = "auto", weights: bool = True) -> nn.Module:
    """Load a model saved with ``model.save_pretrained(path)`` after ``linattn.convert``.

    Args:
        path: the local directory save_pretrained wrote (a pipeline's directory with
            ``subfolder="transformer"``).
        model: build nothing and load into this unconverted model instead (for a DiT class that
            is not in diffusers); its class and config must match the checkpoint's.
        selector: required when the checkpoint was converted with a user's own selector.
        feature_map: required when it used a custom feature map (the same factory or template).
        backend: the linattn.linear_attention backend the loaded layers use.
        weights: False: convert the model as the checkpoint records and read no weights (the
            maps keep their initial values): for a caller that reads the weights itself, such as
            a model built on the meta device and loaded shard by shard
            (linattn/train/sharded_load.py).

    Returns the model in eval mode, as diffusers' from_pretrained does, every saved tensor in its
    saved dtype. Buffers a model does not save (RoPE tables) come from its constructor, as with
    from_pretrained. Raises ValueError naming the difference when the checkpoint and the model
    do not match.
    """
    check_backend(backend)
    directory = Path(path) / subfolder if subfolder else Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_converted: no config.json in {directory}; expected a "
                                f"directory written by model.save_pretrained (for a pipeline "
                                f"directory pass subfolder='transformer')")
    config = json.loads(config_file.read_text())
    saved = record.read(config, str(directory))
    class_name = config.get("_class_name")
    if model is None:
        model = _build(class_name, config, directory)
    else:
        _check_given_model(model, class_name, config, directory)
    sel = _selector_for(saved["selector"], selector, directory)

    modules = dict(model.named_modules())
    self_attention = {name for name, _ in sel.layers(model)}
    plan: Plan = []
    for name, entry in saved["layers"].items():
        if name not in modules:
            raise ValueError(f"{directory}: the checkpoint converts layer {name!r}, which this "
                             f"{type(model).__name__} does not have")
        if name not in self_attention:
            raise ValueError(f"{directory}: the checkpoint converts {name!r}, which selector "
                             f"{sel.name!r} does not list as self-attention")
        attn = modules[name]
        check_convertible(name, attn, sel)
        heads, head_dim = sel.head_shape(attn)
        q_map, k_map = (maps.from_spec(entry[role], heads, head_dim, name, feature_map,
                                       device_of(attn)) for role in ("q_map", "k_map"))
        mixing = local_mixing.from_spec(entry.get("local_mixing"), heads * head_dim,
                                        f"{directory}: layer {name!r}", device_of(attn))
        plan.append((name, attn, entry["mode"], q_map, k_map, mixing))
    install(model, sel, plan, backend)
    if not weights:
        return model.eval()

    state = _read_weights(directory)
    expected = model.state_dict()
    _check_state(expected, state, directory)
    # assign=True keeps each tensor's saved dtype (bit-exact); the device stays the model's.
    state = {k: t.to(expected[k].device) for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _build(class_name: Any, config: dict, directory: Path) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{directory}: config.json names class {class_name!r}, which is not a "
                         f"diffusers model; build the model yourself and pass model=")
    return cls.from_config(config)


def _normalised(value: Any) -> Any:
    # Tuples become lists in JSON; compare configs the way config.json stores them.
    return json.loads(json.dumps(value, default=str))


def _check_given_model(model: nn.Module, class_name: Any, config: dict, directory: Path) -> None:
    if type(model).__name__ != class_name:
        raise ValueError(f"{directory}: the checkpoint is a {class_name}, but model= is a "
                         f"{type(model).__name__}")
    if any(True for _ in converted_layers(model)):
        raise ValueError("model: already has converted layers; pass an unconverted model "
                         "(or call linattn.revert on it first)")
    own = getattr(model, "config", {})
    differing = sorted(k for k in own if not k.startswith("_") and k in config
                       and _normalised(own[k]) != _normalised(config[k]))
    if differing:
        details = ", ".join(f"{k}: checkpoint {config[k]!r}, model {own[k]!r}"
                            for k in differing[:_SHOWN])
        raise ValueError(f"{directory}: model= was built with a different config ({details})")


def _selector_for(saved_name: str, given: Optional[Selector], directory: Path) -> Selector:
    if given is not None:
        if not isinstance(given, Selector):
            raise TypeError(f"selector: expected a linattn.dit.Selector, got {type(given).__name__}")
        if given.name != saved_name:
            raise ValueError(f"{directory}: the checkpoint was converted with selector "
                             f"{saved_name!r}, but selector= is {given.name!r}")
        return given
    try:
        return builtin_selector(saved_name)
    except ValueError:
        raise ValueError(f"{directory}: the checkpoint was converted with selector "
                         f"{saved_name!r}, which is not built in; pass selector=") from None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers checkpoint: safetensors or .bin, single file or sharded."""
    from diffusers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME,
                                 WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    def load(file: Path) -> dict[str, torch.Tensor]:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)

    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load(directory / shard))
            return state
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return load(directory / name)
    raise FileNotFoundError(f"load_converted: no weights in {directory} (looked for "
                            f"{SAFETENSORS_WEIGHTS_NAME}, {WEIGHTS_NAME} and their sharded indexes)")


def _check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 directory: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if not (missing or unexpected or reshaped):
        return
    def listed(keys: list[str]) -> str:
        more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
        return f"{keys[:_SHOWN]}{more}"

    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {listed(missing)}")
    if unexpected:
        problems.append(f"not in the model: {listed(unexpected)}")
    if reshaped:
        problems.append("shapes differ: " + ", ".join(
            f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in reshaped[:_SHOWN]))
    hint = ""
    if missing and all(".processor." in k for k in missing):
        hint = (" (the config records converted layers but the weights hold none of their "
                "parameters: was it saved from a model loaded with plain from_pretrained, which "
                "drops them?)")
    raise ValueError(f"{directory}: the checkpoint does not match the converted model; "
                     + "; ".join(problems) + hint)
