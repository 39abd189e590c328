"""`vdistill prepare` with a tiny random Wan VAE (diffusers AutoencoderKLWan) and umT5 encoder (transformers) saved to
disk and a word-level tokenizer built here: synthetic mp4 and GIF clips -> shards whose latents equal the VAE's own
encoding, normalised as Wan's pipeline expects; frames sampled at the target rate; captions zero-padded; a corrupt or
too-short video is skipped and counted; a rerun skips finished shards; two ranks split the shards. No downloads."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the hf extra is not installed")
av = pytest.importorskip("av", reason="PyAV (the hf extra) decodes mp4")
from diffusers import AutoencoderKLWan  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel  # noqa: E402

from vdistill.methods.cli.main import main  # noqa: E402
from vdistill.methods.data.shards import read_shard  # noqa: E402
from vdistill.methods.data.video import UnreadableVideo, read_clip  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "green", "blue", "circle", "square", "ball", "moving", "left", "right",
         "up", "down", "fast"]
SIZE = ["--height", "32", "--width", "48", "--frames", "9", "--fps", "8", "--text-len", "12"]


def write_mp4(path, frames: int, fps: int = 24, height: int = 40, width: int = 64) -> None:
    """Frame i is a flat grey of value 4·i (so the sampled indices can be read back) with a white square."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 4 * i, np.uint8)
            image[10:20, 10:20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)])
    vae.save_pretrained(root / "vae")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "text")
    UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4)).save_pretrained(root / "text")
    return root / "vae", root / "text"


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, caption in enumerate(["a red ball moving left", "a blue square moving up fast", "a green circle"]):
        write_mp4(folder / f"clip{i}.mp4", frames=30 + i)
        (folder / f"clip{i}.txt").write_text(caption + "\n")
    write_mp4(folder / "short.mp4", frames=5)  # 0.2 s at 24 fps: fewer than 9 frames at 8 fps
    (folder / "short.txt").write_text("a red circle")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "broken.txt").write_text("a ball")
    frames = [Image.fromarray(np.full((40, 64, 3), 20 * i, np.uint8)) for i in range(10)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    (folder / "anim.txt").write_text("a ball moving right")
    return folder


def test_read_clip_samples_the_target_frame_rate_and_crops(tmp_path):
    write_mp4(tmp_path / "v.mp4", frames=40, fps=30)
    clip = read_clip(tmp_path / "v.mp4", frames=20, fps=16, height=32, width=32)
    assert clip.shape == (3, 20, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    grey = ((clip[0, :, 31, 31] + 1) * 127.5 / 4).round().long().tolist()  # a corner outside the square
    assert grey == [int(k * 30 / 16 + 1e-9) for k in range(20)]  # the last source frame at or before k / 16 s
    with pytest.raises(UnreadableVideo, match="too short: 21 of 30 frames"):
        read_clip(tmp_path / "v.mp4", frames=30, fps=16, height=32, width=32)


def test_prepare_writes_vae_latents_and_padded_embeddings_and_skips_bad_videos(encoders, videos, tmp_path, capsys):
    vae_dir, text_dir = encoders
    out = tmp_path / "shards"
    args = ["prepare", str(videos), "--out", str(out), "--vae", str(vae_dir), "--text-encoder", str(text_dir),
            "--shard-size", "2", "--dtype", "float32", "--device", "cpu", *SIZE]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 clips in 3 new shards" in printed and "2 videos skipped" in printed
    skipped = [json.loads(line)["path"] for line in (out / "skipped-rank0.jsonl").read_text().splitlines()]
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == ["broken.mp4", "short.mp4"]
    shards = sorted(out.glob("shard-*.safetensors"))
    kept = {}
    for shard in shards:
        latents, text, mask, meta = read_shard(shard)
        assert latents.shape[1:] == (16, 3, 4, 6) and text.shape[1:] == (12, 32)
        for j, (video, caption) in enumerate(zip(meta["extra"]["kept"], meta["extra"]["captions"])):
            kept[video.rsplit("/", 1)[1]] = (latents[j], text[j], mask[j], caption)
    assert sorted(kept) == ["anim.gif", "clip0.mp4", "clip1.mp4", "clip2.mp4"]

    vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    clip = read_clip(videos / "clip1.mp4", 9, 8, 32, 48)
    with torch.no_grad():
        z = vae.encode(clip[None]).latent_dist.mode()[0]
    mean, std = (torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1),
                 torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1))
    latent, text, mask, caption = kept["clip1.mp4"]
    torch.testing.assert_close(latent, (z - mean) / std)
    assert caption == "a blue square moving up fast" and mask.tolist() == [True] * 6 + [False] * 6
    assert text[6:].abs().max() == 0 and text[:6].abs().min() > 0  # zero past the caption, as Wan pads

    assert main(args) == 0  # a rerun: every shard is already there
    assert "0 clips in 0 new shards in" in (printed := capsys.readouterr().out) and "(3 shards already there" in printed
    assert main([*args, "--fps", "16"]) == 2  # other settings into the same directory
    err = capsys.readouterr().err
    assert "was prepared with" in err and "'fps': 16.0" in err and "use another --out" in err


