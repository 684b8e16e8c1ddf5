"""Models from the files users have, offline: Hugging Face folders, encodec ``.th`` files, audiocraft
compression checkpoints.

``from_pretrained(path)`` reads the architecture from the file (``config.json``, audiocraft's ``xp.cfg``, or
the preset an encodec state_dict fits), builds ``fastcodec.EncodecModel`` and loads the weights through
``fastcodec.checkpoint`` (``weights_only`` torch loads or safetensors, NaN/Inf checks). Paths only: a Hugging
Face model id or a MusicGen pointer file (``compression_state_dict.bin`` that names ``facebook/encodec_32khz``)
raises an error saying which folder to download instead.

``EncodecConfig`` mirrors ``transformers.EncodecConfig`` (same fields, defaults and derived properties) so
that transformers is not needed at run time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing as tp

import torch

from .checkpoint import CheckpointError, check_state_dict, convert_state_dict, read_state_dict

_LFS_HEAD = b"version https://git-lfs"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclasses.dataclass
class EncodecConfig:
    """transformers' ``EncodecConfig`` fields and defaults (``facebook/encodec_24khz``), as a dataclass."""

    target_bandwidths: tp.List[float] = dataclasses.field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 24.0])
    sampling_rate: int = 24_000
    audio_channels: int = 1
    normalize: bool = False
    chunk_length_s: tp.Optional[float] = None
    overlap: tp.Optional[float] = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: tp.List[int] = dataclasses.field(default_factory=lambda: [8, 5, 4, 2])
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: tp.Optional[int] = None
    use_conv_shortcut: bool = True
    return_dict: bool = True
    model_type: str = "encodec"
    # other keys of a config.json (architectures, torch_dtype, transformers_version, ...), kept as they are
    extra: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        self.target_bandwidths = [float(b) for b in self.target_bandwidths]
        self.upsampling_ratios = [int(r) for r in self.upsampling_ratios]
        if self.norm_type not in ("weight_norm", "time_group_norm"):
            raise ValueError(f"norm_type must be 'weight_norm' or 'time_group_norm', got {self.norm_type!r}")
        if not self.target_bandwidths:
            raise ValueError("target_bandwidths is empty")
        if self.codebook_dim != self.hidden_size:
            raise ValueError(f"codebook_dim ({self.codebook_dim}) must equal hidden_size ({self.hidden_size}): "
                             "the quantizer works on the encoder output")
        if 2 ** int(math.log2(self.codebook_size)) != self.codebook_size:
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if self.chunk_length_s is not None and self.overlap is None:
            raise ValueError("chunk_length_s is set but overlap is None: chunked encoding needs both "
                             "(transformers cannot encode with this config either)")

    # transformers' derived properties
    @property
    def chunk_length(self) -> tp.Optional[int]:
        return None if self.chunk_length_s is None else int(self.chunk_length_s * self.sampling_rate)

    @property
    def chunk_stride(self) -> tp.Optional[int]:
        if self.chunk_length_s is None or self.overlap is None:
            return None
        return max(1, int((1.0 - self.overlap) * self.chunk_length))

    @property
    def hop_length(self) -> int:
        return int(math.prod(self.upsampling_ratios))

    @property
    def codebook_nbits(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))

    @classmethod
    def from_dict(cls, d: tp.Mapping[str, tp.Any]) -> "EncodecConfig":
        """From a ``config.json`` dict or ``transformers.EncodecConfig(...).to_dict()``; other keys go to
        ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder: tp.Union[str, os.PathLike]) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(self.to_json_string())


# transformers' configs of the three published models (convert_encodec_checkpoint_to_pytorch.py)
PRESETS: tp.Dict[str, tp.Callable[[], EncodecConfig]] = {
    "encodec_24khz": lambda: EncodecConfig(),
    "encodec_32khz": lambda: EncodecConfig(
        target_bandwidths=[2.2], sampling_rate=32_000, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False),
    "encodec_48khz": lambda: EncodecConfig(
        target_bandwidths=[3.0, 6.0, 12.0, 24.0], sampling_rate=48_000, audio_channels=2,
        use_causal_conv=False, norm_type="time_group_norm", normalize=True, chunk_length_s=1.0, overlap=0.01),
}


def config_for(name: str) -> EncodecConfig:
    """The config of ``encodec_24khz``, ``encodec_32khz`` (MusicGen's) or ``encodec_48khz``
    (a ``facebook/`` prefix is accepted)."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[key]()
    config.extra.setdefault("_name_or_path", f"facebook/{key}")  # as transformers' published config.json
    return config


def model_kwargs(config: EncodecConfig) -> dict:
    """SEANet, quantizer and model constructor arguments (audiocraft/encodec names) for ``config``."""
    seanet = dict(channels=config.audio_channels, dimension=config.hidden_size, n_filters=config.num_filters,
                  n_residual_layers=config.num_residual_layers, ratios=list(config.upsampling_ratios),
                  activation="ELU", activation_params={"alpha": 1.0}, norm=config.norm_type,
                  kernel_size=config.kernel_size, last_kernel_size=config.last_kernel_size,
                  residual_kernel_size=config.residual_kernel_size, dilation_base=config.dilation_growth_rate,
                  causal=config.use_causal_conv, pad_mode=config.pad_mode, true_skip=not config.use_conv_shortcut,
                  compress=config.compress, lstm=config.num_lstm_layers)
    rvq = dict(dimension=config.codebook_dim, n_q=config.num_quantizers, bins=config.codebook_size, decay=0.99,
               kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=2)
    model = dict(target_bandwidths=list(config.target_bandwidths), sample_rate=config.sampling_rate,
                 channels=config.audio_channels, normalize=config.normalize, segment=config.chunk_length_s,
                 overlap=0.01 if config.overlap is None else config.overlap,
                 name=_model_name(config))
    return dict(encoder=seanet, decoder={**seanet, "trim_right_ratio": config.trim_right_ratio},
                quantizer=rvq, model=model)


def _model_name(config: EncodecConfig) -> str:
    """encodec's ``model.name`` (what an .ecdc header records): the published model's name for its config
    (``facebook/encodec_24khz`` -> ``encodec_24khz``), else the config's ``_name_or_path``, else ``unset``."""
    name = str(config.extra.get("_name_or_path") or "unset")
    base = name.rstrip("/").split("/")[-1]
    return base if base in PRESETS else name


def build_model(config: EncodecConfig, model_cls=None, encoder_cls=None, decoder_cls=None, quantizer_cls=None):
    """A randomly initialised model of ``config``'s architecture (``fastcodec.EncodecModel`` by default; pass
    ``model_cls=fastcodec.reference.EncodecModel`` for the reference)."""
    from .model import EncodecModel as Fast
    from .quantization import ResidualVectorQuantizer
    from .reference import model as ref
    from .seanet import SEANetDecoder, SEANetEncoder
    model_cls = Fast if model_cls is None else model_cls
    fast = issubclass(model_cls, Fast)
    encoder_cls = encoder_cls or (SEANetEncoder if fast else ref.SEANetEncoder)
    decoder_cls = decoder_cls or (SEANetDecoder if fast else ref.SEANetDecoder)
    quantizer_cls = quantizer_cls or (ResidualVectorQuantizer if fast else ref.ResidualVectorQuantizer)
    kw = model_kwargs(config)
    if kw["quantizer"]["n_q"] < 1:
        raise ValueError(f"config gives {kw['quantizer']['n_q']} codebooks: target_bandwidths "
                         f"{config.target_bandwidths} are too low for {config.frame_rate} Hz frames of "
                         f"{config.codebook_nbits} bits")
    model = model_cls(encoder_cls(**kw["encoder"]), decoder_cls(**kw["decoder"]),
                      quantizer_cls(**kw["quantizer"]), **kw["model"])
    return model.eval()


# -- reading files ------------------------------------------------------------------------------------------

def _is_lfs_pointer(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_LFS_HEAD)) == _LFS_HEAD
    except OSError:
        return False


