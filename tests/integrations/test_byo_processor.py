"""``--suite real --model PATH`` with ``--audio`` / ``--video`` / ``--image``: tiny checkpoints saved with
save_pretrained (a Qwen2.5-Omni thinker and a Qwen2.5-VL, each with its processor and an in-process word tokenizer),
media files written here (stdlib wave, np.save, PIL), the real loading code end to end; and the readers' and the
options' errors."""
from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.bench import media, realmodel  # noqa: E402
from acckv_triton.bench.__main__ import main  # noqa: E402
from acckv_triton.integrations.transformers import apply_acckv, cache_keyword  # noqa: E402

def _video_processors_buildable() -> bool:
    from transformers.utils import is_torchvision_available

    return media._VideoProcessorBase is not None or is_torchvision_available()


# transformers 5.17 builds a video processor (and so a VL / Omni processor) only with torchvision, which the CPU
# wheels here cannot sit beside; load_processor then raises naming it. 5.24, which CI installs, needs neither.
needs_video_processor = pytest.mark.skipif(not _video_processors_buildable(),
                                           reason="this transformers builds video processors only with torchvision")

from .tiny_models import VOCAB, tiny_causal_lm, tiny_omni_thinker, tiny_vl  # noqa: E402

WORDS = [f"w{i}" for i in range(1, 140)]
OMNI_TOKENS = {"audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>", "image_token": "<|IMAGE|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>"}
VL_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
VL_WRAP = ("<|vision_start|>", "<|vision_end|>")
SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)  # 2x2 .. 4x4 merged tokens per frame pair


def _word_tokenizer(special: list[str], named: dict):
    """A whitespace word-level tokenizer over :data:`WORDS`, the special tokens at ids 150, 151, ... (the tiny
    models' placeholder ids), ``named`` as the tokenizer attributes the processors read (``audio_token``, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<|endoftext|>": 140}
    vocab.update({token: 150 + i for i, token in enumerate(special)})
    assert max(vocab.values()) < VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(special)  # matched whole, before the whitespace split
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   extra_special_tokens=named)


def _video_processor():
    """Transformers' Qwen2-VL video processor where torchvision is installed, else the bench's stand-in."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(**SMALL), Qwen2VLVideoProcessor
    return media.TorchVideoProcessor(**SMALL), media.TorchVideoProcessor


def _processor_class(cls):
    from transformers.utils import is_torchvision_available

    return cls if is_torchvision_available() else media._without_torchvision(cls)


