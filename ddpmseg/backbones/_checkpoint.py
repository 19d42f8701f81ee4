"""Reading, checking and recognising guided-diffusion (ADM) checkpoints.

A checkpoint is ``torch.save(UNetModel.state_dict())``; ``filter_state_dict``
is the one place where foreign layouts (wrapper dicts, ``module.`` prefixes)
are mapped onto the U-Net's own keys. It is loaded with
``weights_only=True``: ddpmseg never unpickles code. Architectures are compared
by their *signature* (parameter name -> shape), computed from a model built on
the ``meta`` device, so no weights are allocated even for the 552 M-parameter
256x256 ADM.
"""

from __future__ import annotations

import difflib
import functools
import logging
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

import ddpmseg.backbones.runs as runs
from ddpmseg.backbones._registry import get_preset, list_presets
from ddpmseg.backbones.adm import build_unet
from ddpmseg.backbones.configs import AdmConfig
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

Signature = dict[str, tuple[int, ...]]

WRAPPER_KEYS = ("state_dict", "model", "ema", "model_state_dict")
STRIP_PREFIXES = ("module.", "model.")

# What torch.load raises on files that are not (intact) torch checkpoints.
_LOAD_ERRORS = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    OSError,
    KeyError,
    ValueError,
    IndexError,
    UnicodeDecodeError,
    struct.error,
)


# --------------------------------------------------------------------------- reading


def _first_line(e: BaseException, limit: int = 120) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # skip torch's generic weights_only preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0].split(". ")[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _preset_named(name: str) -> str | None:
    """The preset a missing checkpoint's name stands for (its name, file name, or close to one), else None."""
    ours = {n: n for n in list_presets()}
    ours.update({get_preset(n).filename: n for n in list_presets()})
    ours.update({Path(get_preset(n).filename).stem: n for n in list_presets()})
    close = difflib.get_close_matches(name, list(ours), n=1, cutoff=0.8)
    return ours[close[0]] if close else None


def _missing_file_error(path: Path) -> DdpmsegError:
    """That ``path`` does not exist, with the closest name beside it, and ``ddpmseg download`` only for
    a name that looks like a preset's."""
    folder = path.parent
    said = f"checkpoint {path} does not exist"
    if not folder.is_dir():
        said += f" (nor does its folder {folder});"
    else:
        siblings = sorted(e.name for e in folder.iterdir() if not e.name.startswith("."))
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        found = sorted(n for n in siblings if n.endswith(".pt"))
        if close:
            what = runs.describe_folder(folder / close[0]) or ("a folder" if (folder / close[0]).is_dir() else "a file")
            said += f"; did you mean {folder / close[0]} ({what})? Else,"
        elif found:
            said += f" ({folder} holds: {', '.join(found[:8]) + (', ...' if len(found) > 8 else '')});"
        else:
            said += ";"
    preset = _preset_named(path.name)
    if preset is not None:
        return DdpmsegError(f"{said} to fetch the published checkpoint of preset {preset}, run "
                            f"`ddpmseg download {preset}` (`ddpmseg presets` lists them all)")
    return DdpmsegError(f"{said} pass a checkpoint file, a train-ddpm run folder or a diffusers model folder")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, source: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or the one unambiguous wrapper entry."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if _is_tensor_dict(obj):
            return obj
        if not isinstance(obj, Mapping):
            raise DdpmsegError(
                f"checkpoint {source} holds a {type(obj).__name__}, not a state dict; "
                "save it with torch.save(model.state_dict(), PATH)"
            )
        candidates = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])]
        if len(candidates) > 1:
            raise DdpmsegError(
                f"checkpoint {source} is ambiguous: entries {', '.join(repr(k) for k in candidates)} "
                "all hold weights; save the one you want with torch.save(ckpt[KEY], PATH)"
            )
        if not candidates:
            break
        obj = obj[candidates[0]]
    if isinstance(obj, Mapping) and _has_tensors(obj):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise DdpmsegError(
            f"checkpoint {source}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; "
            "expected a plain state dict (torch.save(model.state_dict(), PATH))"
        )
    keys = ", ".join(repr(k) for k in list(obj)[:5]) if isinstance(obj, Mapping) else ""
    raise DdpmsegError(
        f"checkpoint {source} holds no tensors (top-level keys: {keys or 'none'}); "
        "expected a state dict saved with torch.save(model.state_dict(), PATH)"
    )


