"""An offline WanPipeline (tiny VAE, tiny UMT5 text encoder, a locally built tokenizer) generates
frames with a converted transformer, and reloads it as the README shows."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import linattn
import linattn.dit as dit
from test_dit_families import CASES

pytestmark = pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning")

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "walks", "on", "the", "beach", "dog", "blurry"]


def tiny_pipeline() -> WanPipeline:
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(WORDS), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=CASES["wan"].model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: WanPipeline) -> torch.Tensor:
    return pipe("a cat walks on the beach", negative_prompt="blurry", height=32, width=32,
                num_frames=5, num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_pipeline_generates_frames_with_a_converted_transformer(tmp_path):
    pipe = tiny_pipeline()
    original = generate(pipe)
    assert original.shape == (1, 5, 3, 32, 32)

    dit.convert(pipe.transformer, mode="hybrid")
    assert torch.equal(generate(pipe), original)

    dit.revert(pipe.transformer)
    dit.convert(pipe.transformer, layers=[1], mode="linear")
    frames = generate(pipe)
    assert frames.shape == original.shape and torch.isfinite(frames).all()
    assert not torch.equal(frames, original)

    # The README's flow: save the pipeline, reload the converted transformer, generate again.
    pipe.save_pretrained(tmp_path)
    transformer = linattn.dit.load_converted(tmp_path, subfolder="transformer")
    reloaded = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                           scheduler=pipe.scheduler, transformer=transformer)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(reloaded), frames)
