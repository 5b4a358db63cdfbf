"""Caller-given conditioning for the teacher: text embeddings, prompts and a text encoder, or
(for a teacher with random weights) random embeddings.

The teacher samples trajectory i with conditioning row i mod P of a (P, L, D) tensor. That
tensor comes either from a safetensors file (key ``prompt_embeds``, optional
``negative_prompt_embeds`` of shape (1, L, D) or (P, L, D) for guidance), or from prompts
encoded the way WanPipeline encodes them (UMT5, padded to max_sequence_length, positions past
each prompt's own length zeroed).

Families other than Wan also take a text attention mask and pooled embeddings
(linattn.train.families): those ride along as ``extras`` (safetensors keys
``prompt_attention_mask`` (P, L) and ``pooled_prompt_embeds`` (P, Dp), and ``negative_``-prefixed
ones for the negative rows), and rows() then returns families.Prompts batches instead of tensors.
Random conditioning draws them for the model's family (ModelCall.random_extras).
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
MASK_KEY = "prompt_attention_mask"
POOLED_KEY = "pooled_prompt_embeds"
EXTRA_KEYS = (MASK_KEY, POOLED_KEY, "negative_" + MASK_KEY, "negative_" + POOLED_KEY)


def prompts_batch(embeds: Tensor, extras: dict, rows: Tensor, negative: bool = False):
    """``embeds`` (the rows ``rows`` of the (P, L, D) embeddings, already picked) as they are
    or, with a mask or pooled embeddings among ``extras`` (EXTRA_KEYS), as a families.Prompts
    batch with those rows of them."""
    from .families import Prompts

    prefix = "negative_" if negative else ""
    mask, pooled = extras.get(prefix + MASK_KEY), extras.get(prefix + POOLED_KEY)
    if mask is None and pooled is None:
        return embeds
    pick = lambda t: None if t is None else t[rows % t.shape[0]]  # noqa: E731
    return Prompts(embeds, pick(mask), pick(pooled))


@dataclass
class Conditioning:
    embeds: Tensor                    # (P, L, D)
    negative: Optional[Tensor] = None  # (1, L, D) or (P, L, D), for classifier-free guidance
    extras: dict = field(default_factory=dict)  # EXTRA_KEYS -> (P or 1, L) / (P or 1, Dp)

    def __post_init__(self):
        if self.embeds.ndim != 3 or self.embeds.shape[0] < 1:
            raise ValueError(f"{PROMPT_KEY}: expected (P, L, D) with P >= 1, got "
                             f"{tuple(self.embeds.shape)}")
        if self.negative is not None:
            n = self.negative
            if n.ndim != 3 or n.shape[1:] != self.embeds.shape[1:] or n.shape[0] not in (
                    1, self.embeds.shape[0]):
                raise ValueError(f"{NEGATIVE_KEY}: expected (1 or {self.embeds.shape[0]}, "
                                 f"{self.embeds.shape[1]}, {self.embeds.shape[2]}), got "
                                 f"{tuple(n.shape)}")
        unknown = sorted(set(self.extras) - set(EXTRA_KEYS))
        if unknown:
            raise ValueError(f"conditioning: unknown extra tensors {unknown} (known: "
                             f"{list(EXTRA_KEYS)})")

    def rows(self, trajectories: Sequence[int]):
        """Conditioning (and negative conditioning) of the given trajectory indices: tensors,
        or families.Prompts batches when there are extras (module docstring)."""
        idx = torch.tensor([i % self.embeds.shape[0] for i in trajectories])
        neg = None
        if self.negative is not None:
            rows = idx % self.negative.shape[0]
            neg = prompts_batch(self.negative[rows], self.extras, rows, negative=True)
        return prompts_batch(self.embeds[idx], self.extras, idx), neg

    def save(self, path: str) -> None:
        tensors = {PROMPT_KEY: self.embeds.contiguous()}
        if self.negative is not None:
            tensors[NEGATIVE_KEY] = self.negative.contiguous()
        tensors.update({k: t.contiguous() for k, t in self.extras.items()})
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Conditioning":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.embeddings: no file at {path!r}")
        tensors = load_file(path)
        if PROMPT_KEY not in tensors:
            raise ValueError(f"data.embeddings: {path!r} has no tensor named {PROMPT_KEY!r} "
                             f"(found {sorted(tensors)})")
        negative = tensors.get(NEGATIVE_KEY)
        extras = {k: t if k.endswith(MASK_KEY) else t.float()
                  for k, t in tensors.items() if k in EXTRA_KEYS}
        return cls(tensors[PROMPT_KEY].float(), None if negative is None else negative.float(),
                   extras)


def random_conditioning(shape, seed: int, negative: bool = False, call=None,
                        model_config: Optional[dict] = None) -> Conditioning:
    """(P, L, D) standard-normal embeddings (and one negative row): conditioning for a teacher
    built with random weights, which no text encoder was trained for (demos and tests). call: the
    model's families.ModelCall, when it takes a text mask or pooled embeddings (drawn too)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(tuple(shape), generator=gen)
    neg = torch.randn((1, *tuple(shape)[1:]), generator=gen) if negative else None
    extras = {}
    if call is not None:
        P, L = shape[0], shape[1]
        extras = call.random_extras(model_config or {}, P, L, gen)
        if negative:
            extras.update({"negative_" + k: t for k, t in
                           call.random_extras(model_config or {}, 1, L, gen).items()})
    return Conditioning(embeds, neg, extras)


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt cleaning without its optional ftfy step: unescape, squash spaces."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], *,
                   max_sequence_length: int = 512, batch_size: int = 8) -> Tensor:
    """(P, max_sequence_length, D) float32 embeddings, Wan's convention: tokens padded to
    max_sequence_length, encoder run with the attention mask, padded positions set to 0."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: expected a non-empty list of strings")
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [clean_prompt(p) for p in prompts[start:start + batch_size]]
        tokens = tokenizer(chunk, padding="max_length", max_length=max_sequence_length,
                           truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state.float()
        # WanPipeline trims each prompt to its length and re-pads with zeros: same as masking.
        out.append((hidden * mask.gt(0).unsqueeze(-1)).cpu())
    return torch.cat(out)


def read_prompts(prompts) -> list[str]:
    """data.prompts: a list of strings, or a text file with one prompt per non-empty line."""
    if isinstance(prompts, list):
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("data.prompts: expected a non-empty list of strings")
        return list(prompts)
    if not os.path.isfile(prompts):
        raise FileNotFoundError(f"data.prompts: no file at {prompts!r}")
    with open(prompts, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"data.prompts: {prompts!r} holds no prompt")
    return lines


def load_text_encoder(source: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(tokenizer, UMT5 encoder) from a diffusers pipeline folder or hub id (tokenizer/ and
    text_encoder/ subfolders, as Wan's pipelines are laid out)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder",
                                               torch_dtype=dtype)
    return tokenizer, encoder.to(device).eval()


def build_conditioning(data_config, device: torch.device, call=None,
                       model_config: Optional[dict] = None) -> Conditioning:
    """The Conditioning a DataConfig asks for (embeddings file, or prompts + text encoder).
    call, model_config: the model's families.ModelCall and config, for random conditioning."""
    if data_config.embeddings is not None:
        cond = Conditioning.load(data_config.embeddings)
    elif data_config.random_conditioning is not None:
        cond = random_conditioning(data_config.random_conditioning, data_config.seed,
                                   negative=data_config.guidance_scale > 1.0, call=call,
                                   model_config=model_config)
    else:
        prompts = read_prompts(data_config.prompts)
        tokenizer, encoder = load_text_encoder(data_config.text_encoder, device)
        embeds = encode_prompts(tokenizer, encoder, prompts,
                                max_sequence_length=data_config.max_sequence_length)
        negative = None
        if data_config.guidance_scale > 1.0:
            negative = encode_prompts(tokenizer, encoder, [data_config.negative_prompt],
                                      max_sequence_length=data_config.max_sequence_length)
        del encoder
        cond = Conditioning(embeds, negative)
    if data_config.guidance_scale > 1.0 and cond.negative is None:
        raise ValueError(f"data.guidance_scale: {data_config.guidance_scale} > 1 needs negative "
                         f"conditioning: add {NEGATIVE_KEY!r} to data.embeddings")
    return cond