def test_two_ranks_split_the_shards(encoders, videos, tmp_path):
    from vdistill.methods.data.prepare import Encoders, PrepareConfig, prepare

    vae_dir, text_dir = encoders
    enc = Encoders(vae_dir, text_dir, torch.device("cpu"), 12)
    cfg = PrepareConfig(height=32, width=48, frames=9, fps=8, text_len=12, shard_size=2, dtype="float32")
    counts = [prepare(videos, tmp_path / "out", enc, cfg, rank=r, world=2) for r in (0, 1)]
    assert [c["written"] for c in counts] == [2, 1]
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == [
        f"shard-{i:06d}.safetensors" for i in range(3)]


def test_captions_file_and_missing_captions(videos, tmp_path):
    from vdistill.methods.data.prepare import find_clips

    (videos / "clip0.txt").unlink()
    with pytest.raises(ValueError, match="without a caption file beside them .*clip0"):
        find_clips(videos)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"path": f"clip{i}.mp4", "caption": f"c{i}"}) for i in range(3)))
    assert [(p.name, c) for p, c in find_clips(videos, captions)] == [(f"clip{i}.mp4", f"c{i}") for i in range(3)]


def test_prepared_data_trains_a_teacher_and_distils_a_wan_teacher(encoders, videos, tmp_path, capsys):
    """videos -> prepare -> pretrain --data, and distill rcm --data from a (tiny, random) Wan2.1 directory ->
    sample --vae of the student (its consistency sampler) -> an mp4 with the requested frames."""
    from diffusers import WanTransformer3DModel

    from vdistill.methods.train.checkpoint import load_dit

    vae_dir, text_dir = encoders
    shards = tmp_path / "shards"
    assert main(["prepare", str(videos), "--out", str(shards), "--vae", str(vae_dir), "--text-encoder",
                 str(text_dir), "--dtype", "float32", "--device", "cpu", *SIZE]) == 0
    assert (shards / "null_text.safetensors").is_file()
    steps = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.device=cpu"]
    assert main(["pretrain", "--preset", "tiny", "--data", str(shards), "--set", "model.in_channels=16",
                 "--set", "model.text_dim=32", *steps, "--out", str(tmp_path / "teacher")]) == 0
    teacher = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
                                    in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                    num_layers=2)
    teacher.save_pretrained(tmp_path / "wan")
    assert main(["distill", "rcm", "--preset", "tiny", "--teacher", str(tmp_path / "wan"), "--data", str(shards),
                 *steps, "--out", str(tmp_path / "rcm")]) == 0
    student, meta = load_dit(tmp_path / "rcm" / "student_ema.safetensors")
    assert student.cfg.in_channels == 16 and student.cfg.text_len == 512
    assert meta["run_config"]["data_dir"] == str(shards) and meta["run_config"]["teacher_cfg_scale"] == 5.0
    student_file = tmp_path / "rcm" / "student_ema.safetensors"
    assert main(["sample", "--model", str(student_file), "--vae", str(vae_dir), "--text-encoder", str(text_dir),
                 "--prompt", "a red ball", "--steps", "2", "--frames", "9", "--height", "32", "--width", "48",
                 "--text-len", "12", "--device", "cpu", "--out", str(tmp_path / "videos_out")]) == 0
    assert "consistency sampler, 2 steps, guidance 1.0" in capsys.readouterr().out  # guidance baked in
    with av.open(str(tmp_path / "videos_out" / "000_a_red_ball.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert main(["distill", "rcm", "--preset", "tiny", "--teacher", str(tmp_path / "wan"), "--data", str(shards),
                 *steps, "--set", "train.eval_every=1", "--out", str(tmp_path / "bad")]) == 2
    assert "train.eval_every scores students on the moving-shapes benchmark" in capsys.readouterr().err