def _has_tensors(obj: Any, depth: int = 2) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if depth and isinstance(obj, Mapping):
        return any(_has_tensors(v, depth - 1) for v in obj.values())
    return False


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict of tensors without unpickling any code.

    Accepts a plain state dict or a dict with exactly one of the entries
    ``state_dict`` / ``model`` / ``ema`` / ``model_state_dict``; a ``module.``
    (DataParallel) or ``model.`` prefix shared by all keys is removed.
    """
    path = Path(path)
    if not path.exists():
        raise _missing_file_error(path)
    if path.is_dir():
        raise DdpmsegError(f"checkpoint {path} is a folder; pass the .pt file inside it")
    mmap = zipfile.is_zipfile(path)  # zip-format files can be memory-mapped (no 2nd copy in RAM)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter; failures are reported below
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e).lower()
        if "weights only load failed" in text and "unsupported operand" not in text:
            found = re.search(r"global:? (?:global )?([\w.]+)", str(e), flags=re.IGNORECASE)
            what = f" (e.g. {found.group(1)})" if found else ""
            raise DdpmsegError(
                f"checkpoint {path} contains non-tensor Python objects{what} and ddpmseg refuses to unpickle code; "
                "re-save only the weights with torch.save(model.state_dict(), PATH) from a trusted session"
            ) from None
        raise _not_torch_error(path, e) from None
    except _LOAD_ERRORS as e:
        raise _not_torch_error(path, e) from None
    state = filter_state_dict(obj, str(path))
    log.debug("read %d tensors from %s", len(state), path)
    return state


def filter_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The U-Net state dict inside a loaded checkpoint object: unwrapped and with shared prefixes removed."""
    return _strip_prefixes(_unwrap(obj, source))


def _not_torch_error(path: Path, e: BaseException) -> DdpmsegError:
    return DdpmsegError(
        f"checkpoint {path} is not a readable torch file ({type(e).__name__}: {_first_line(e)}); "
        "it may be truncated or of another format: download it again"
    )


# --------------------------------------------------------------------------- signatures


def state_signature(state: Mapping[str, Any]) -> Signature:
    """Parameter name -> shape of a state dict (tensors of any device, meta included)."""
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.lru_cache(maxsize=32)
def _config_signature(config: AdmConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = build_unet(config)
    return tuple(state_signature(model.state_dict()).items())


def config_signature(config: AdmConfig) -> Signature:
    """The signature of guided-diffusion's U-Net for ``config``, built without allocating weights."""
    return dict(_config_signature(config))


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _mismatch(expected: Signature, found: Signature) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and expected[k] != found[k]]
    return missing, unexpected, shapes


def check_signature(expected: Signature, state: Mapping[str, Any], expected_name: str, source: str) -> None:
    """Raise a one-line DdpmsegError unless ``state`` has exactly ``expected``'s keys and shapes."""
    found = state_signature(state)
    missing, unexpected, shapes = _mismatch(expected, found)
    if not (missing or unexpected or shapes):
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if shapes:
        shown = "; ".join(f"{k}: file {_fmt_shape(found[k])} vs model {_fmt_shape(expected[k])}" for k in shapes[:3])
        parts.append(f"{len(shapes)} shape mismatches ({shown}{'; ...' if len(shapes) > 3 else ''})")
    presets = matching_presets(state)
    flags = expected_name == "the given flags"
    if presets:
        hint = f"it matches preset {', '.join(presets)}; use --preset {presets[0]}" + (" instead" if flags else "")
    elif flags:
        hint = "no preset matches either; fix the flags (or leave out --model-flags to read the architecture from the weights)"
    else:
        hint = "no preset matches; leave out --preset to read the architecture from the weights, or pass --model-flags FILE"
    raise DdpmsegError(f"checkpoint {source} does not fit {expected_name}: {', '.join(parts)}; {hint}")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any], expected: str, source: str) -> None:
    """Raise a one-line DdpmsegError listing missing/unexpected/mis-shaped keys, if any."""
    check_signature(state_signature(model.state_dict()), state, expected, source)


