"""model.pretrained: a locally saved Wan loads through the training config (diffusers needs
accelerate for it, a [train] dependency), as a bare model folder and as a pipeline's
transformer/ subfolder, in float32 and in bf16 with Wan's float32 modules kept."""
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

from linattn.train import train
from linattn.train.config import ModelConfig
from linattn.train.models import load_transformer

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY)
    model.save_pretrained(str(root / "pipeline" / "transformer"))
    model.save_pretrained(str(root / "bare"))
    return root, model.state_dict()


@pytest.mark.parametrize("folder, subfolder", [("pipeline", "transformer"), ("bare", None)])
def test_pretrained_loads_a_local_wan(saved, folder, subfolder):
    root, state = saved
    config = ModelConfig(pretrained=str(root / folder), subfolder=subfolder)
    model = load_transformer(config, torch.float32)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key

    half = load_transformer(config, torch.bfloat16)
    # Wan keeps its time embedder and norms in float32 (_keep_in_fp32_modules), the rest bf16.
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.scale_shift_table.dtype == torch.float32


def test_train_runs_from_a_pretrained_folder(saved, tmp_path):
    root, _ = saved
    cfg = {
        "model": {"pretrained": str(root / "pipeline"), "teacher_dtype": "bfloat16"},
        "convert": {"mode": "linear", "layers": [1], "options": {"backend": "reference"}},
        "data": {"dir": str(tmp_path / "data"), "latent_shape": [4, 1, 4, 4],
                 "num_trajectories": 2, "trajectories_per_shard": 2, "num_steps": 2,
                 "random_conditioning": [2, 3, 32], "store_dtype": "float32"},
        "train": {"steps": 1, "global_batch_size": 2, "lr": 1e-3, "trainable": ["attn1."],
                  "mixed_precision": "no", "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "run"), "eval_every": 1, "eval_num_samples": 1},
    }
    result = train(cfg, progress=False)
    assert result.step == 1 and os.path.isdir(result.final_dir)
    # The student is a float32 copy of the (bf16) teacher's weights.
    assert result.model.blocks[0].attn1.to_k.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_built_from_its_config_gets_the_dtypes_a_loaded_one_gets(saved, dtype):
    # model.config (random weights) must run in the dtypes from_pretrained(torch_dtype=...)
    # gives: float32 norms, time embedder and modulation table, the rest in `dtype`; a plain
    # .to(dtype) would cast those too (and diffusers warns about it).
    root, _ = saved
    loaded = load_transformer(ModelConfig(pretrained=str(root / "bare")), dtype)
    built = load_transformer(ModelConfig(config=TINY, class_name="WanTransformer3DModel"), dtype)
    loaded_dtypes = {name: t.dtype for name, t in
                     [*loaded.named_parameters(), *loaded.named_buffers()]}
    built_dtypes = {name: t.dtype for name, t in
                    [*built.named_parameters(), *built.named_buffers()]}
    assert built_dtypes == loaded_dtypes
    assert built.scale_shift_table.dtype == torch.float32
    assert built.blocks[0].attn1.to_q.weight.dtype == dtype