def test_sample_with_vae_decodes_a_latent_model_to_videos(encoders, tmp_path, capsys):
    """sample --vae: prompts -> umT5 -> a Wan directory's ODE (its 480p flow shift, Wan's guidance) -> VAE -> an mp4
    with the requested frames and a GIF per prompt."""
    from diffusers import WanTransformer3DModel

    vae_dir, text_dir = encoders
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16,
                          out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                          num_layers=1).save_pretrained(tmp_path / "wan")
    out = tmp_path / "videos"
    args = ["sample", "--model", str(tmp_path / "wan"), "--vae", str(vae_dir), "--text-encoder", str(text_dir),
            "--prompt", "a red ball moving left", "--prompt", "a blue square", "--steps", "2", "--frames", "5",
            "--height", "32", "--width", "48", "--text-len", "12", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ode sampler, 2 steps, guidance 5.0, shift 3.0" in printed
    for stem in ("000_a_red_ball_moving_left", "001_a_blue_square"):
        assert f"{stem}.mp4" in printed and (out / f"{stem}.gif").is_file()
        with av.open(str(out / f"{stem}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    assert main([*args[:5], "--out", str(tmp_path / "x")]) == 2
    assert "--prompt is required with --vae" in capsys.readouterr().err
    assert main([*args[:5], "--prompt", "a ball", "--out", str(tmp_path / "x")]) == 2
    assert "--vae needs --text-encoder" in capsys.readouterr().err


def test_the_tokenizer_is_found_beside_the_text_encoder_or_in_the_pipeline(tmp_path):
    from vdistill.methods.data.prepare import tokenizer_dir

    (tmp_path / "text_encoder").mkdir()
    assert tokenizer_dir(tmp_path / "text_encoder") == tmp_path / "text_encoder"  # nothing else to try
    (tmp_path / "tokenizer").mkdir()
    assert tokenizer_dir(tmp_path / "text_encoder") == tmp_path / "tokenizer"  # a diffusers pipeline
    (tmp_path / "text_encoder" / "tokenizer_config.json").write_text("{}")
    assert tokenizer_dir(tmp_path / "text_encoder") == tmp_path / "text_encoder"


def test_prepare_benchmark_runs_at_tiny_size(tmp_path):
    from vdistill.bench import bench_prepare

    result = bench_prepare.main(["--size", "tiny", "--device", "cpu", "--clips", "1", "--out", str(tmp_path)])
    assert result["clips_per_s"] > 0 and set(result["s_per_clip"]) == {"decode", "vae", "text"}
    assert len(list(tmp_path.glob("prepare_cpu_*.json"))) == 1


def test_prompts_only_writes_embeddings_that_read_back_and_resume(encoders, tmp_path, capsys):
    from vdistill.methods.data.prepare import Encoders
    from vdistill.methods.data.prompts import PromptShards

    _, text_dir = encoders
    prompts = ["a red ball moving left", "a blue square", "a green circle moving up fast", "a ball", "a square"]
    captions = tmp_path / "prompts.jsonl"
    captions.write_text("\n".join(json.dumps({"caption": p}) for p in prompts))
    args = ["prepare", "--prompts", str(captions), "--text-encoder", str(text_dir), "--out", str(tmp_path / "out"),
            "--text-len", "12", "--shard-size", "2", "--dtype", "float32", "--device", "cpu"]
    assert main(args) == 0
    assert "5 prompts in 3 new files" in capsys.readouterr().out
    assert (tmp_path / "out" / "null_text.safetensors").is_file()
    data = PromptShards(tmp_path / "out")
    assert len(data) == 5 and data.captions == prompts
    text, mask = data.batch([4, 0, 2])
    want, want_mask = Encoders(None, text_dir, torch.device("cpu"), 12).encode_text([prompts[i] for i in (4, 0, 2)])
    torch.testing.assert_close(text, want)
    assert torch.equal(mask, want_mask) and (text[~mask] == 0).all()

    assert main(args) == 0  # a rerun from the same prompts writes nothing
    out = capsys.readouterr().out
    assert "0 prompts in 0 new files in" in out and "(3 already there)" in out
    assert main([a if a != "12" else "10" for a in args]) == 2  # other settings into the same folder: refused
    assert "written with" in capsys.readouterr().err
    assert main(["prepare", "--text-encoder", str(text_dir), "--out", str(tmp_path / "o2")]) == 2
    assert "FOLDER of videos or --prompts" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("path,caption\nx.mp4,\n")
    assert main(["prepare", "--prompts", str(empty), "--text-encoder", str(text_dir), "--out", str(tmp_path)]) == 2
    assert "--prompts" in capsys.readouterr().err and not (tmp_path / "prompts").exists()
