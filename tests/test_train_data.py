"""Teacher trajectories on disk: what is stored, resumability, the split over ranks, and the
deterministic batch order."""
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from linattn.train.conditioning import Conditioning
from linattn.train.data import BatchSchedule, TeacherDataset
from linattn.train.flow import FlowModel, flow_sigmas
from linattn.train.teacher_data import (DataSpec, conditioning_digest, generate_teacher_data,
                                        sampling_noise, shard_name, trajectory_noise)

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)
LATENT = (4, 2, 4, 4)

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def conditioning():
    gen = torch.Generator().manual_seed(7)
    return Conditioning(torch.randn(3, 5, 32, generator=gen), torch.randn(1, 5, 32, generator=gen))


def make_spec(cond, **kw):
    args = dict(num_trajectories=5, trajectories_per_shard=2, num_steps=3, shift=3.0,
                num_train_timesteps=1000, latent_shape=LATENT, guidance_scale=1.0,
                store_dtype="float32", seed=11, conditioning_id=conditioning_digest(cond))
    args.update(kw)
    return DataSpec(**args)


def read_all(directory, spec):
    from safetensors.torch import load_file

    return [load_file(os.path.join(directory, shard_name(k))) for k in range(spec.num_shards)]


def test_sigmas_are_the_diffusers_schedulers():
    s = FlowMatchEulerDiscreteScheduler(shift=5.0)
    s.set_timesteps(7)
    torch.testing.assert_close(flow_sigmas(7, 5.0), s.sigmas.float())
    assert float(flow_sigmas(7, 5.0)[0]) == 1.0 and float(flow_sigmas(7, 5.0)[-1]) == 0.0


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_stored_points_are_the_teachers_euler_trajectory(tmp_path, teacher, conditioning,
                                                         guidance):
    spec = make_spec(conditioning, guidance_scale=guidance)
    generate_teacher_data(teacher, str(tmp_path), spec, conditioning, progress=False)
    ds = TeacherDataset(str(tmp_path))
    assert len(ds) == spec.num_trajectories * spec.num_steps
    shards = read_all(str(tmp_path), spec)
    sigmas = flow_sigmas(spec.num_steps, spec.shift).tolist()

    # Trajectory 3 lives in shard 1, row 1; recompute it here with the raw transformer, with
    # Wan's timestep scaling (t · 1000) and the guidance formula written out.
    traj = 3
    x = trajectory_noise(spec.seed, traj, LATENT)[None]
    cond = conditioning.embeds[traj % 3][None]
    neg = conditioning.negative
    shard = shards[1]
    rows = (shard["trajectory"] == traj).nonzero().flatten()
    assert rows.tolist() == [3, 4, 5]
    for k, row in enumerate(rows):
        t = torch.tensor([sigmas[k] * 1000.0])
        with torch.no_grad():
            u_c = teacher(hidden_states=x, timestep=t, encoder_hidden_states=cond,
                          return_dict=False)[0]
            u_step = u_c
            if guidance != 1.0:
                u_u = teacher(hidden_states=x, timestep=t, encoder_hidden_states=neg,
                              return_dict=False)[0]
                u_step = u_u + guidance * (u_c - u_u)
        torch.testing.assert_close(shard["x_t"][row], x[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shard["velocity"][row], u_c[0], rtol=1e-5, atol=1e-5)
        assert float(shard["t"][row]) == pytest.approx(sigmas[k])
        assert float(shard["t_next"][row]) == pytest.approx(sigmas[k + 1])
        assert int(shard["cond_index"][row]) == traj % 3
        x = x + (sigmas[k + 1] - sigmas[k]) * u_step
    torch.testing.assert_close(ds.samples([traj])[0], x[0], rtol=1e-5, atol=1e-5)

    batch = ds.batch([int(rows[1]) + 2 * spec.num_steps])  # global index of that point
    torch.testing.assert_close(batch["x_t"][0], shard["x_t"][rows[1]])
    torch.testing.assert_close(batch["cond"][0], cond[0])


class Interrupt(Exception):
    pass


class FailingTeacher(FlowModel):
    """The teacher, dying after a number of forward calls, as a preempted job would."""

    def __init__(self, module, calls):
        super().__init__(module)
        self.left = calls

    def __call__(self, x, t, cond):
        if self.left == 0:
            raise Interrupt
        self.left -= 1
        return super().__call__(x, t, cond)


def test_sampling_noise_is_never_teacher_data_noise():
    """Scored samples start from the sampling stream: sample i of sampling seed s is not
    trajectory i of data.seed s (with one stream it was, and models were scored on the noise
    they trained on), and every sampler of the package draws it."""
    from linattn.toy.sampling import sample_noise
    from linattn.toy.videos import VIDEO_SHAPE
    from linattn.train.distill.sampler import sample_step_noise

    for seed in (0, 1, 7):
        data = torch.stack([trajectory_noise(seed, i, LATENT) for i in range(6)]).flatten(1)
        drawn = torch.stack([sampling_noise(seed, i, LATENT) for i in range(6)]).flatten(1)
        # Not one sample's noise is any trajectory's (independent draws: far apart).
        assert torch.cdist(drawn, data).min() > 1.0
        assert torch.equal(sampling_noise(seed, 3, LATENT), drawn[3].reshape(LATENT))
    assert torch.equal(sample_noise(3, 5), sample_step_noise(5, [0, 1, 2], 0, VIDEO_SHAPE))
    assert not torch.equal(sample_noise(1, 0)[0], trajectory_noise(0, 0, VIDEO_SHAPE))


def test_generation_resumes_to_identical_data(tmp_path, teacher, conditioning):
    spec = make_spec(conditioning)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    generate_teacher_data(teacher, whole, spec, conditioning, batch_size=2, progress=False)
    # 4 forward calls: shard 0 (2 trajectories batched, 3 steps) completes, shard 1 dies.
    with pytest.raises(Interrupt):
        generate_teacher_data(FailingTeacher(teacher, 4), resumed, spec, conditioning,
                              batch_size=2, progress=False)
    assert os.path.isfile(os.path.join(resumed, shard_name(0)))
    assert not os.path.isfile(os.path.join(resumed, shard_name(1)))
    made = generate_teacher_data(teacher, resumed, spec, lambda: pytest.fail("rebuilt"),
                                 batch_size=2, progress=False)
    assert made == [1, 2]
    for a, b in zip(read_all(whole, spec), read_all(resumed, spec)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_ranks_split_the_shards(tmp_path, teacher, conditioning):
    spec = make_spec(conditioning)
    single, split = str(tmp_path / "single"), str(tmp_path / "split")
    generate_teacher_data(teacher, single, spec, conditioning, progress=False)
    assert generate_teacher_data(teacher, split, spec, conditioning, rank=0, world_size=2,
                                 progress=False) == [0, 2]
    assert generate_teacher_data(teacher, split, spec, conditioning, rank=1, world_size=2,
                                 progress=False) == [1]
    for a, b in zip(read_all(single, spec), read_all(split, spec)):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_other_settings_are_refused(tmp_path, teacher, conditioning):
    generate_teacher_data(teacher, str(tmp_path), make_spec(conditioning), conditioning,
                          progress=False)
    with pytest.raises(ValueError, match=r"shift: stored 3.0, asked 5.0"):
        generate_teacher_data(teacher, str(tmp_path), make_spec(conditioning, shift=5.0),
                              conditioning, progress=False)
    os.remove(os.path.join(str(tmp_path), shard_name(2)))
    with pytest.raises(FileNotFoundError, match="lacks 1 of 3 shards"):
        TeacherDataset(str(tmp_path))


def test_guidance_needs_negative_conditioning(tmp_path, teacher):
    cond = Conditioning(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="negative conditioning"):
        generate_teacher_data(teacher, str(tmp_path), make_spec(cond, guidance_scale=2.0), cond,
                              progress=False)


def test_batch_schedule_is_a_function_of_the_step():
    sched = BatchSchedule(num_points=23, global_batch_size=4, world_size=2, seed=3)
    assert sched.batches_per_epoch == 5
    epoch0 = [i for s in range(5) for i in sched.global_indices(s)]
    assert len(set(epoch0)) == 20  # no point twice in an epoch; the 3 left over are dropped
    for step in (0, 4, 5, 12):
        both = sched.rank_indices(step, 0) + sched.rank_indices(step, 1)
        assert both == sched.global_indices(step)
        # A fresh schedule (a resumed run) gives the same batch for the same step.
        assert BatchSchedule(23, 4, 2, 3).global_indices(step) == sched.global_indices(step)
    assert sched.global_indices(5) != sched.global_indices(0)  # a new permutation per epoch
    assert sched.position(12) == {"epoch": 2, "batch_in_epoch": 2}
    with pytest.raises(ValueError, match="not divisible"):
        BatchSchedule(23, 4, 3, 0)
    with pytest.raises(ValueError, match="exceeds the 3 stored"):
        BatchSchedule(3, 4, 1, 0)


def tiny_text_encoder(directory):
    """A UMT5 encoder with random weights and a word-level tokenizer, saved the way Wan's
    pipelines are laid out (tokenizer/, text_encoder/)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "&"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64,
                                          num_layers=2, num_heads=4)).eval()
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    encoder.save_pretrained(os.path.join(directory, "text_encoder"))
    return tokenizer, encoder


def test_prompts_are_encoded_as_wan_pipeline_does(tmp_path):
    from diffusers import WanPipeline

    from linattn.train.conditioning import build_conditioning, encode_prompts
    from linattn.train.config import DataConfig

    tokenizer, encoder = tiny_text_encoder(str(tmp_path))
    prompts = ["a cat runs on the beach", "a  dog &amp; a cat", "the dog"]
    ours = encode_prompts(tokenizer, encoder, prompts, max_sequence_length=12, batch_size=2)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None,
                       scheduler=None)
    with torch.no_grad():
        theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=12,
                                            device=torch.device("cpu"))
    torch.testing.assert_close(ours, theirs.float())
    n = len(tokenizer("the dog").input_ids)
    assert ours[2, n:].abs().max() == 0 and (ours[2, :n].norm(dim=-1) > 0).all()  # padding: 0

    # The config route: a prompt file and the pipeline folder, loaded from disk.
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    cfg = DataConfig(dir="unused", latent_shape=[4, 1, 4, 4], prompts=str(tmp_path / "prompts.txt"),
                     text_encoder=str(tmp_path), max_sequence_length=12, guidance_scale=2.0,
                     negative_prompt="the dog")
    cond = build_conditioning(cfg, torch.device("cpu"))
    torch.testing.assert_close(cond.embeds, ours)
    torch.testing.assert_close(cond.negative, ours[2:3])


def test_guided_data_store_both_branches_and_old_data_is_refused(tmp_path, teacher,
                                                                 conditioning):
    """With guidance the shards hold the unconditional velocity too, and the batches carry
    what the student's guided velocity needs; a v1 folder gets an error saying to regenerate."""
    import json

    spec = make_spec(conditioning, guidance_scale=4.0)
    generate_teacher_data(teacher, str(tmp_path), spec, conditioning, progress=False)
    ds = TeacherDataset(str(tmp_path))
    batch = ds.batch([0, 4])
    assert ds.guided and ds.guidance_scale == 4.0
    assert batch["velocity_uncond"].shape == batch["velocity"].shape
    torch.testing.assert_close(batch["negative_cond"], conditioning.negative.expand(2, -1, -1))
    with torch.no_grad():
        u_u = teacher(hidden_states=batch["x_t"], timestep=batch["t"] * 1000,
                      encoder_hidden_states=batch["negative_cond"], return_dict=False)[0]
    torch.testing.assert_close(batch["velocity_uncond"], u_u, rtol=1e-5, atol=1e-5)
    assert torch.equal(ds.negative_conditioning([7]), conditioning.negative)
    # Unguided data carry neither.
    plain = str(tmp_path / "plain")
    generate_teacher_data(teacher, plain, make_spec(conditioning), conditioning, progress=False)
    assert {"velocity_uncond", "negative_cond"}.isdisjoint(TeacherDataset(plain).batch([0]))

    manifest_path = os.path.join(str(tmp_path), "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["version"] = 1
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="format v1, this linattn reads v2.*regenerate"):
        TeacherDataset(str(tmp_path))


def test_unipc_sampler_is_wan_pipelines_own(tmp_path, teacher, conditioning):
    """data.sampler "unipc" samples exactly as WanPipeline does with its default scheduler
    (the pipeline run here on latents, with guidance), and its points are what is stored."""
    from diffusers import WanPipeline

    from linattn.train.flow import make_scheduler, teacher_sample

    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, *LATENT, generator=gen)
    cond, neg = torch.randn(2, 2, 5, 32, generator=gen)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=teacher, vae=None,
                       scheduler=make_scheduler("unipc", 4, 3.0))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, latents=noise.clone(),
                  num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                  num_frames=5, height=32, width=32).frames
    points = []
    ours = teacher_sample(FlowModel(teacher), noise, cond, sampler="unipc", num_steps=4,
                          shift=3.0, negative_cond=neg, guidance_scale=4.0,
                          on_point=points.append)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    euler = teacher_sample(FlowModel(teacher), noise, cond, sampler="euler", num_steps=4,
                           shift=3.0, negative_cond=neg, guidance_scale=4.0)
    assert (euler - theirs).abs().max() > 1e-3  # the samplers differ: the choice matters
    unipc_sigmas = flow_sigmas(4, 3.0, sampler="unipc")
    assert [p.t for p in points] == pytest.approx(unipc_sigmas[:-1].tolist())
    assert not torch.allclose(unipc_sigmas, flow_sigmas(4, 3.0))

    spec = make_spec(conditioning, sampler="unipc", num_steps=4)
    generate_teacher_data(teacher, str(tmp_path), spec, conditioning, progress=False)
    ds = TeacherDataset(str(tmp_path))
    torch.testing.assert_close(ds.sigmas, unipc_sigmas)
    traj = 3
    final = teacher_sample(FlowModel(teacher), trajectory_noise(spec.seed, traj, LATENT)[None],
                           conditioning.embeds[traj % 3][None], sampler="unipc", num_steps=4,
                           shift=3.0)
    torch.testing.assert_close(ds.samples([traj]), final, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sampler: expected one of"):
        flow_sigmas(4, 3.0, sampler="dpm")
