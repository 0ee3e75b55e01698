"""Media for the real-weight fidelity table: file readers and a checkpoint's own processor (needs transformers).

``--suite real --model PATH`` with ``--audio`` / ``--video`` / ``--image FILE`` hands these files to the processor
saved next to the weights (:func:`load_processor`). The readers need only the standard library, numpy and PIL:

    audio  ``.wav`` (stdlib ``wave``; 8/16/24/32-bit PCM), mixed to mono, resampled by linear interpolation to the
           feature extractor's sampling rate
    video  ``.npy`` frames ``[T, H, W, 3]`` uint8 (``np.save``); any other format through transformers' own
           ``load_video`` when one of its backends (PyAV, decord, OpenCV, torchcodec) is installed
    image  any format PIL opens, converted to RGB

transformers builds no video processor without torchvision (and then no processor at all for the Qwen2.5-VL,
Qwen3-VL and Qwen2.5-Omni families, whose processors all hold one). Without torchvision :func:`load_processor`
loads every other part of the checkpoint's processor as transformers does and puts :class:`TorchVideoProcessor`
in the video slot: the Qwen2-VL video preprocessing (resize to a multiple of patch x merge within the pixel bounds,
rescale, normalise, frames padded to the temporal patch, the vision tower's patch layout) in plain torch, read from
the same saved config. Its bicubic resize is torch's, not torchvision's, so pixels can differ in the last bits; the
patch layout, grids and placeholder counts are the same.
"""
from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import torch
try:  # transformers 5.2x+: a video processor base that needs no torchvision
    from transformers.video_processing_utils import VideoProcessorMixin as _VideoProcessorBase
except ImportError:  # earlier 5.x (5.17): every video processor is built on torchvision; no stand-in there
    _VideoProcessorBase = None

__all__ = ["MEDIA", "PROCESSOR_FILES", "TorchVideoProcessor", "check_media_path", "has_processor", "load_processor",
           "read_audio", "read_image", "read_media", "read_video"]

MEDIA = ("image", "video", "audio")
"""The media options, in the order their placeholders open the context."""
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
"""A checkpoint folder with one of these has a processor (what ``processor.save_pretrained`` writes)."""
_VIDEO_BACKENDS = (("pyav", "is_av_available"), ("decord", "is_decord_available"), ("opencv", "is_cv2_available"),
                   ("torchcodec", "is_torchcodec_available"))


def _video_backend() -> str | None:
    """The first of transformers' video loader backends that is installed, or None."""
    from transformers.utils import import_utils

    return next((name for name, check in _VIDEO_BACKENDS if getattr(import_utils, check)()), None)


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {s.lower() for s in Image.registered_extensions()}


def check_media_path(option: str, path) -> Path:
    """The path of ``--<option>`` when the file exists and has a format that option reads.

    Raises:
        FileNotFoundError: no such file; ValueError: a format the option does not read (the message lists those it
            does).
    """
    if option not in MEDIA:
        raise ValueError(f"media option must be one of {', '.join(MEDIA)}, got {option!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{option} {path}: no such file")
    suffix = path.suffix.lower()
    if option == "audio" and suffix != ".wav":
        raise ValueError(f"--audio {path}: audio is read from .wav files (PCM, any rate and channel count); "
                         f"got {suffix or 'no extension'}")
    if option == "video" and suffix != ".npy" and _video_backend() is None:
        raise ValueError(f"--video {path}: here video is read from .npy frames [T, H, W, 3] uint8 (np.save); "
                         f"{suffix or 'no extension'} needs one of transformers' video loader backends installed "
                         "(PyAV, decord, OpenCV or torchcodec)")
    if option == "image" and suffix not in _image_suffixes():
        raise ValueError(f"--image {path}: not an image format PIL reads ({suffix or 'no extension'}); "
                         "use e.g. .png or .jpg")
    return path


def read_audio(path, sampling_rate: int) -> np.ndarray:
    """A ``.wav`` file as float32 samples in [-1, 1], mono (channels averaged), at ``sampling_rate`` Hz.

    Raises:
        FileNotFoundError / ValueError naming ``--audio``: no file, not a PCM wav, or no samples.
    """
    path = check_media_path("audio", path)
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"--audio {path}: not a PCM .wav file ({e})") from e
    if n == 0:
        raise ValueError(f"--audio {path}: the file has no samples")
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: sign-extend into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2.0 ** 23
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2.0 ** (8 * width - 1)
    else:
        raise ValueError(f"--audio {path}: {8 * width}-bit samples are not PCM that wave reads")
    x = x.reshape(-1, channels).mean(axis=1)
    if rate != sampling_rate:
        t_out = np.arange(math.floor(len(x) * sampling_rate / rate)) / sampling_rate
        x = np.interp(t_out, np.arange(len(x)) / rate, x)
    return np.ascontiguousarray(x, dtype=np.float32)


