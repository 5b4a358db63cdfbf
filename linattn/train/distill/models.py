"""The distillation stage's three networks, and reading a distilled model back.

* real score: the original model (model.*), frozen, optionally bf16 (linattn.train.models);
* generator: the finalized linearised student, float32 (the optimiser's master weights),
  loaded from generator.path (``load_generator``); its linear layers stay linear;
* fake score: a float32 copy of the original, as DMD initialises it (softmax attention: it is
  never used at inference, so it need not be fast).

A distilled model is saved as its save_pretrained folder plus ``sampler.json``, the K-step
sampler it was trained for (times after the shift); ``load_distilled`` reads both back.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..models import diffusers_class

SAMPLER_FILE = "sampler.json"
SAMPLER_FORMAT = "linattn-few-step-sampler"


def generator_folder(path: Union[str, os.PathLike], subfolder: Optional[str] = None) -> Path:
    """The model folder generator.path names: the folder itself, its ``subfolder``, or for a
    first-stage output.dir (no config.json, a final/ inside) its final/."""
    directory = Path(path) / subfolder if subfolder else Path(path)
    if not (directory / "config.json").is_file() and (directory / "final" / "config.json").is_file():
        directory = directory / "final"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"generator.path: no config.json in {directory} (nor in its "
                                f"final/); expected the first stage's output.dir or final/, "
                                f"or a save_pretrained folder")
    return directory


def load_model_folder(directory: Union[str, os.PathLike], backend: str = "auto") -> nn.Module:
    """A save_pretrained folder as a float32 model: linattn.load_converted when config.json
    records a conversion (its linear layers stay linear), else the diffusers class's own
    from_pretrained."""
    from ...dit import load_converted
    from ...dit.record import KEY

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if KEY in config:
        model = load_converted(directory, backend=backend)
    else:
        model = diffusers_class(config.get("_class_name", "")).from_pretrained(
            str(directory), torch_dtype=torch.float32)
    return model.float()


def empty_generator(generator_config, model_config) -> tuple[nn.Module, list]:
    """(the generator with its parameters on the meta device, float32; the folder its weights
    are read from) for model.load "sharded" (linattn/train/sharded_load.py): generator.path's
    model converted as its config.json records, or (path null) the original's structure."""
    from ...dit import load_converted
    from ...dit.record import KEY
    from .. import sharded_load as SL

    if generator_config.path is None:
        return SL.build_empty(model_config, torch.float32), SL.model_folder(model_config)
    directory = generator_folder(generator_config.path, generator_config.subfolder)
    config = json.loads((directory / "config.json").read_text())
    cls = diffusers_class(config.get("_class_name", ""))
    with SL.empty_parameters():
        model = cls.from_config({k: v for k, v in config.items() if k != KEY})
    if KEY in config:
        model = load_converted(directory, model=model, backend=generator_config.backend,
                               weights=False)
    model.float().requires_grad_(True)
    return model.train(), directory


def load_generator(generator_config, teacher_float32: nn.Module) -> nn.Module:
    """The generator to train: generator.path's model, or (path null) a copy of the teacher;
    float32, train mode, every parameter trainable (distill.trainable then narrows it)."""
    if generator_config.path is None:
        model = copy.deepcopy(teacher_float32).float()
    else:
        model = load_model_folder(generator_folder(generator_config.path,
                                                   generator_config.subfolder),
                                  generator_config.backend)
    model.requires_grad_(True)
    return model.train()


def make_fake_score(teacher_float32: nn.Module) -> nn.Module:
    """The fake score's initial weights: a float32 copy of the original model."""
    fake = copy.deepcopy(teacher_float32).float()
    fake.requires_grad_(True)
    return fake.train()


@dataclass(frozen=True)
class SamplerSpec:
    """The K-step sampler a distilled model runs: its times after the shift (times[0] = 1),
    the unshifted times and shift they came from, the model's timestep scale, and the step
    rule between steps (linattn.train.distill.sampler: "fresh" noise, DMD2's, or the
    "implied" noise of a deterministic step)."""

    times: tuple
    unshifted_times: tuple
    shift: float
    num_train_timesteps: int = 1000
    renoise: str = "fresh"

    @property
    def num_steps(self) -> int:
        return len(self.times)

    def save(self, directory: Union[str, os.PathLike]) -> None:
        data = {"format": SAMPLER_FORMAT, **asdict(self)}
        data["times"], data["unshifted_times"] = list(self.times), list(self.unshifted_times)
        with open(Path(directory) / SAMPLER_FILE, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "SamplerSpec":
        path = Path(directory) / SAMPLER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {SAMPLER_FILE}; not a model written by the "
                                    f"distillation stage (its output.dir/final)")
        data = json.loads(path.read_text())
        if data.pop("format", None) != SAMPLER_FORMAT:
            raise ValueError(f"{path}: not a {SAMPLER_FORMAT} file")
        return cls(times=tuple(data["times"]), unshifted_times=tuple(data["unshifted_times"]),
                   shift=float(data["shift"]),
                   num_train_timesteps=int(data["num_train_timesteps"]),
                   # files written before the step rule was a setting used fresh noise
                   renoise=str(data.get("renoise", "fresh")))


def load_distilled(path: Union[str, os.PathLike], *, backend: str = "auto"
                   ) -> tuple[nn.Module, SamplerSpec]:
    """(model in eval mode, float32; its SamplerSpec) of a distilled model: the distillation
    stage's output.dir/final, or its output.dir."""
    directory = Path(path)
    if not (directory / SAMPLER_FILE).is_file() and (directory / "final" / SAMPLER_FILE).is_file():
        directory = directory / "final"
    spec = SamplerSpec.load(directory)
    return load_model_folder(directory, backend).eval(), spec