def _check_not_lfs(path: str) -> None:
    if _is_lfs_pointer(path):
        raise CheckpointError(f"{path} is a Git LFS pointer file, not the weights: fetch the real file "
                              "(`git lfs pull` in the cloned repository, or download the file itself)")


def _read_config_json(path: str) -> EncodecConfig:
    _check_not_lfs(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    if d.get("model_type", "encodec") != "encodec":
        raise CheckpointError(f"{path} is the config of a {d['model_type']!r} model, not an EnCodec model "
                              "(MusicGen folders keep the codec elsewhere: facebook/encodec_32khz)")
    try:
        return EncodecConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid EnCodec config: {e}") from e


def _read_weights_file(path: str) -> dict:
    _check_not_lfs(path)
    return read_state_dict(path)


def _read_hf_folder(folder: str) -> tp.Tuple[dict, str]:
    for name in _WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return _read_weights_file(p), p
    for name in _INDEX_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            _check_not_lfs(p)
            with open(p) as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
            state: dict = {}
            for shard in files:
                state.update(_read_weights_file(os.path.join(folder, shard)))
            return state, p
    present = sorted(os.listdir(folder))
    raise CheckpointError(f"{folder} holds a config.json but no weights (looked for {', '.join(_WEIGHT_FILES)}; "
                          f"the folder has {present}): a config without weights, e.g. an interrupted download")


def _resolve_interpolations(cfg: tp.Any, root: tp.Any = None) -> tp.Any:
    """Resolve OmegaConf's ``${a.b}`` references (whole-string ones) in a plain YAML tree."""
    root = cfg if root is None else root
    if isinstance(cfg, dict):
        return {k: _resolve_interpolations(v, root) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_resolve_interpolations(v, root) for v in cfg]
    if isinstance(cfg, str):
        m = re.fullmatch(r"\$\{([\w.]+)\}", cfg.strip())
        if m:
            node = root
            for part in m.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    raise CheckpointError(f"audiocraft config: cannot resolve {cfg}")
                node = node[part]
            return _resolve_interpolations(node, root)
    return cfg


def config_from_audiocraft(cfg: tp.Union[str, tp.Mapping], where: str = "audiocraft config") -> EncodecConfig:
    """The ``EncodecConfig`` of an audiocraft compression model (``xp.cfg``: YAML text or a dict)."""
    if isinstance(cfg, str):
        try:
            import yaml
        except ImportError as e:
            raise CheckpointError(f"{where} holds its config as YAML: `pip install pyyaml` to read it") from e
        cfg = yaml.safe_load(cfg)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: xp.cfg is not a mapping")
    cfg = _resolve_interpolations(dict(cfg))
    if cfg.get("compression_model", "encodec") != "encodec":
        raise CheckpointError(f"{where}: compression_model {cfg['compression_model']!r} is not EnCodec")
    enc, sea, rvq = cfg.get("encodec") or {}, dict(cfg.get("seanet") or {}), cfg.get("rvq") or {}
    if enc.get("autoencoder", "seanet") != "seanet" or enc.get("quantizer", "rvq") != "rvq":
        raise CheckpointError(f"{where}: only the seanet autoencoder with the rvq quantizer is supported, got "
                              f"{enc.get('autoencoder')!r} / {enc.get('quantizer')!r}")
    dec_over, enc_over = dict(sea.pop("decoder", None) or {}), dict(sea.pop("encoder", None) or {})
    unsupported = []
    if sea.get("activation", "ELU") != "ELU" or (sea.get("activation_params") or {"alpha": 1.0}) != {"alpha": 1.0}:
        unsupported.append(f"activation {sea.get('activation')} {sea.get('activation_params')}")
    if sea.get("norm_params"):
        unsupported.append(f"norm_params {sea['norm_params']}")
    if sea.get("disable_norm_outer_blocks", 0):
        unsupported.append(f"disable_norm_outer_blocks {sea['disable_norm_outer_blocks']}")
    if dec_over.get("final_activation") or enc_over:
        unsupported.append(f"encoder/decoder overrides {enc_over} {dec_over}")
    if unsupported:
        raise CheckpointError(f"{where}: settings EnCodec's config cannot express: {'; '.join(unsupported)}")
    if sea.get("norm", "none") not in ("weight_norm", "time_group_norm"):
        raise CheckpointError(f"{where}: seanet norm {sea.get('norm', 'none')!r} is not supported "
                              "(EnCodec models use weight_norm or time_group_norm)")
    n_q, bins = int(rvq.get("n_q", 8)), int(rvq.get("bins", 1024))
    config = EncodecConfig(
        sampling_rate=int(enc.get("sample_rate", cfg.get("sample_rate"))),
        audio_channels=int(enc.get("channels", sea.get("channels", 1))),
        normalize=bool(enc.get("renormalize", False)), hidden_size=int(sea.get("dimension", 128)),
        num_filters=int(sea.get("n_filters", 32)), num_residual_layers=int(sea.get("n_residual_layers", 3)),
        upsampling_ratios=list(sea.get("ratios", [8, 5, 4, 2])), norm_type=sea["norm"],
        kernel_size=int(sea.get("kernel_size", 7)), last_kernel_size=int(sea.get("last_kernel_size", 7)),
        residual_kernel_size=int(sea.get("residual_kernel_size", 3)),
        dilation_growth_rate=int(sea.get("dilation_base", 2)), use_causal_conv=bool(sea.get("causal", False)),
        pad_mode=sea.get("pad_mode", "reflect"), compress=int(sea.get("compress", 2)),
        num_lstm_layers=int(sea.get("lstm", 0)), trim_right_ratio=float(dec_over.get("trim_right_ratio", 1.0)),
        codebook_size=bins, use_conv_shortcut=not sea.get("true_skip", True), target_bandwidths=[1.0])
    # the smallest bandwidth (kbps) at which transformers' rule gives all n_q codebooks
    bw = n_q * config.frame_rate * config.codebook_nbits / 1000
    config.target_bandwidths = [bw]
    while config.num_quantizers < n_q:
        bw = math.nextafter(bw, math.inf)
        config.target_bandwidths = [bw]
    return config


def check_pointer(obj: tp.Any, path: str) -> None:
    """Raise when ``obj`` (a loaded torch file) is audiocraft's pointer to a compression model by name."""
    if isinstance(obj, dict) and isinstance(obj.get("pretrained"), str) and "best_state" not in obj:
        name = obj["pretrained"]
        raise CheckpointError(
            f"{path} is a pointer file, not weights: audiocraft's export for MusicGen stores only the name "
            f"{name!r} of the compression model. Download that model's Hugging Face folder (config.json and "
            f"model.safetensors, e.g. `huggingface-cli download {name} --local-dir DIR`) and call "
            f"EncodecModel.from_pretrained(DIR)")


def _classify_torch_file(obj: tp.Any, path: str) -> tp.Tuple[tp.Optional[EncodecConfig], dict, str]:
    check_pointer(obj, path)
    if isinstance(obj, dict) and "xp.cfg" in obj and "best_state" in obj:
        best = obj["best_state"]
        if isinstance(best, dict) and isinstance(best.get("model"), dict):
            best = best["model"]
        config = config_from_audiocraft(obj["xp.cfg"], where=f"{path} (an audiocraft compression checkpoint)")
        return config, best, "an audiocraft compression checkpoint"
    from .checkpoint import _unwrap
    return None, _unwrap(obj, path), "a state_dict"


def _load_torch_file(path: str) -> tp.Any:
    _check_not_lfs(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (fastcodec loads "
            "with weights_only=True; an audiocraft training checkpoint holds an OmegaConf config: export it "
            "first with audiocraft.utils.export.export_encodec)") from e


def _signature(state: dict) -> tp.Optional[tuple]:
    """(channels, n_filters, norm, bins, n_q) read from the first conv and the codebooks of a state_dict in
    audiocraft's or transformers' layout; None when they are not there."""
    first = re.compile(r"^(?:model\.|module\.)?encoder\.(?:model|layers)\.0\.conv\.(?:conv\.)?"
                       r"(?:weight_v|weight|parametrizations\.weight\.original1)$")
    w = next((v for k, v in state.items() if first.match(k)), None)
    embeds = [v for k, v in state.items() if k.endswith("codebook.embed")]
    if w is None or w.dim() != 3 or not embeds:
        return None
    norm = "time_group_norm" if any(re.search(r"\.norm\.weight$", k) for k in state) else "weight_norm"
    return int(w.shape[1]), int(w.shape[0]), norm, int(embeds[0].shape[0]), len(embeds)


def _guess_preset(state: dict, path: str) -> EncodecConfig:
    """encodec's .th files hold only a state_dict: pick the published model whose first conv, norm and codebooks
    it has (``load_into`` then checks every key and shape)."""
    sig = _signature(state)
    for name in PRESETS:
        c = config_for(name)
        if sig == (c.audio_channels, c.num_filters, c.norm_type, c.codebook_size, c.num_quantizers):
            return c
    found = ("no encoder.model.0 conv or codebooks" if sig is None else
             "channels %d, n_filters %d, %s, %d codebooks of %d" % (sig[0], sig[1], sig[2], sig[4], sig[3]))
    raise CheckpointError(f"{path} fits none of the published EnCodec models ({found}); "
                          "pass config= (an EncodecConfig, a dict, a preset name or a config.json path)")


def _as_config(config) -> EncodecConfig:
    if isinstance(config, EncodecConfig):
        return config
    if isinstance(config, str) and config.split("/")[-1] in PRESETS:
        return config_for(config)
    if isinstance(config, (str, os.PathLike)):
        return _read_config_json(os.fspath(config))
    if isinstance(config, dict):
        return EncodecConfig.from_dict(config)
    if hasattr(config, "to_dict"):  # transformers.EncodecConfig
        return EncodecConfig.from_dict(config.to_dict())
    raise TypeError(f"config must be an EncodecConfig, a dict, a preset name or a config.json path, "
                    f"got {type(config).__name__}")


def load_pretrained(path: tp.Union[str, os.PathLike], config=None) -> tp.Tuple[EncodecConfig, dict, str]:
    """Read ``path`` into ``(config, state_dict, what)``; ``what`` says which kind of file it was.

    path: a Hugging Face folder (or its ``config.json`` / weights file), an encodec ``.th``, an audiocraft
    compression checkpoint (``{'xp.cfg', 'best_state'}``) or a folder holding ``compression_state_dict.bin``.
    config: overrides the architecture the file describes (needed for state_dicts of unpublished models).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a local file or folder, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        hint = (" (this looks like a Hugging Face model id: fastcodec never downloads; fetch the folder, e.g. "
                f"`huggingface-cli download {path} --local-dir DIR`, and pass DIR)"
                if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else "")
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            cfg_file = os.path.join(path, "config.json")
            file_config: tp.Optional[EncodecConfig] = _read_config_json(cfg_file)
            state, wfile = _read_hf_folder(path)
            what = f"{wfile} (a Hugging Face folder)"
        elif os.path.isfile(os.path.join(path, "compression_state_dict.bin")):
            return load_pretrained(os.path.join(path, "compression_state_dict.bin"), config)
        else:
            raise CheckpointError(f"{path} is a folder without config.json or compression_state_dict.bin "
                                  f"(it has {sorted(os.listdir(path))[:20]}); pass the checkpoint file itself")
    elif os.path.basename(path) == "config.json":
        return load_pretrained(os.path.dirname(path) or ".", config)
    elif path.endswith(".safetensors"):
        state, what = _read_weights_file(path), f"{path} (a safetensors file)"
        cfg_file = os.path.join(os.path.dirname(path), "config.json")
        file_config = _read_config_json(cfg_file) if os.path.isfile(cfg_file) else None
    else:
        file_config, state, kind = _classify_torch_file(_load_torch_file(path), path)
        what = f"{path} ({kind})"
    if config is not None:
        file_config = _as_config(config)
    if file_config is None:
        file_config = _guess_preset(state, what)
    return file_config, state, what


def load_into(model: torch.nn.Module, state: dict, what: str) -> None:
    """Convert ``state`` to ``model``'s keys, check it (keys, shapes, NaN/Inf) and load it."""
    try:
        converted = convert_state_dict(state, model)
        check_state_dict(model, converted, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    model.load_state_dict(converted, strict=True)


def from_pretrained(path: tp.Union[str, os.PathLike], config=None, model_cls=None, **module_classes):
    """``EncodecModel.from_pretrained``: build the architecture ``path`` describes and load its weights."""
    cfg, state, what = load_pretrained(path, config)
    model = build_model(cfg, model_cls=model_cls, **module_classes)
    load_into(model, state, what)
    model.config = cfg
    return model.eval()