def matching_presets(state: Mapping[str, Any]) -> list[str]:
    """Names of the presets whose architecture has exactly ``state``'s keys and shapes."""
    found = state_signature(state)
    names = []
    for name in list_presets():
        preset = get_preset(name)
        if preset.family != "adm":
            continue
        try:
            sig = _config_signature(preset.config)
        except DdpmsegError:
            continue
        if len(sig) == len(found) and dict(sig) == found:
            names.append(name)
    return names


# --------------------------------------------------------------------------- inference


def _shape(found: Signature, key: str, source: str) -> tuple[int, ...]:
    if key not in found:
        raise DdpmsegError(
            f"cannot infer the architecture of {source}: key {key!r} is missing, so it is not a "
            "guided-diffusion UNetModel state dict; pass --model-flags FILE"
        )
    return found[key]


def _infer_failed(source: str, why: str) -> DdpmsegError:
    return DdpmsegError(
        f"cannot infer the architecture of {source}: {why}; pass its guided-diffusion flags with --model-flags FILE"
    )


def _default_size_for(mults: tuple[float, ...]) -> int | None:
    for size in (512, 256, 128, 64):
        if AdmConfig(image_size=size, channel_mult="").mults == mults:
            return size
    return None


def infer_config(
    state: Mapping[str, Any],
    image_size: int | None = None,
    num_head_channels: int | None = None,
    source: str = "checkpoint",
) -> tuple[AdmConfig, list[str]]:
    """Guided-diffusion flags recovered from a state dict's shapes, plus notes on the defaults taken.

    Two values change the features but cannot be read from the weights: the
    image size and the channels per attention head. Without them this is a
    one-line error saying how to give them (no guess). The noise schedule and
    the attention order take guided-diffusion's defaults (linear, 1000 steps;
    legacy order), noted.
    """
    found = state_signature(state)
    notes: list[str] = []
    model_channels = _shape(found, "time_embed.0.weight", source)[1]
    in_shape = _shape(found, "input_blocks.0.0.weight", source)
    if len(in_shape) != 4 or in_shape[1] != 3:
        raise _infer_failed(source, f"input conv has shape {_fmt_shape(in_shape)}, not (C, 3, 3, 3)")
    out_ch = _shape(found, "out.2.weight", source)[0]
    if out_ch not in (3, 6):
        raise _infer_failed(source, f"the output conv has {out_ch} channels (expected 3, or 6 with learned sigma)")
    learn_sigma = out_ch == 6
    class_cond = "label_emb.weight" in found

    def block_indices(prefix: str) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in found if k.startswith(prefix) and k.split(".")[1].isdigit()})

    n_in = len(block_indices("input_blocks."))
    outs = block_indices("output_blocks.")
    n_out = len(outs)
    if n_in < 2 or n_out != n_in:
        raise _infer_failed(source, f"{n_in} input blocks but {n_out} output blocks")

    # Decoder blocks that end with an upsampler: the last block of every level but the first.
    def has_upsampler(i: int) -> bool:
        subs = {int(k.split(".")[2]) for k in found if k.startswith(f"output_blocks.{i}.")}
        last = max(subs)
        return last > 0 and not any(k.startswith(f"output_blocks.{i}.{last}.qkv") for k in found)

    ups = [i for i in outs if has_upsampler(i)]
    num_res_blocks = ups[0] if ups else n_out - 1
    if num_res_blocks < 1 or n_out % (num_res_blocks + 1):
        raise _infer_failed(source, f"{n_out} decoder blocks do not split into levels of {num_res_blocks}+1")
    levels = n_out // (num_res_blocks + 1)
    step = num_res_blocks + 1
    if ups != [step * j + num_res_blocks for j in range(levels - 1)]:
        raise _infer_failed(source, "the upsampling blocks are not where guided-diffusion puts them")
    down_idx = [step * (j + 1) for j in range(levels - 1)]
    downs_conv = [f"input_blocks.{k}.0.op.weight" in found for k in down_idx]
    if downs_conv and len(set(downs_conv)) != 1:
        raise _infer_failed(source, "the downsampling blocks mix ResBlocks and strided convs")
    resblock_updown = bool(down_idx) and not downs_conv[0]

    chans, attn_ds = [], []
    for j in range(levels):
        first = 1 + step * j
        chans.append(_shape(found, f"input_blocks.{first}.0.out_layers.3.weight", source)[0])
        if f"input_blocks.{first}.1.qkv.weight" in found:
            attn_ds.append(2**j)
    mults = tuple(c / model_channels for c in chans)
    emb_rows = _shape(found, "input_blocks.1.0.emb_layers.1.weight", source)[0]
    use_scale_shift_norm = emb_rows == 2 * chans[0]

    unknown = [(what, option) for what, option, value in (
        ("its image size", "--image-size S", image_size),
        ("its channels per attention head", "--num-head-channels N", num_head_channels),
    ) if value is None]  # fmt: skip
    if unknown:
        raise DdpmsegError(
            f"{source} matches no preset, and {' and '.join(w for w, _ in unknown)} cannot be read from the weights; "
            f"pass {' '.join(o for _, o in unknown)} (the values it was trained with), "
            "or all its guided-diffusion flags with --model-flags FILE"
        )
    if all(m == int(m) for m in mults):
        channel_mult = ",".join(str(int(m)) for m in mults)
    elif _default_size_for(mults) == image_size:
        channel_mult = ""
    else:
        raise _infer_failed(source, f"channel multipliers {mults} are fractional and not a guided-diffusion default")
    res = [image_size // ds for ds in sorted(attn_ds)]
    if res:
        attention_resolutions = ",".join(str(r) for r in res)
    else:  # guided-diffusion needs a value; one that no level reaches
        attention_resolutions = str(image_size * 2)
        notes.append("no attention in the encoder/decoder levels (only in the middle block)")

    widths = sorted({chans[j] for j in range(levels) if 2**j in attn_ds} | {chans[-1]})
    bad = [w for w in widths if num_head_channels < 1 or w % num_head_channels]
    if bad:
        raise DdpmsegError(
            f"--num-head-channels {num_head_channels} does not divide the attention width {bad[0]} of {source}; "
            "give the value it was trained with (a fixed head count: num_heads in --model-flags FILE)"
        )
    heads = dict(num_heads=4, num_head_channels=num_head_channels)  # num_heads is unused when channels are set
    notes.append("noise schedule guided-diffusion's default (linear, 1000 steps) and its legacy attention order; "
                 "a model trained otherwise needs --model-flags")

    try:
        config = AdmConfig(
            image_size=image_size,
            num_channels=model_channels,
            num_res_blocks=num_res_blocks,
            channel_mult=channel_mult,
            attention_resolutions=attention_resolutions,
            class_cond=class_cond,
            learn_sigma=learn_sigma,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            **heads,
        )
        sig = config_signature(config)
    except DdpmsegError as e:
        raise _infer_failed(source, f"the inferred flags do not build ({e})") from None
    if sig != found:
        missing, unexpected, shapes = _mismatch(sig, found)
        raise _infer_failed(
            source,
            f"the inferred flags give {len(missing)} missing, {len(unexpected)} unexpected "
            f"and {len(shapes)} mis-shaped keys",
        )
    return config, notes


def resolve_config(
    state: Mapping[str, Any], source: str, image_size: int | None = None, num_head_channels: int | None = None
) -> tuple[str | None, AdmConfig]:
    """The architecture of a checkpoint given without flags: ``(preset name, config)`` of the first
    preset whose weights it has (at the preset's image size and heads unless others are given), else
    ``(None, config inferred with the given image size and heads)``."""
    presets = matching_presets(state)
    if presets:
        name, config = presets[0], get_preset(presets[0]).config
        if image_size in (None, config.image_size) and num_head_channels in (None, config.num_head_channels):
            log.info("%s has the architecture of presets %s", source, ", ".join(presets))
            return name, config
        image_size = image_size or config.image_size
        num_head_channels = num_head_channels or (config.num_head_channels if config.num_head_channels > 0 else None)
    config, notes = infer_config(state, image_size, num_head_channels, source=source)
    for note in notes:
        log.info("%s: %s", source, note)
    return None, config


__all__ = [
    "read_state_dict",
    "filter_state_dict",
    "check_state_dict",
    "check_signature",
    "config_signature",
    "state_signature",
    "matching_presets",
    "infer_config",
    "resolve_config",
]
