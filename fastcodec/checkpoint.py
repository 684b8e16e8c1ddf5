"""Checkpoint loading: audiocraft/encodec ``.th`` state_dicts and the Hugging Face ``EncodecModel``
layout, into the same modules through one key map. Never unpickles arbitrary objects
(``torch.load(weights_only=True)`` or safetensors)."""
from __future__ import annotations

import os
import re
import typing as tp

import torch
from torch import nn

_PARAMETRIZATION = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)
_HF_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")
_HF_CODEBOOK = re.compile(r"^quantizer\.layers\.(\d+)\.codebook\.(.*)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says which file/key."""


def read_state_dict(path: tp.Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.th``/``.pt``/``.bin`` (weights_only), ``.safetensors`` or a Hugging Face folder.

    Unwraps the usual containers (``{"state_dict": ...}``, ``{"model": ...}``,
    audiocraft's ``{"best_state": {"model": ...}}``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):  # a Hugging Face folder (save_pretrained) or one holding compression_state_dict.bin
        from .pretrained import load_pretrained
        return load_pretrained(path)[1]
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(f"{path} is a safetensors file: `pip install safetensors` to read it") from e
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    zip_crcs = _verify_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(it is corrupt, not a torch file, or holds pickled objects other than tensors, which "
            "fastcodec refuses to unpickle; save just the state_dict)"
        ) from e
    from .pretrained import check_pointer
    check_pointer(obj, path)
    state = _unwrap(obj, path)
    if zip_crcs is not None:
        _check_storages(path, state, zip_crcs)
    return state


_STORAGE_RECORD = re.compile(r"(^|/)data/\d+$")


def _verify_zip(path: str) -> tp.Optional[set[int]]:
    """CRC-32 check of a zip checkpoint's small members (the pickle, version, byte order: torch.load checks no CRC,
    and a flipped bit there can load different tensors silently). The tensors' own records are checked after the
    load by ``_check_storages``, on the bytes torch read, so the data is read once. Returns every member's CRC, or
    None for a legacy (non-zip) file, which has no checksum."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if _STORAGE_RECORD.search(info.filename):
                    continue
                try:
                    z.read(info)  # zipfile checks the CRC-32 of what it read
                except zipfile.BadZipFile as e:
                    raise CheckpointError(f"checkpoint {path} is corrupt: zip member {info.filename}: {e}") from e
            return {info.CRC for info in z.infolist()}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt zip archive ({type(e).__name__}: {e})") from e


def _check_storages(path: str, state: dict[str, torch.Tensor], crcs: set[int]) -> None:
    """Every storage torch.load returned must have the CRC-32 of a member of the archive: a tensor whose bytes were
    corrupted (or read from elsewhere, after a flipped bit in the central directory) is named."""
    import zlib

    seen = set()
    for k, v in state.items():
        st = v.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        raw = torch.empty(0, dtype=torch.uint8).set_(st).numpy()
        if zlib.crc32(raw) & 0xFFFFFFFF not in crcs:
            raise CheckpointError(f"checkpoint {path} is corrupt: tensor {k} fails the CRC-32 check of the archive "
                                  "(its bytes differ from what was saved)")


def _unwrap(obj: tp.Any, path: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            for key in ("best_state", "state_dict", "model"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    raise CheckpointError(f"{path} does not hold a state_dict of tensors")


def _hf_layer_key(model: nn.Module, side: str, idx: int, rest: str) -> str:
    seq = getattr(getattr(model, side, None), "model", None)
    if seq is None or idx >= len(seq):
        raise CheckpointError(f"Hugging Face key {side}.layers.{idx}.{rest} has no matching layer in the model")
    mod = seq[idx]
    if hasattr(mod, "convtr"):  # StreamableConvTranspose1d: HF names it "conv"
        head, _, tail = rest.partition(".")
        return f"{side}.model.{idx}.convtr.{'convtr' if head == 'conv' else head}.{tail}"
    if hasattr(mod, "block"):  # residual block: block.{j}.conv.X / shortcut.conv.X
        m = re.match(r"^(block\.\d+|shortcut)\.(conv|norm)\.(.*)$", rest)
        if m:
            return f"{side}.model.{idx}.{m.group(1)}.conv.{m.group(2)}.{m.group(3)}"
        return f"{side}.model.{idx}.{rest}"
    if hasattr(mod, "lstm"):
        return f"{side}.model.{idx}.{rest}"
    if hasattr(mod, "conv"):  # StreamableConv1d: conv.X -> conv.conv.X, norm.X -> conv.norm.X
        head, _, tail = rest.partition(".")
        return f"{side}.model.{idx}.conv.{head}.{tail}"
    return f"{side}.model.{idx}.{rest}"


def convert_state_dict(state: tp.Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a state_dict in any supported layout onto ``model``'s keys (audiocraft's names).

    Handles: audiocraft/encodec keys as they are; a leading ``model.``/``module.`` prefix;
    the Hugging Face ``EncodecModel`` layout (``encoder.layers.N...``, ``quantizer.layers.K.codebook``);
    weight-norm parametrization keys (``parametrizations.weight.original0/1`` -> ``weight_g/v``).
    """
    own = set(model.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        for a, b in _PARAMETRIZATION:
            k = k.replace(a, b)
        if k not in own:
            for prefix in ("module.", "model."):
                if k.startswith(prefix) and k[len(prefix):] in own:
                    k = k[len(prefix):]
                    break
        if k not in own:
            m = _HF_LAYER.match(k)
            if m:
                k = _hf_layer_key(model, m.group(1), int(m.group(2)), m.group(3))
            m = _HF_CODEBOOK.match(k)
            if m:
                k = f"quantizer.vq.layers.{m.group(1)}._codebook.{m.group(2)}"
        if k in out:
            raise CheckpointError(f"two checkpoint keys map to {k!r} (one is {key!r})")
        out[k] = value
    return out


def load_checkpoint(model: nn.Module, source: tp.Union[str, os.PathLike, tp.Mapping[str, torch.Tensor]],
                    strict: bool = True) -> nn.Module:
    """Load ``source`` (a path or a state_dict, any supported layout) into ``model``.

    Raises ``CheckpointError`` naming missing, unexpected or misshapen keys, and any tensor that holds NaN/Inf.
    """
    if isinstance(source, (str, os.PathLike)):
        state = read_state_dict(source)
    elif isinstance(source, tp.Mapping):
        state = dict(source)
    else:
        raise TypeError(f"source must be a path (str or os.PathLike) or a state_dict mapping, "
                        f"got {type(source).__name__}")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"state_dict keys must be str, got {bad_keys[:3]!r}")
    state = convert_state_dict(state, model)
    check_state_dict(model, state, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model


def check_state_dict(model: nn.Module, state: tp.Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Raise ``CheckpointError`` if keys are missing/unexpected (strict) or shapes/dtypes do not fit."""
    own = model.state_dict()
    bad = []
    for k, v in state.items():
        if k in own:
            if not isinstance(v, torch.Tensor):
                bad.append(f"{k}: not a tensor ({type(v).__name__})")
            elif tuple(v.shape) != tuple(own[k].shape):
                bad.append(f"{k}: shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
            elif v.is_floating_point() != own[k].is_floating_point():
                bad.append(f"{k}: dtype {v.dtype}, the model has {own[k].dtype}")
            elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
                n = int((~torch.isfinite(v)).sum())
                bad.append(f"{k}: holds {n} NaN/Inf value(s) (a corrupt or diverged checkpoint)")
    if bad:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(bad[:10])
                              + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            msg = []
            if missing:
                msg.append(f"missing keys {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
            if unexpected:
                msg.append(f"unexpected keys {unexpected[:8]}"
                           + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
            raise CheckpointError("checkpoint does not fit the model: " + "; ".join(msg))
