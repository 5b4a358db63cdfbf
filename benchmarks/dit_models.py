"""The diffusers video DiTs the whole-model benchmark (test_model_step.py) times, and the
zero-cost attention stand-in that gives its ceiling.

Each ModelSpec builds a transformer from its config with random weights (nothing is downloaded)
and the inputs of one denoising step, as the family's pipeline passes them (CogVideoX's RoPE
tables come from diffusers' own helper, as CogVideoXPipeline computes them).

* CPU: tiny configs of every family (a few hundred to ~1.5k tokens), small enough for a CI run.
* GPU (kernels.md's shapes, bf16): Wan 2.1 1.3B at 480p × 81 frames (32,760 tokens), Wan 2.1 14B
  at 720p (75,600 tokens), CogVideoX-5B (17,550 video + 226 text tokens), HunyuanVideo at 720p
  × 129 frames (118,800 video + 256 text tokens). The 14B and HunyuanVideo steps run fewer
  blocks than the real models (their weights, gradients and activations at these lengths do not
  fit one GPU for training): their times are also reported per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from linattn.dit.processor import set_processor
from linattn.dit.selectors import Selector, resolve_selector


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]                  # the transformer, random weights
    inputs: Callable[[nn.Module, torch.device, torch.dtype], dict]
    k_layers: Callable[[int], list[int]]            # the "k of n" layers to convert
    blocks: str = ""                                 # e.g. "8 of 40 blocks" when reduced
    block_count: int = 0                             # blocks in the built model


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(*shape, device, dtype, generator) -> Tensor:
    return torch.randn(*shape, device=device, generator=generator).to(dtype)


# ----------------------------------------------------------------------------- Wan


def _wan(layers: int, heads: int, head_dim: int, ffn: int, text_dim: int = 4096,
         freq_dim: int = 256) -> Callable[[], nn.Module]:
    from diffusers import WanTransformer3DModel

    def build():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn,
            num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=1024)
    return build


def _wan_inputs(frames: int, height: int, width: int, text: int = 512, batch: int = 1):
    """Latents (B, 16, F, H, W) of a video of 4·(F−1)+1 frames at 8·H × 8·W pixels."""
    def inputs(model, device, dtype):
        g = _gen(device)
        text_dim = model.config.text_dim
        return dict(hidden_states=_randn(batch, 16, frames, height, width, device=device,
                                         dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
                    encoder_hidden_states=_randn(batch, text, text_dim, device=device,
                                                 dtype=dtype, generator=g))
    return inputs


#: LinVideo's 16 of 30 layers for Wan 1.3B (method.md §3; 1-based {2-8, 10-13, 15-16, 23, 25, 30}).
_LINVIDEO_WAN_1_3B = [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 22, 24, 29]


def _first(fraction: float) -> Callable[[int], list[int]]:
    return lambda n: list(range(max(1, round(fraction * n))))


# ----------------------------------------------------------------------------- CogVideoX


def _cogvideox(layers: int, heads: int, head_dim: int, time_embed_dim: int, text_dim: int,
               sample: tuple[int, int, int]) -> Callable[[], nn.Module]:
    from diffusers import CogVideoXTransformer3DModel

    def build():
        frames, height, width = sample
        return CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
            out_channels=16, time_embed_dim=time_embed_dim, text_embed_dim=text_dim,
            num_layers=layers, sample_frames=frames, sample_height=height, sample_width=width,
            patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
            norm_eps=1e-5, attention_bias=True)
    return build


def _cogvideox_inputs(frames: int, height: int, width: int, batch: int = 1):
    """Latents (B, F, 16, H, W), text (B, 226, D_text) and the RoPE tables CogVideoXPipeline
    computes (CogVideoX 1.0: patch_size_t None)."""
    def inputs(model, device, dtype):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import (
            get_resize_crop_region_for_grid)
        cfg = model.config
        g = _gen(device)
        grid = (height // cfg.patch_size, width // cfg.patch_size)
        crops = get_resize_crop_region_for_grid(grid, cfg.sample_width // cfg.patch_size,
                                                cfg.sample_height // cfg.patch_size)
        cos, sin = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                           grid_size=grid, temporal_size=frames, device=device)
        return dict(hidden_states=_randn(batch, frames, 16, height, width, device=device,
                                         dtype=dtype, generator=g),
                    encoder_hidden_states=_randn(batch, 226, cfg.text_embed_dim, device=device,
                                                 dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
                    image_rotary_emb=(cos, sin))
    return inputs


# ----------------------------------------------------------------------------- HunyuanVideo


def _hunyuan(dual: int, single: int, heads: int, head_dim: int, text_dim: int = 4096,
             pooled: int = 768, rope_axes=(16, 56, 56)) -> Callable[[], nn.Module]:
    from diffusers import HunyuanVideoTransformer3DModel

    def build():
        return HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=heads,
            attention_head_dim=head_dim, num_layers=dual, num_single_layers=single,
            num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=text_dim,
            pooled_projection_dim=pooled, rope_axes_dim=rope_axes, guidance_embeds=True,
            qk_norm="rms_norm")
    return build


def _hunyuan_inputs(frames: int, height: int, width: int, text: int = 256, valid: int = 200,
                    batch: int = 1):
    def inputs(model, device, dtype):
        cfg = model.config
        g = _gen(device)
        mask = torch.zeros(batch, text, dtype=torch.long, device=device)
        mask[:, :valid] = 1
        return dict(hidden_states=_randn(batch, 16, frames, height, width, device=device,
                                         dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
                    encoder_hidden_states=_randn(batch, text, cfg.text_embed_dim, device=device,
                                                 dtype=dtype, generator=g),
                    encoder_attention_mask=mask,
                    pooled_projections=_randn(batch, cfg.pooled_projection_dim, device=device,
                                              dtype=dtype, generator=g),
                    guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype))
    return inputs


# ----------------------------------------------------------------------------- LTX-Video, Mochi


def _ltx(layers: int, heads: int, head_dim: int) -> Callable[[], nn.Module]:
    from diffusers import LTXVideoTransformer3DModel

    def build():
        return LTXVideoTransformer3DModel(
            in_channels=32, out_channels=32, patch_size=1, patch_size_t=1,
            num_attention_heads=heads, attention_head_dim=head_dim,
            cross_attention_dim=heads * head_dim, num_layers=layers, caption_channels=64)
    return build


def _ltx_inputs(frames: int, height: int, width: int, text: int = 32, batch: int = 1):
    def inputs(model, device, dtype):
        g = _gen(device)
        return dict(hidden_states=_randn(batch, frames * height * width, 32, device=device,
                                         dtype=dtype, generator=g),
                    encoder_hidden_states=_randn(batch, text, model.config.caption_channels,
                                                 device=device, dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
                    encoder_attention_mask=torch.ones(batch, text, device=device),
                    num_frames=frames, height=height, width=width)
    return inputs


def _mochi(layers: int, heads: int, head_dim: int) -> Callable[[], nn.Module]:
    from diffusers import MochiTransformer3DModel

    def build():
        return MochiTransformer3DModel(
            patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim,
            num_layers=layers, pooled_projection_dim=64, in_channels=12, text_embed_dim=64,
            time_embed_dim=64)
    return build


def _mochi_inputs(frames: int, height: int, width: int, text: int = 32, valid: int = 24,
                  batch: int = 1):
    def inputs(model, device, dtype):
        g = _gen(device)
        mask = torch.zeros(batch, text, dtype=torch.bool, device=device)
        mask[:, :valid] = True
        return dict(hidden_states=_randn(batch, 12, frames, height, width, device=device,
                                         dtype=dtype, generator=g),
                    encoder_hidden_states=_randn(batch, text, model.config.text_embed_dim,
                                                 device=device, dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
                    encoder_attention_mask=mask)
    return inputs


# ----------------------------------------------------------------------------- the specs

#: CPU: tiny configs of every family (random weights), 640 to 1,536 tokens.
CPU_SPECS = [
    ModelSpec("Wan (tiny, 4 layers, 1,536 tokens)", _wan(4, 4, 32, 256, text_dim=64, freq_dim=32),
              _wan_inputs(6, 32, 32, text=16), _first(0.5), block_count=4),
    ModelSpec("CogVideoX (tiny, 4 layers, 1,200 + 226 tokens)",
              _cogvideox(4, 4, 32, 64, 64, (9, 20, 30)), _cogvideox_inputs(3, 40, 40),
              _first(0.5), block_count=4),
    ModelSpec("HunyuanVideo (tiny, 2 + 2 layers, 1,024 + 32 tokens)",
              _hunyuan(2, 2, 4, 32, text_dim=64, pooled=32, rope_axes=(8, 12, 12)),
              _hunyuan_inputs(4, 32, 32, text=32, valid=24), _first(0.5), block_count=4),
    ModelSpec("LTX-Video (tiny, 4 layers, 1,024 tokens)", _ltx(4, 4, 32),
              _ltx_inputs(4, 16, 16), _first(0.5), block_count=4),
    ModelSpec("Mochi (tiny, 4 layers, 640 + 32 tokens)", _mochi(4, 4, 32),
              _mochi_inputs(10, 16, 16), _first(0.5), block_count=4),
]

#: GPU: kernels.md's shapes, bf16. Real configs; blocks reduced where noted.
GPU_SPECS = [
    ModelSpec("Wan 2.1 1.3B, 480p x 81 frames (32,760 tokens)", _wan(30, 12, 128, 8960),
              _wan_inputs(21, 60, 104), lambda n: _LINVIDEO_WAN_1_3B, block_count=30),
    ModelSpec("Wan 2.1 14B, 720p x 81 frames (75,600 tokens)", _wan(8, 40, 128, 13824),
              _wan_inputs(21, 90, 160), _first(22 / 40), blocks="8 of 40 blocks",
              block_count=8),
    ModelSpec("CogVideoX-5B, 480x720 x 49 frames (17,550 + 226 tokens)",
              _cogvideox(42, 48, 64, 512, 4096, (49, 60, 90)), _cogvideox_inputs(13, 60, 90),
              _first(0.5), block_count=42),
    ModelSpec("HunyuanVideo, 720p x 129 frames (118,800 + 256 tokens)",
              _hunyuan(4, 8, 24, 128), _hunyuan_inputs(33, 90, 160), _first(0.5),
              blocks="4 + 8 of 20 + 40 blocks", block_count=12),
]


# ----------------------------------------------------------------------------- the ceiling


class ZeroCostAttention(nn.Module):
    """A self-attention stand-in whose attention is free: the layer's own projections and output
    path, with o = v. With `stock_pre`, the stock q/k norm and RoPE still run (their result
    unused): the cap of a layer that keeps diffusers' unfused pre-attention work. Under
    torch.compile the unused q, k (and norms) are dead code and removed, so the compiled
    ceiling is the stricter one without them."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, selector: Selector, original: Any, stock_pre: bool):
        super().__init__()
        self.selector, self.stock_pre = selector, stock_pre
        self.__dict__["original"] = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                image_rotary_emb)

    def forward(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                image_rotary_emb):
        p = self.selector.project(attn, hidden_states, encoder_hidden_states, attention_mask,
                                  image_rotary_emb)
        if self.stock_pre:
            self.selector.attention_qk(attn, p)
        return self.selector.finish(attn, p.v, p)


def install_zero_cost(model: nn.Module, layers: list[int], stock_pre: bool) -> Callable[[], None]:
    """Replace the attention of the given self-attention layers by ZeroCostAttention; returns
    the function that puts the original processors back."""
    selector = resolve_selector(model, None)
    chosen = [selector.layers(model)[i] for i in layers]
    originals = []
    for _, attn in chosen:
        originals.append((attn, attn.processor))
        set_processor(attn, ZeroCostAttention(selector, attn.processor, stock_pre))

    def restore():
        for attn, processor in originals:
            set_processor(attn, processor)
    return restore


def self_attention_count(model: nn.Module) -> int:
    return len(resolve_selector(model, None).layers(model))