def read_video(path) -> tuple[np.ndarray, dict]:
    """Frames ``[T, H, W, 3]`` uint8 and what is known of them (``fps`` when the file says it).

    ``.npy``: an array saved by ``np.save`` (no pickles); anything else goes to transformers' ``load_video`` with the
    first installed backend.

    Raises:
        FileNotFoundError / ValueError naming ``--video``.
    """
    path = check_media_path("video", path)
    if path.suffix.lower() != ".npy":
        from transformers.video_utils import load_video

        frames, metadata = load_video(str(path), backend=_video_backend())
        frames = np.asarray(frames)
        info = {"fps": getattr(metadata, "fps", None)}
    else:
        try:
            frames = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--video {path}: not a plain .npy array ({e})") from e
        info = {}
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
        raise ValueError(f"--video {path}: expected frames [T, H, W, 3] uint8, got {list(frames.shape)} "
                         f"{frames.dtype}")
    return frames, info


def read_image(path):
    """An image file as an RGB ``PIL.Image``. Raises FileNotFoundError / ValueError naming ``--image``."""
    from PIL import Image, UnidentifiedImageError

    path = check_media_path("image", path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: PIL cannot read it ({e})") from e


# ------------------------------------------------------------------------------------------- processor loading
def has_processor(folder) -> bool:
    """Whether a checkpoint folder holds a processor config (:data:`PROCESSOR_FILES`)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in PROCESSOR_FILES)


def _processor_class(folder: Path):
    """The processor class a checkpoint folder names (its processor config, else its model type's default)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in PROCESSOR_FILES + ("tokenizer_config.json",):
        file = folder / name
        if file.is_file():
            cls_name = json.loads(file.read_text()).get("processor_class")
            if cls_name and hasattr(transformers, cls_name):
                return getattr(transformers, cls_name)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls_name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if cls_name is None:
        raise ValueError(f"--model {folder}: found no processor class for model_type {config.model_type!r}")
    return getattr(transformers, cls_name)


def load_processor(folder):
    """The processor saved in a checkpoint folder, or None when it has none (:func:`has_processor`).

    ``AutoProcessor`` where it can build it; without torchvision, a processor whose class holds a video processor
    is assembled from the same files with :class:`TorchVideoProcessor` in that slot (see the module docstring).
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    folder = Path(folder)
    if not has_processor(folder):
        return None
    cls = _processor_class(folder)
    if is_torchvision_available() or "video_processor" not in cls.get_attributes():
        return AutoProcessor.from_pretrained(folder)
    if _VideoProcessorBase is None:
        import transformers

        raise ModuleNotFoundError(f"--model {folder}: {cls.__name__} holds a video processor, which transformers "
                                  f"{transformers.__version__} builds only with torchvision: pip install torchvision "
                                  "(or use transformers 5.24, where this bench brings its own)")
    return _without_torchvision(cls).from_pretrained(folder)


def _without_torchvision(cls):
    """``cls`` (a processor class) loading :class:`TorchVideoProcessor` as its video processor; same name, so the
    folder it saves names the real class."""
    from transformers.processing_utils import MODALITY_TO_AUTOPROCESSOR_MAPPING, _get_modality_for_attribute

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, TorchVideoProcessor):
            return TorchVideoProcessor
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(sub, path, processor_dict=None, **kwargs):
        kwargs.pop("subfolder", None)
        args = []
        for name in sub.get_attributes():
            modality = _get_modality_for_attribute(name)
            if name == "video_processor":
                args.append(TorchVideoProcessor.from_pretrained(path, **kwargs))
            elif modality == "tokenizer":
                args.append(sub._load_tokenizer_from_pretrained(name, path, **kwargs))
            else:
                args.append(MODALITY_TO_AUTOPROCESSOR_MAPPING[name].from_pretrained(path, **kwargs))
        return args

    return type(cls.__name__, (cls,), dict(check_argument_for_proper_class=check_argument_for_proper_class,
                                           _get_arguments_from_pretrained=_get_arguments_from_pretrained,
                                           __module__=__name__))


class TorchVideoProcessor(_VideoProcessorBase if _VideoProcessorBase is not None else object):
    """Qwen2-VL video preprocessing in plain torch (transformers' ``Qwen2VLVideoProcessor`` needs torchvision).

    ``videos``: one array or a list of ``[T, H, W, 3]`` uint8 frames. Each video is resized to ``(h, w)``, multiples
    of ``patch_size * merge_size`` nearest its own size within ``size["shortest_edge"]`` .. ``size["longest_edge"]``
    pixels (bicubic, antialiased), rescaled and normalised, its frames padded to a multiple of
    ``temporal_patch_size`` with the last one, and cut into the vision tower's patch rows: returns
    ``pixel_values_videos [sum of t*h*w patches, 3 * temporal * patch * patch]`` and ``video_grid_thw [n, 3]``
    (plus ``video_metadata`` when asked, at ``fps`` frames a second unless given). Saved configs name the class
    it was loaded for (``Qwen2VLVideoProcessor`` by default): with torchvision, transformers loads the real one.
    Frames are taken as given: no sampling by ``fps`` (Qwen3-VL's own processor samples by default).
    """

    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    image_mean = [0.48145466, 0.4578275, 0.40821073]  # CLIP's, as Qwen2-VL
    image_std = [0.26862954, 0.26130258, 0.27577711]
    do_resize = do_rescale = do_normalize = do_convert_rgb = True
    rescale_factor = 1 / 255
    patch_size, temporal_patch_size, merge_size = 14, 2, 2
    fps = 2.0
    return_metadata = False
    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    _FIELDS = ("size", "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb",
               "rescale_factor", "patch_size", "temporal_patch_size", "merge_size", "fps")

    def __init__(self, **kwargs):
        size = dict(kwargs.pop("size", None) or self.size)
        if kwargs.get("min_pixels") is not None:
            size["shortest_edge"] = kwargs.pop("min_pixels")
        if kwargs.get("max_pixels") is not None:
            size["longest_edge"] = kwargs.pop("max_pixels")
        stands_in_for = kwargs.pop("video_processor_type", None) or "Qwen2VLVideoProcessor"
        super().__init__(**kwargs)
        self._stands_in_for = stands_in_for
        self.size = size
        for name in self._FIELDS[1:]:  # saved with the config, as the real processor saves them
            setattr(self, name, kwargs.get(name, getattr(type(self), name)))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_stands_in_for", None)
        out["video_processor_type"] = self._stands_in_for
        return out

    def _target_size(self, height: int, width: int, size: dict, factor: int) -> tuple[int, int]:
        """The (h, w) multiples of ``factor`` closest to (height, width) whose area lies within the size bounds."""
        lo, hi = size["shortest_edge"], size["longest_edge"]
        h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h * w > hi:
            scale = math.sqrt(height * width / hi)
            h = max(factor, math.floor(height / scale / factor) * factor)
            w = max(factor, math.floor(width / scale / factor) * factor)
        elif h * w < lo:
            scale = math.sqrt(lo / (height * width))
            h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
        return h, w

    def preprocess(self, videos, video_metadata=None, return_metadata=None, return_tensors=None, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import VideoMetadata

        o = {name: kwargs.get(name) if kwargs.get(name) is not None else getattr(self, name) for name in self._FIELDS}
        p, tp, m = o["patch_size"], o["temporal_patch_size"], o["merge_size"]
        videos = [videos] if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4 else list(videos)
        rows, grids, metadata = [], [], []
        mean = torch.tensor(o["image_mean"]).view(1, 3, 1, 1)
        std = torch.tensor(o["image_std"]).view(1, 3, 1, 1)
        for i, frames in enumerate(videos):
            x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
            T, _, H, W = x.shape
            if o["do_resize"]:
                h, w = self._target_size(H, W, o["size"], p * m)
                x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                                                    align_corners=False).round().clamp(0, 255)
            if o["do_rescale"]:
                x = x * o["rescale_factor"]
            if o["do_normalize"]:
                x = (x - mean) / std
            if pad := -T % tp:
                x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            t, gh, gw = x.shape[0] // tp, x.shape[2] // p, x.shape[3] // p
            x = x.reshape(t, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            rows.append(x.reshape(t * gh * gw, 3 * tp * p * p))
            grids.append([t, gh, gw])
            given = video_metadata[i] if video_metadata is not None else None
            metadata.append(given if given is not None else VideoMetadata(
                total_num_frames=T, fps=o["fps"], width=W, height=H, duration=T / o["fps"],
                frames_indices=list(range(T))))
        data = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}
        if return_metadata if return_metadata is not None else self.return_metadata:
            data["video_metadata"] = metadata
        return BatchFeature(data=data)


def read_media(paths: dict, processor) -> dict:
    """``{"image": PIL image, "video": (frames, info), "audio": samples}`` from ``{"image": path, ...}`` (any
    subset), audio at the processor's feature extractor rate: what :func:`acckv_triton.bench.realmodel.media_inputs`
    takes.

    Raises:
        FileNotFoundError / ValueError naming the option: a missing file, an unreadable format, or a medium the
        processor does not take.
    """
    out = {}
    for name, path in paths.items():
        check_media_path(name, path)
        if name == "image":
            out[name] = read_image(path)
        elif name == "video":
            out[name] = read_video(path)
        else:
            extractor = getattr(processor, "feature_extractor", None)
            if extractor is None:
                raise ValueError(f"--audio {path}: this checkpoint's processor ({type(processor).__name__}) has no "
                                 "feature extractor, so it takes no audio")
            out[name] = read_audio(path, extractor.sampling_rate)
    return out
