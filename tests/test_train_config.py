"""The training config: YAML and TOML read alike, errors name the offending key."""
import pytest

from linattn.train.config import TrainConfig, load_config

YAML = """
model:
  pretrained: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
convert:
  mode: hybrid
  n_linear: 16
data:
  dir: data
  latent_shape: [16, 21, 60, 104]
  embeddings: emb.safetensors
train:
  lr: 2e-5
  steps: 3000
  trainable: [attn1.]
output:
  dir: runs/wan
"""

TOML = """
[model]
pretrained = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
[convert]
mode = "hybrid"
n_linear = 16
[data]
dir = "data"
latent_shape = [16, 21, 60, 104]
embeddings = "emb.safetensors"
[train]
lr = 2e-5
steps = 3000
trainable = ["attn1."]
[output]
dir = "runs/wan"
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_and_toml_give_the_same_config(tmp_path):
    a = load_config(write(tmp_path, "c.yaml", YAML))
    b = load_config(write(tmp_path, "c.toml", TOML))
    assert a == b
    assert a.train.lr == 2e-5 and isinstance(a.train.lr, float)  # YAML's "2e-5" string
    assert a.convert.n_linear == 16 and a.train.trainable == ["attn1."]
    # Paths are kept as written: relative to the working directory, as on the command line.
    assert a.data.dir == "data" and a.output.dir == "runs/wan"
    assert a.model.pretrained == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert a.train.objective == "adm" and a.train.alpha_start == 20.0
    # The ADM defaults chosen by measurement (tests/test_train_stability.py).
    assert (a.train.adm_weighting, a.train.adm_velocity_weight, a.train.adm_fake_score) == \
        ("dmd", 1.0, "student")
    assert a.data.sampler == "euler"


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", YAML),
                      ["train.steps=7", "convert.n_linear=3", "train.betas=[0.5, 0.9]"])
    assert cfg.train.steps == 7 and cfg.convert.n_linear == 3 and cfg.train.betas == [0.5, 0.9]
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(write(tmp_path, "d.yaml", YAML), ["steps=7"])


@pytest.mark.parametrize("edit, message", [
    ({"train": {"learning_rate": 1e-4}}, r"train: unknown key\(s\) \['learning_rate'\]"),
    ({"traning": {}}, r"config: unknown key\(s\) \['traning'\]"),
    ({"train": {"steps": "many"}}, "train.steps: expected int"),
    ({"train": {"objective": "dmd"}}, "train.objective: expected one of"),
    ({"train": {"alpha_end": 0.5}}, "alpha_end must be >= 1"),
    ({"train": {"adm_t_min": 0.0}}, "train.adm_t_min"),
    ({"convert": {"mode": "hybrid", "n_linear": None}}, "convert.n_linear: mode 'hybrid'"),
    ({"convert": {"mode": "linear", "n_linear": 3}}, "convert.n_linear: only mode 'hybrid'"),
    ({"convert": {"layers": "some"}}, "convert.layers"),
    ({"convert": {"options": {"mode": "linear"}}}, "convert.options.mode"),
    ({"data": {"latent_shape": [16, 21]}}, "data.latent_shape"),
    ({"data": {"prompts": ["a cat"]}}, "exactly one of data.embeddings"),
    ({"data": {"guidance_scale": 0.5}}, "data.guidance_scale"),
    ({"output": {"dir": None}}, "output.dir: required"),
    ({"model": {"config": {"num_layers": 2}}}, "not both"),
    ({"data": {"sampler": "ddim"}}, "data.sampler: expected one of"),
    ({"train": {"adm_weighting": "exact"}}, "train.adm_weighting: expected one of"),
    ({"train": {"adm_fake_score": "dmd"}}, "train.adm_fake_score: expected one of"),
    ({"train": {"adm_velocity_weight": -1}}, "train.adm_velocity_weight"),
    ({"train": {"fake_score_updates": 0}}, "train.fake_score_updates"),
    ({"train": {"fake_score_lr": 0}}, "train.fake_score_lr"),
    ({"train": {"objective": "velocity_mse", "adm_fake_score": "trained"}},
     "train.adm_fake_score: an ADM option"),
    ({"train": {"context_parallel": {"ulysses": 0}}}, "train.context_parallel.ulysses"),
    ({"train": {"context_parallel": {"tp": 2}}}, r"train.context_parallel: unknown keys \['tp'\]"),
    ({"train": {"context_parallel": {"ring": 2}, "adm_fake_score": "trained"}},
     "train.context_parallel: the trained fake score"),
    ({"model": {"class_name": "FluxTransformer2DModel"}}, "model.class_name"),
    ({"model": {"call_options": {"guidance": 6.0}}}, r"model.call_options: \['guidance'\]"),
])
def test_errors_name_the_field(edit, message):
    base = {"model": {"pretrained": "x"}, "convert": {"mode": "hybrid", "n_linear": 2},
            "data": {"dir": "d", "latent_shape": [4, 1, 4, 4], "embeddings": "e.safetensors"},
            "output": {"dir": "o"}}
    for section, values in edit.items():
        base.setdefault(section, {}).update(values)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(base)


def test_file_type_is_checked(tmp_path):
    with pytest.raises(ValueError, match="must end in"):
        load_config(write(tmp_path, "c.ini", YAML))


def test_teacher_level_config_converts_the_toy_teacher_with_local_mixing():
    import os

    import linattn.train
    from linattn.dit.processor import converted_layers
    from linattn.toy import load_teacher
    from linattn.train.models import make_student

    path = os.path.join(os.path.dirname(linattn.train.__file__), "configs",
                        "toy_wan_cpu_teacher_level.yaml")
    cfg = load_config(path)
    assert cfg.train.map_fit_steps > 0 and cfg.train.select_steps is None
    student = make_student(load_teacher(), cfg.convert)
    layers = [(name, p.mode, p.local_mixing.kernel) for name, _, p in converted_layers(student)]
    assert layers == [(f"blocks.{i}.attn1", "linear", (3, 3, 3)) for i in (0, 1, 2, 5, 6)]
