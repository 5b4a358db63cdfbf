"""HunyuanVideo: padded text keys are masked out of the linear branch's S and z, so a batch with
padded prompts gives each sample the output it gets alone with the padding removed."""
from __future__ import annotations

import pytest
import torch

import linattn.dit as dit
from test_dit_families import CASES, randomize_linattn_, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning")


@pytest.mark.parametrize("mode", ["unconverted", "linear", "hybrid"])
def test_padded_text_equals_text_without_padding(mode):
    case = CASES["hunyuan_video"]
    model = case.model()
    if mode != "unconverted":
        dit.convert(model, layers="all", mode=mode)
        randomize_linattn_(model, seed=11)
    gen = torch.Generator().manual_seed(12)
    valid = (3, 7)
    padded = case.inputs(gen, text_len=7, valid=valid)
    # Padding rows hold large garbage: any leak into S, z or the softmax shows at once.
    for b, n in enumerate(valid):
        padded["encoder_hidden_states"][b, n:] = 50.0
    with torch.no_grad():
        batched = run(model, padded)
        for b, n in enumerate(valid):
            alone = {key: value[b:b + 1] for key, value in padded.items()}
            alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :n]
            alone["encoder_attention_mask"] = alone["encoder_attention_mask"][:, :n]
            torch.testing.assert_close(batched[b:b + 1], run(model, alone), rtol=1e-4, atol=1e-5)


def test_linear_branch_without_the_mask_would_see_the_padding(monkeypatch):
    """The check above can fail: with the key padding mask dropped, padded text changes outputs."""
    from linattn.dit.families import hunyuan_video

    case = CASES["hunyuan_video"]
    model = case.model()
    dit.convert(model, layers="all", mode="linear")
    randomize_linattn_(model, seed=11)
    padded = case.inputs(torch.Generator().manual_seed(12), text_len=7, valid=(3, 7))
    padded["encoder_hidden_states"][0, 3:] = 50.0
    alone = {key: value[:1] for key, value in padded.items()}
    alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :3]
    alone["encoder_attention_mask"] = alone["encoder_attention_mask"][:, :3]
    monkeypatch.setattr(hunyuan_video, "key_padding_mask_from", lambda *args: None)
    with torch.no_grad():
        assert not torch.allclose(run(model, padded)[:1], run(model, alone), rtol=1e-3, atol=1e-4)