@pytest.fixture(scope="module")
def omni_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-Omni thinker and its Qwen2_5OmniProcessor (Whisper features, Qwen2-VL image and video)."""
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessorPil, WhisperFeatureExtractor

    folder = tmp_path_factory.mktemp("omni")
    tokenizer = _word_tokenizer(list(OMNI_TOKENS.values()), OMNI_TOKENS)
    processor = _processor_class(Qwen2_5OmniProcessor)(
        image_processor=Qwen2VLImageProcessorPil(**SMALL), video_processor=_video_processor()[0],
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=2),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    model = tiny_omni_thinker()
    ids = tokenizer.convert_tokens_to_ids
    model.config.audio_token_index, model.config.video_token_index = ids("<|AUDIO|>"), ids("<|VIDEO|>")
    model.config.image_token_index = ids("<|IMAGE|>")
    model.config.audio_start_token_id, model.config.audio_end_token_id = ids("<|audio_bos|>"), ids("<|audio_eos|>")
    model.config.vision_start_token_id, model.config.vision_end_token_id = ids("<|vision_bos|>"), ids("<|vision_eos|>")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-VL and its Qwen2_5_VLProcessor (Qwen2-VL image and video processors)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("vl")
    tokenizer = _word_tokenizer([VL_TOKENS["image_token"], VL_TOKENS["video_token"], *VL_WRAP], VL_TOKENS)
    processor = _processor_class(Qwen2_5_VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(**SMALL), tokenizer=tokenizer, video_processor=_video_processor()[0])
    processor.save_pretrained(folder)
    model = tiny_vl("qwen2_5_vl")
    ids = tokenizer.convert_tokens_to_ids
    model.config.image_token_id = ids(VL_TOKENS["image_token"])
    model.config.video_token_id = ids(VL_TOKENS["video_token"])
    model.config.vision_start_token_id, model.config.vision_end_token_id = ids(VL_WRAP[0]), ids(VL_WRAP[1])
    model.save_pretrained(folder)
    return folder


def _write_wav(path, *, seconds=1.0, rate=8000, channels=2, width=2, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    full = 2 ** (8 * width - 1) - 1
    pcm = np.round(x * full).astype(np.int64)
    if width == 1:
        raw = (pcm + 128).astype(np.uint8).tobytes()
    elif width == 3:
        b = (pcm & 0xFFFFFF).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
        raw = b.tobytes()
    else:
        raw = pcm.astype(f"<i{width}").tobytes()
    frames = np.frombuffer(raw, np.uint8).reshape(len(t), width)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(np.repeat(frames, channels, axis=0).tobytes())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 1 s stereo 8 kHz wav, 4 video frames of 56 x 70 (.npy), a 60 x 60 PNG and 700 words of text."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    g = np.random.default_rng(0)
    np.save(folder / "clip.npy", g.integers(0, 256, (4, 56, 70, 3), dtype=np.uint8))
    Image.fromarray(g.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(folder / "frame.png")
    (folder / "notes.txt").write_text(" ".join(g.choice(WORDS, 700)))
    return dict(audio=_write_wav(folder / "speech.wav"), video=folder / "clip.npy", image=folder / "frame.png",
                text=folder / "notes.txt")


def _run_real(tmp_path, checkpoint, files, *names):
    argv = ["--suite", "real", "--quick", "--model", str(checkpoint), "--text", str(files["text"]),
            "--out", str(tmp_path / "out")]
    for name in names:
        argv += [f"--{name}", str(files[name])]
    assert main(argv) == 0
    return json.loads((tmp_path / "out" / "bench.json").read_text())["tables"]["real_fidelity"]


def _check_rows(rows, modalities):
    assert {r["method"] for r in rows} == {"full", "acckv", "snapkv", "h2o", "streaming"}  # kvzip: refused, said
    assert all(0.0 <= r["top1"] <= 1.0 and math.isfinite(r["kl"]) and r["kl"] > -1e-6 for r in rows)
    full = next(r for r in rows if r["method"] == "full")
    assert full["top1"] == 1.0 and full["kl"] == 0.0
    for m in modalities:  # share of each medium's tokens a compressed cache still holds at the end
        assert full[f"kept {m}"] == 1.0
        assert all(0.0 <= r[f"kept {m}"] <= 1.0 for r in rows) and max(r[f"kept {m}"] for r in rows[1:]) > 0.0


def _check_budget_one_is_the_reference(model, tokenizer, inputs, files):
    """At budget 1.0 the cached run (media forward, then one text token per decode step) reproduces the full
    reference forward: the media tensors and the M-RoPE positions after them reach both alike."""
    rows = realmodel.fidelity_rows(model, tokenizer, context=100, continuation=20, budgets=(1.0,), methods=("acckv",),
                                   text=files["text"].read_text(), step="decode", media=inputs)
    assert rows[1]["top1"] == 1.0 and abs(rows[1]["kl"]) < 1e-6, rows[1]


def _stored_modalities(model, inputs) -> dict:
    """Tokens of each modality a budget-1.0 AccKV cache stores after the media forward (layer 0, kv head 0)."""
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)) as handle:
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache}, use_cache=True)
    mod = cache.layers[0].store.modality[0, 0, :inputs["input_ids"].shape[1]]
    return {m.name.lower(): int((mod == int(m)).sum()) for m in ak.Modality if (mod == int(m)).any()}


@needs_video_processor
def test_omni_thinker_takes_audio_and_video_through_its_processor(omni_checkpoint, files, tmp_path, capsys):
    model, tokenizer, processor = realmodel.load_checkpoint(omni_checkpoint)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5OmniProcessor"
    assert isinstance(processor.video_processor, _video_processor()[1])
    inputs = realmodel.media_inputs(processor, model.config,
                                    media.read_media({"video": files["video"], "audio": files["audio"]}, processor))
    # 1 s of audio: 100 mel frames -> 25 tokens; 4 frames -> 2 temporal patches of merged tokens
    counts = realmodel.media_token_counts(model, inputs["input_ids"])
    assert counts["audio"] == 25 and counts["video"] % 2 == 0 and counts["video"] > 0
    assert {"pixel_values_videos", "video_grid_thw", "input_features", "feature_attention_mask"} <= set(inputs)
    stored = _stored_modalities(model, inputs)
    assert stored["audio"] == 25 and stored["video"] == counts["video"]
    _check_budget_one_is_the_reference(model, tokenizer, inputs, files)

    rows = _run_real(tmp_path, omni_checkpoint, files, "audio", "video")
    _check_rows(rows, ("audio", "video"))
    assert all(r["media"] == "video clip.npy, audio speech.wav" for r in rows)
    report = capsys.readouterr().out
    assert "kvzip does not run on this model: apply_acckv: reconstruction evidence" in report
    assert f"{inputs['input_ids'].shape[1]} media tokens (video clip.npy, audio speech.wav" in report
    assert "512 text tokens compressed" in report


@needs_video_processor
def test_qwen2_5_vl_takes_an_image_and_a_video_through_its_processor(vl_checkpoint, files, tmp_path):
    model, tokenizer, processor = realmodel.load_checkpoint(vl_checkpoint)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    inputs = realmodel.media_inputs(processor, model.config,
                                    media.read_media({"image": files["image"], "video": files["video"]}, processor))
    assert {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
            "mm_token_type_ids"} <= set(inputs)
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == model.config.vision_start_token_id and ids[-1] == model.config.vision_end_token_id
    counts = realmodel.media_token_counts(model, inputs["input_ids"])
    assert _stored_modalities(model, inputs) == {"text": 4, **counts}  # the 2 + 2 start / end tokens are text
    _check_budget_one_is_the_reference(model, tokenizer, inputs, files)
    rows = _run_real(tmp_path, vl_checkpoint, files, "image", "video")
    _check_rows(rows, ("image", "video"))


def test_read_audio_mixes_to_mono_and_resamples(tmp_path):
    for width in (1, 2, 3):
        x = media.read_audio(_write_wav(tmp_path / f"tone{width}.wav", width=width, rate=8000), 16000)
        assert x.dtype == np.float32 and x.shape == (16000,)
        t = np.arange(16000) / 16000
        assert np.abs(x[:-2] - 0.5 * np.sin(2 * np.pi * 440 * t[:-2])).max() < 0.05  # linear interp of a 440 Hz tone


@needs_video_processor
def test_media_options_name_what_is_wrong(omni_checkpoint, files, tmp_path):
    words = [f"w{i}" for i in range(1, VOCAB - 1)]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "llama")
    tiny_causal_lm("llama").save_pretrained(tmp_path / "llama")
    real = ["--suite", "real", "--quick", "--text", str(files["text"])]

    with pytest.raises(SystemExit, match="--audio: media need --model PATH"):
        main(real + ["--audio", str(files["audio"])])
    with pytest.raises(SystemExit, match=r"--video: --model .*llama has no processor"):
        main(real + ["--model", str(tmp_path / "llama"), "--video", str(files["video"])])
    with pytest.raises(SystemExit, match="--image, --audio: media feed the real-weight table"):
        main(["--suite", "kernels", "--model", str(omni_checkpoint), "--image", str(files["image"]),
              "--audio", str(files["audio"])])
    mp3 = tmp_path / "speech.mp3"
    mp3.write_bytes(b"ID3")
    with pytest.raises(SystemExit, match=r"--audio .*speech.mp3: audio is read from .wav files"):
        main(real + ["--model", str(omni_checkpoint), "--audio", str(mp3)])
    with pytest.raises(SystemExit, match=r"--image .*notes.txt: not an image format PIL reads"):
        main(real + ["--model", str(omni_checkpoint), "--image", str(files["text"])])
    with pytest.raises(SystemExit, match=r"--video .*missing.npy: no such file"):
        main(real + ["--model", str(omni_checkpoint), "--video", str(tmp_path / "missing.npy")])
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match=r"--video .*flat.npy: expected frames \[T, H, W, 3\] uint8, got \[56, 56"):
        media.read_video(flat)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF0000WAVEnope")
    with pytest.raises(ValueError, match=r"--audio .*noise.wav: not a PCM .wav file"):
        media.read_audio(noise, 16000)
    with pytest.raises(ValueError, match=r"--audio: .*\(Qwen2_5_VLProcessor\) takes no audio"):
        _no_audio_processor()


def _no_audio_processor():
    """A Qwen2.5-VL processor asked for audio: the error names the medium it does not take."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    tokenizer = _word_tokenizer([VL_TOKENS["image_token"], VL_TOKENS["video_token"], *VL_WRAP], VL_TOKENS)
    processor = _processor_class(Qwen2_5_VLProcessor)(image_processor=Qwen2VLImageProcessorPil(**SMALL),
                                                      tokenizer=tokenizer, video_processor=_video_processor()[0])
    return realmodel.media_inputs(processor, None, {"audio": np.zeros(1600, np.float32)})


@needs_video_processor
def test_without_a_torchvision_free_video_base_the_processor_load_names_torchvision(omni_checkpoint, monkeypatch):
    """transformers 5.17 has no video processor base that works without torchvision: the error says so."""
    import transformers.utils

    monkeypatch.setattr(media, "_VideoProcessorBase", None)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install torchvision"):
        media.load_processor(omni_checkpoint)
