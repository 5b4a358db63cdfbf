"""Every family the trainer knows trains end to end: a tiny random-weight CogVideoX,
HunyuanVideo, LTX-Video and Mochi (Wan: test_train_e2e.py), built from model.config, with random
conditioning that carries the text mask and pooled embeddings each family's model takes, teacher
data generated with classifier-free guidance, two ADM steps on the converted student, a finite
loss and a saved student.

Also: each family's velocity convention (linattn.train.families) inverts what its pipeline does
with the model's output, checked on the schedule's algebra rather than on a model.
"""
from __future__ import annotations

import math

import pytest
import torch

from linattn.train import train
from linattn.train.conditioning import Conditioning, random_conditioning
from linattn.train.families import CogVideoXCall, HunyuanVideoCall, Prompts, model_call
from linattn.train.families.ltx_video import pack, unpack
from linattn.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {
    # class name: (model config, latent (C, F, H, W), text (L, D))
    "CogVideoXTransformer3DModel": (
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
             sample_frames=5, patch_size=2, max_text_seq_length=6,
             use_rotary_positional_embeddings=True),
        [4, 2, 8, 8], (6, 32)),
    "HunyuanVideoTransformer3DModel": (
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
             num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
             patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
             rope_axes_dim=[4, 6, 6], guidance_embeds=True),
        [4, 2, 4, 4], (5, 32)),
    "LTXVideoTransformer3DModel": (
        dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
             attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16),
        [8, 2, 4, 4], (5, 16)),
    "MochiTransformer3DModel": (
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16),
        [4, 2, 4, 4], (6, 32)),
}


@pytest.mark.parametrize("class_name", sorted(FAMILIES))
def test_family_trains_end_to_end(tmp_path, class_name):
    model_config, latent, (length, width) = FAMILIES[class_name]
    config = {
        "model": {"class_name": class_name, "config": model_config},
        "convert": {"mode": "linear", "layers": [0], "options": {"backend": "reference"}},
        "data": {"dir": str(tmp_path / "data"), "latent_shape": latent, "num_trajectories": 2,
                 "trajectories_per_shard": 2, "num_steps": 2, "store_dtype": "float32",
                 "random_conditioning": [2, length, width], "guidance_scale": 2.0},
        "train": {"objective": "adm", "steps": 2, "global_batch_size": 2, "lr": 1e-4,
                  "mixed_precision": "no", "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "out"), "checkpoint_every": 1000},
    }
    result = train(config, progress=False)
    assert result.step == 2 and result.final_dir is not None
    losses = [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # The stored conditioning carries what the family's model takes.
    stored = Conditioning.load(str(tmp_path / "data" / "conditioning.safetensors"))
    call = model_call(class_name)
    assert ("prompt_attention_mask" in stored.extras) == call.takes_mask
    assert ("pooled_prompt_embeds" in stored.extras) == (call.pooled_dim_key is not None)


def test_conditioning_rows_carry_masks_and_pooled_embeddings(tmp_path):
    cond = random_conditioning([3, 5, 8], seed=0, negative=True, call=HunyuanVideoCall(),
                               model_config={"pooled_projection_dim": 4})
    path = str(tmp_path / "c.safetensors")
    cond.save(path)
    loaded = Conditioning.load(path)
    rows, negative = loaded.rows([4, 0])
    assert isinstance(rows, Prompts) and isinstance(negative, Prompts)
    assert torch.equal(rows.embeds, cond.embeds[[1, 0]])
    assert torch.equal(rows.mask, cond.extras["prompt_attention_mask"][[1, 0]])
    assert rows.mask.dtype == torch.int64 and rows.pooled.shape == (2, 4)
    assert negative.embeds.shape == (2, 5, 8) and negative.mask.shape == (2, 5)


def test_cogvideox_velocity_is_the_flow_of_its_v_prediction():
    # A model that returns the exact v of a known (x_0, ε): the call must return ε − x_0.
    call = CogVideoXCall()
    x0, eps = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    t = torch.tensor([0.3, 0.8])
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps

    class Exact(torch.nn.Module):
        config = type("C", (), {"use_rotary_positional_embeddings": False,
                                "ofs_embed_dim": None})()

        def forward(self, hidden_states, encoder_hidden_states, timestep, image_rotary_emb,
                    return_dict):
            # ᾱ at the given τ is the schedule's; v = √ᾱ ε − √(1 − ᾱ) x_0 for that ᾱ.
            table = call.schedule()
            lo = timestep.floor().long().clamp(0, len(table) - 2)
            frac = (timestep - lo).double()
            a = (table[lo] * (1 - frac) + table[lo + 1] * frac).float().view(-1, 1, 1, 1, 1)
            v = a.sqrt() * eps - (1 - a).sqrt() * x0
            return (v.permute(0, 2, 1, 3, 4),)

    u = call.velocity(Exact(), x_t, t, torch.zeros(2, 3, 8), torch.float32, 1000)
    torch.testing.assert_close(u, eps - x0, rtol=1e-3, atol=1e-3)


def test_ltx_pack_is_inverted_by_unpack():
    x = torch.randn(2, 8, 4, 6, 4)
    tokens = pack(x, 2, 2)
    assert tokens.shape == (2, 2 * 3 * 2, 8 * 8)
    torch.testing.assert_close(unpack(tokens, 2, 3, 2, 2, 2), x, rtol=0, atol=0)


def test_unknown_call_options_are_refused():
    with pytest.raises(ValueError, match=r"model.call_options: \['shift'\]"):
        model_call("CogVideoXTransformer3DModel", {"shift": 3.0})
    with pytest.raises(ValueError, match="model.class_name"):
        model_call("FluxTransformer2DModel")
