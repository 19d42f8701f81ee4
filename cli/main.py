"""``ddpmseg`` commands. Each only parses options, calls one library function and
prints a summary line; errors become one line on stderr and a non-zero exit: 1 for an
error the message explains, 2 for a usage error (click's), 3 for a bug in ddpmseg
(an internal error), 130 for Ctrl-C.

At load time this module imports only torch-free settings (``ddpmseg.options``,
the features' config modules, ``ddpmseg.runtime``), never torch (``ddpmseg
--help`` stays instant, and the OpenMP settings ``main`` chooses with
:func:`ddpmseg.runtime.configure_threads` apply when torch starts); each
command imports what it calls.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from pathlib import Path

import click

from ddpmseg._text import few, plural
from ddpmseg.cli import interrupted
from ddpmseg.anomaly import config as anomaly_config
from ddpmseg.errors import DdpmsegError
from ddpmseg.options import (
    DEFAULT_BLOCKS,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    ENGINES,
    EXTRACT_BATCH_SIZE,
    KMEANS_K,
    MIN_PIXELS,
    PRECISIONS,
    PREPROCESS_MODES,
    DEFAULT_RECIPE,
    RECIPES,
    STORAGE_DTYPES,
    SUGGEST_N,
    SUGGEST_STRATEGIES,
)
from ddpmseg.runtime import configure_threads
from ddpmseg.heads import head_names
from ddpmseg.distill.config import DISTILL_DROP, DISTILL_SAMPLE_STEPS, StudentTrainConfig
from ddpmseg.distill.students import DEFAULT_STUDENT, STUDENTS
from ddpmseg.train.config import SCHEDULE_SAMPLERS, TRAIN_PRECISIONS, TRAIN_PREPROCESS, TrainConfig

TRAIN = TrainConfig()
STUDENT_TRAIN = StudentTrainConfig()

# The group's own options: given after the command, they get a hint (True: takes a value).
GLOBAL_OPTIONS = {"--threads": True, "-q": False, "--quiet": False, "--debug": False}


def _global_option_hint(e: click.NoSuchOption, ctx: click.Context, args: list[str]) -> None:
    """``ddpmseg predict --threads 1``: say that global options go before the command."""
    if e.option_name not in GLOBAL_OPTIONS or "global options go before" in e.message:
        return
    shown = e.option_name
    if GLOBAL_OPTIONS[e.option_name]:
        given = [a.split("=", 1)[1] for a in args if a.startswith(e.option_name + "=")]
        given += [args[i + 1] for i, a in enumerate(args[:-1]) if a == e.option_name]
        shown += f" {given[0] if given else 'N'}"
    e.message = (f"{e.message.rstrip('.')}; global options go before the command: "
                 f"ddpmseg {shown} {ctx.invoked_subcommand or 'COMMAND'} ...")


class _Command(click.Command):
    """Notes, as it starts, what the command's Ctrl-C message needs (cli/interrupted.py)."""

    def invoke(self, ctx: click.Context):
        ctx.meta["ddpmseg.interrupt"] = (ctx.info_name, ctx.params, interrupted.before(ctx.info_name, ctx.params))
        return super().invoke(ctx)


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DdpmsegError(f"--{name} takes comma-separated integers such as 50,150,250, got {value!r}") from None


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (library and OS messages can hold newlines)."""
    return " ".join(str(e).split())


# Commands that run torch: they get configure_threads' automatic wait policy (ddpmseg/runtime.py).
TORCH_COMMANDS = frozenset({"blocks", "convert", "extract", "fit", "predict", "evaluate", "kmeans", "demo", "train-ddpm",
                            "anomaly", "suggest", "distill", "export", "label"})


INTERNAL_ERROR = 3  # the exit code of a bug (1: an error the message explains; 2: click's usage error; 130: Ctrl-C)


class _Group(click.Group):
    """Turns library errors into one line and an exit code, never a traceback."""

    command_class = _Command

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) if ctx.params else "--debug" in sys.argv
        pending = getattr(ctx, "_protected_args", None)  # the command and its arguments (click < 8.2: protected_args)
        args = [*(ctx.protected_args if pending is None else pending), *ctx.args]
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as e:
            _global_option_hint(e, ctx, args)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:  # what is kept and how to go on, looked up in --out (cli/interrupted.py)
            name, params, noted = ctx.meta.get("ddpmseg.interrupt", (ctx.invoked_subcommand or "", {}, None))
            click.echo(f"ddpmseg: interrupted; {interrupted.message(name, params, noted)}", err=True)
            ctx.exit(130)
        except DdpmsegError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"ddpmseg: error: {_one_line(e)}", err=True)
            ctx.exit(1)
        except OSError as e:
            if debug:
                traceback.print_exc()
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"ddpmseg: error: {e.strerror or _one_line(e)}{where}; check the path and its permissions", err=True)
            ctx.exit(1)
        except Exception as e:  # a bug: still one line unless --debug; its own exit code (2 is click's usage error)
            if debug:
                traceback.print_exc()
            click.echo(f"ddpmseg: internal error: {type(e).__name__}: {_one_line(e)}; this is a bug in ddpmseg: "
                       "rerun with --debug and report the traceback", err=True)
            ctx.exit(INTERNAL_ERROR)


_device = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
_common_backbone = [
    click.option("--ckpt", "checkpoint", required=True, type=click.Path(path_type=Path),
                 help="Checkpoint: a guided-diffusion state dict file (e.g. ffhq.pt), a train-ddpm run folder RUN/ "
                      "(its newest saved step; another with --step N, or its file RUN/ema_0.9999_00NNNN.pt), "
                      "or a diffusers UNet2DModel folder / hub id."),
    click.option("--step", "ckpt_step", type=click.IntRange(0), default=None,
                 help="With --ckpt RUN/ (a train-ddpm run folder): use the EMA weights saved at step N "
                      "(RUN/ema_*_00000N.pt; `ls RUN` shows the saved steps) instead of the newest."),
    lambda f: _resolving_step(f),  # the command gets --ckpt RUN/ --step N as step N's file
    click.option("--preset", default=None, help="Architecture preset (see `ddpmseg presets`); default: match or infer from the checkpoint."),
    click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="JSON file of guided-diffusion flags for a custom architecture."),
    click.option("--image-size", type=click.IntRange(1), default=None, help="Image size a custom ADM was trained at (the weights cannot show it)."),
    click.option("--num-head-channels", type=click.IntRange(1), default=None, help="Channels per attention head of a custom ADM (the weights cannot show it)."),
    _device,
]
_common_extract = [
    click.option("--steps", default=",".join(map(str, DEFAULT_STEPS)), show_default=True, help="Diffusion timesteps."),
    click.option("--blocks", default="auto", show_default=True, help=f"Decoder (output_blocks) indices; auto: the paper's depths ({','.join(map(str, DEFAULT_BLOCKS))} of an 18-block decoder, the same fractions of another; see `ddpmseg blocks`)."),
    click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the shared noise."),
    click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=PREPROCESS_MODES[0], show_default=True, help="resize: plain resize to the model size; crop: short side then centre crop."),
    click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True, help="U-Net arithmetic: fp32 (the recipe), bf16 (~1.6x faster on CPUs with bf16 units, ~1.3% feature error), fp16 (CUDA only)."),
    click.option("--noise-samples", type=click.IntRange(1), default=1, show_default=True, help="Average the maps over this many seeded noise draws (1: the paper's single noise; N costs N forward passes)."),
]
_images = [
    click.argument("inputs", nargs=-1, metavar="[IMAGES]...", type=click.Path(path_type=Path)),
    click.option("--images", multiple=True, type=click.Path(path_type=Path), help="Image folder or files (repeatable; also positional, so shell globs work)."),
]
_overwrite = click.option("--overwrite", is_flag=True, help="Replace outputs that exist already.")
_scale = [
    click.option("--shard", default=None, metavar="I/N",
                 help="Only share I of N (from 0) of the sorted images: run N copies (a Slurm array, N jobs) for all."),
    click.option("--engine", type=click.Choice(ENGINES), default=ENGINES[0], show_default=True,
                 help="local: this process; ray: a Ray actor pool (pip install \"ddpmseg[ray]\").") ,
    click.option("--address", default=None, help="ray: a running cluster (auto: the one `ray start --head` made); "
                                                  "default: start a local one."),
    click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="ray: actors."),
    click.option("--cpus-per-worker", type=click.IntRange(1), default=1, show_default=True,
                 help="ray: CPUs (torch threads) per actor."),
    click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True, help="ray: GPUs per actor."),
]


def _engine_settings(engine: str, address, workers, cpus_per_worker, gpus_per_worker):
    if engine != "ray":
        given = [o for o, v, d in (("--address", address, None), ("--workers", workers, 1),
                                   ("--cpus-per-worker", cpus_per_worker, 1), ("--gpus-per-worker", gpus_per_worker, 0.0))
                 if v != d]
        if given:
            raise DdpmsegError(f"{', '.join(given)} apply to --engine ray only; add --engine ray or leave them out")
        return None
    from ddpmseg.engines.ray_data import EngineSettings

    return EngineSettings(address, workers, cpus_per_worker, gpus_per_worker)


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def _resolving_step(f):
    """Wrap a command taking _common_backbone: ``--ckpt RUN/ --step N`` reaches it as ``checkpoint``, step N's
    EMA file of the run (whose flags.json beside it gives the architecture)."""

    @functools.wraps(f)
    def command(*args, ckpt_step: int | None = None, **kwargs):
        if ckpt_step is not None:
            from ddpmseg.backbones.runs import resolve_checkpoint

            kwargs["checkpoint"] = resolve_checkpoint(kwargs["checkpoint"], ckpt_step)
        return f(*args, **kwargs)

    return command


def _seconds(seconds: float) -> str:
    """A time per image at a precision that suits it: 12.3 s, 0.42 s, 35 ms, 0.81 ms."""
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 0.1:
        return f"{seconds:.2g} s"
    return f"{seconds * 1000:.2g} ms"


def _mib(mib: float) -> str:
    return f"{mib:.1f}" if mib >= 1 else f"{mib:.2g}"


def _image_inputs(inputs: tuple[Path, ...], images: tuple[Path, ...]) -> list[Path]:
    found = [*images, *inputs]
    if not found:
        raise click.UsageError("give the images: as arguments (IMAGES...) or with --images DIR_OR_FILE")
    return found


def _backbone_args(preset, model_flags, image_size, num_head_channels) -> dict:
    return dict(preset=preset, model_flags=model_flags, image_size=image_size, num_head_channels=num_head_channels)


def _extract_config(steps: str, blocks: str, seed: int, preprocess: str, precision: str, storage: str = STORAGE_DTYPES[0],
                    noise_samples: int = 1):
    from ddpmseg.records import ExtractConfig

    chosen = () if blocks.strip() == "auto" else _ints(blocks, "blocks")
    if blocks.strip() != "auto" and not chosen:
        raise DdpmsegError("no block index given; pass e.g. --blocks 5,6,7,8,12 (or auto)")
    return ExtractConfig(_ints(steps, "steps"), chosen, seed, preprocess, storage, precision, noise_samples)


def _skipped(names: list[str], word: str, words: str) -> str:
    return f"; skipped {plural(len(names), word, words)}: {few(names)}" if names else ""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: the cores this process may use).")
@click.version_option(package_name="ddpmseg")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, threads: int | None) -> None:
    """Label-efficient semantic segmentation on frozen diffusion-model features."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="ddpmseg: %(message)s")
    configure_threads(threads, wait_policy="auto" if ctx.invoked_subcommand in TORCH_COMMANDS else None)
    ctx.obj = {"progress": not quiet}


@main.command()
def presets() -> None:
    """List the architecture presets and where their checkpoints come from.

    \b
    Examples:
      ddpmseg presets
      ddpmseg download ffhq_256   # then: --ckpt checkpoints/ffhq.pt
    """
    from ddpmseg.backbones import get_preset, list_presets

    for name in list_presets():
        p = get_preset(name)
        click.echo(f"{name:22s} {p.family:10s} {p.filename:30s} {p.description}")


@main.command()
@click.argument("preset")
@click.option("--dir", "directory", default="checkpoints", show_default=True, type=click.Path(path_type=Path))
@click.option("--url", default=None, help="Download from this URL instead of the preset's.")
@click.pass_obj
def download(obj, preset: str, directory: Path, url: str | None) -> None:
    """Download a preset's published checkpoint (resumes a partial file).

    \b
    Examples:
      ddpmseg download ffhq_256
      ddpmseg download lsun_cat_256 --dir /data/checkpoints
    """
    from ddpmseg.backbones.download import download_preset

    path = download_preset(preset, directory, url=url, progress=obj["progress"])
    click.echo(f"checkpoint ready: {path}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--preset", default=None, help="guided-diffusion preset of the checkpoint; default: match or infer.")
@click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="JSON file of guided-diffusion flags.")
@click.option("--image-size", type=click.IntRange(1), default=None, help="Image size a custom ADM was trained at.")
@click.option("--num-head-channels", type=click.IntRange(1), default=None, help="Channels per attention head of a custom ADM.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the diffusers pipeline (unet/ + scheduler/).")
@_overwrite
def convert(checkpoint: Path, preset, model_flags, image_size, num_head_channels, out: Path, overwrite: bool) -> None:
    """Convert a guided-diffusion (ADM) checkpoint into a diffusers UNet2DModel + DDPMScheduler folder.

    \b
    Examples:
      ddpmseg convert checkpoints/ffhq.pt --out ffhq-diffusers/
      ddpmseg convert run/ema_0.9999_010000.pt --out mine-diffusers/
    """
    from ddpmseg.backbones.convert import convert_adm_to_diffusers

    r = convert_adm_to_diffusers(checkpoint, out, preset=preset, model_flags=model_flags, image_size=image_size,
                                 num_head_channels=num_head_channels, overwrite=overwrite)
    click.echo(f"converted {checkpoint} -> {r.out} ({r.n_params / 1e6:.1f} M parameters, "
               f"max relative output error {r.max_rel_err:.1e}); use it with --ckpt {r.out}")


@main.command()
@_apply(_common_backbone)
def blocks(checkpoint: Path, preset, model_flags, image_size, num_head_channels, device) -> None:
    """List the decoder blocks of a checkpoint: index, module, channels, resolution, and which ones
    --blocks auto (the default of extract and kmeans) picks.

    \b
    Examples:
      ddpmseg blocks --ckpt checkpoints/ffhq.pt
      ddpmseg blocks --ckpt run/ --step 2000
    """
    from ddpmseg.backbones import create_backbone

    backbone = create_backbone(checkpoint, preset, model_flags, device, image_size=image_size,
                               num_head_channels=num_head_channels)
    infos, auto = backbone.blocks(), set(backbone.default_blocks())
    width = max([18] + [len(b.module) for b in infos])
    click.echo(f"{'index':>5}  {'module':{width}s} {'channels':>8}  resolution  in --blocks auto")
    for b in infos:
        click.echo(f"{b.index:>5}  {b.module:{width}s} {b.channels:>8}  {f'{b.resolution}x{b.resolution}':10s}"
                   + ("  yes" if b.index in auto else ""))


@main.command()
@_apply(_images)
@_apply(_common_backbone)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Feature cache to write or extend: a .h5 file (e.g. feats.h5), or a folder (any name without .h5).")
@_apply(_common_extract)
@click.option("--batch-size", default=EXTRACT_BATCH_SIZE, show_default=True, help="Timesteps per forward pass (0 = all of an image's at once).")
@click.option("--storage", type=click.Choice(STORAGE_DTYPES), default=STORAGE_DTYPES[0], show_default=True, help="On-disk dtype of the block maps.")
@_apply(_scale)
@click.pass_obj
def extract(obj, inputs, images, checkpoint, preset, model_flags, image_size, num_head_channels, device, out, steps,
            blocks, seed, preprocess, precision, noise_samples, batch_size, storage, shard, engine, address, workers,
            cpus_per_worker, gpus_per_worker) -> None:
    """Extract decoder-block features of IMAGES (files or folders) into a cache: a .h5 file, or a folder
    (any --out without .h5) that grows cheaply and takes many writers at once (--shard, --engine ray).

    \b
    Examples:
      ddpmseg extract photos/ --ckpt checkpoints/ffhq.pt --out feats.h5
      ddpmseg extract photos/ --ckpt run/ --step 2000 --out feats/ --shard 0/4
    """
    from ddpmseg.backbones.runs import describe_checkpoint
    from ddpmseg.pipeline import extract_features

    cfg = _extract_config(steps, blocks, seed, preprocess, precision, storage, noise_samples)
    settings = _engine_settings(engine, address, workers, cpus_per_worker, gpus_per_worker)
    s = extract_features(checkpoint, _image_inputs(inputs, images), out, config=cfg, device=device, shard=shard,
                         engine=engine, engine_settings=settings,
                         batch_size=batch_size, progress=obj["progress"],
                         **_backbone_args(preset, model_flags, image_size, num_head_channels))
    per = f"{_seconds(s.seconds / s.new)}/image, " if s.new else ""
    run = describe_checkpoint(checkpoint)
    click.echo(f"extract: {s.new} new, {s.skipped} already cached, {s.total} in {s.out} "
               f"({per}{_mib(s.bytes_per_image / 2**20)} MiB/image)"
               + (f"; checkpoint {run}" if run else "")
               + _skipped(s.not_images, "folder entry that is not an image", "folder entries that are not images"))


# fit's options that set a head option (kept as aliases of --head-option for one release): name -> (head, key)
HEAD_ALIASES = {
    "ensemble": ("mlp", "n_members"), "recipe": ("mlp", "recipe"), "max_epochs": ("mlp", "max_epochs"),
    "pixel_fraction": ("mlp", "pixel_fraction"), "head_steps": ("ddp", "steps"), "generations": ("ddp", "generations"),
    "head_iterations": ("ddp", "iterations"), "head_batch": ("ddp", "batch_size"), "head_crop": ("ddp", "crop"),
    "head_width": ("ddp", "width"), "head_lr": ("ddp", "lr"), "head_diffusion": ("ddp", "diffusion"),
}


def _head_options(head: str, pairs: tuple[str, ...], config_file: Path | None, aliases: dict) -> dict:
    """The head's options from --head-config, --head-option KEY=VALUE and the alias flags (a key given
    twice with two values is an error)."""
    from ddpmseg.heads import get_head, read_config_file

    spec = get_head(head)
    found: dict[str, tuple[object, str]] = {}

    def put(key: str, value: object, where: str) -> None:
        value = spec.convert(key, value, where)  # 1e-3 and 0.001, false and --no-head-diffusion are one value
        if key in found and found[key][0] != value:
            raise DdpmsegError(f"{where} sets {key} to {value!r} but {found[key][1]} set it to {found[key][0]!r}; "
                               "give it once")
        found[key] = (value, where)

    if config_file is not None:
        for key, value in read_config_file(config_file).items():
            put(str(key), value, f"--head-config {config_file}")
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise DdpmsegError(f"--head-option {pair!r}: write KEY=VALUE, e.g. --head-option steps=3 "
                               "(`ddpmseg heads` lists each head's keys)")
        put(key.strip(), value.strip(), f"--head-option {pair}")
    for name, value in aliases.items():
        if value is None:
            continue
        owner, key = HEAD_ALIASES[name]
        flag = "--" + name.replace("_", "-")
        if name == "head_diffusion":
            flag = "--head-diffusion" if value else "--no-head-diffusion"
        if owner != head:
            raise DdpmsegError(f"{flag} is an option of --head {owner}, not of --head {head}; "
                               f"use --head-option KEY=VALUE (`ddpmseg heads` lists the {head} head's keys)")
        put(key, value, flag)
    return {k: v for k, (v, _) in found.items()}


@main.command()
def heads() -> None:
    """List the heads `fit --head` takes, each with its options and their defaults.

    \b
    Examples:
      ddpmseg heads
      ddpmseg fit --features feats.h5 --masks masks/ --head ddp --head-option steps=3 --out model/
    """
    from ddpmseg.heads import list_heads

    for spec in list_heads():
        click.echo(f"{spec.name}: {spec.summary}")
        options = spec.options()
        width, kinds = max((len(o.name) for o in options), default=0), max((len(o.type) for o in options), default=0)
        for o in options:
            default = "none" if o.default is None else str(o.default).lower() if isinstance(o.default, bool) else o.default
            click.echo(f"  {o.name:{width}s}  {o.type:{kinds}s}  {str(default):7s}  {o.help}")
    click.echo("set them with `ddpmseg fit --head NAME --head-option KEY=VALUE` (repeatable) or --head-config FILE.json")


@main.command()
@click.option("--features", required=True, type=click.Path(path_type=Path), help="Feature cache from `ddpmseg extract`: a .h5 file or a cache folder.")
@click.option("--masks", default=None, type=click.Path(path_type=Path), help="Folder of label maps (.npy, label PNGs or colour PNGs with --classes).")
@click.option("--instances", default=None, type=click.Path(path_type=Path),
              help="Instance annotations for --head diffinst: a COCO JSON file or a folder of instance-id PNGs (instead of --masks).")
@click.option("--labels", default=None, type=int, help="Use the first N labelled images (natural sort order).")
@click.option("--classes", default=None, help="Label set: a shipped name (e.g. ffhq_34) or a CSV index,name,r,g,b.")
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the head's initialisation, batches and sampling.")
@click.option("--ignore-index", default=None, type=int,
              help="Label neither trained nor scored (default: the label set's, else 255; bedroom_28: 0).")
@click.option("--min-pixels", default=MIN_PIXELS, show_default=True, type=click.IntRange(0),
              help="A class covering fewer pixels of an image's mask (counted at the mask's own resolution) is ignored in that image (the reference's rule).")
@click.option("--head", type=click.Choice(head_names()), default="mlp", show_default=True,
              help="The classifier on the features (`ddpmseg heads` lists each with its options).")
@click.option("--head-option", "head_option", multiple=True, metavar="KEY=VALUE",
              help="A setting of the head, e.g. n_members=10 (mlp) or steps=3 (ddp); repeatable.")
@click.option("--head-config", type=click.Path(path_type=Path), default=None,
              help="A JSON object of head settings, e.g. {\"steps\": 3}.")
@click.option("--ensemble", type=click.IntRange(1), default=None, help="mlp: MLPs in the ensemble (= --head-option n_members=N; default 10).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help=f"mlp: = --head-option recipe=NAME (default {DEFAULT_RECIPE}; `ddpmseg heads` says what each does).")
@click.option("--max-epochs", type=click.IntRange(1), default=None, help="mlp: = --head-option max_epochs=N (default 100, a cap: the default tiles recipe stops by 16 epochs / 2,000 steps).")
@click.option("--pixel-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="mlp: = --head-option pixel_fraction=F (default 1).")
@click.option("--head-steps", type=click.IntRange(1), default=None, help="ddp: = --head-option steps=N.")
@click.option("--generations", type=click.IntRange(1), default=None, help="ddp: = --head-option generations=N.")
@click.option("--head-iterations", type=click.IntRange(1), default=None, help="ddp: = --head-option iterations=N.")
@click.option("--head-batch", type=click.IntRange(1), default=None, help="ddp: = --head-option batch_size=N.")
@click.option("--head-crop", type=click.IntRange(4), default=None, help="ddp: = --head-option crop=N.")
@click.option("--head-width", type=click.IntRange(8), default=None, help="ddp: = --head-option width=N.")
@click.option("--head-lr", type=click.FloatRange(0, min_open=True), default=None, help="ddp: = --head-option lr=X.")
@click.option("--head-diffusion/--no-head-diffusion", default=None, help="ddp: = --head-option diffusion=true/false.")
@_device
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model folder to write.")
@_overwrite
@click.pass_obj
def fit(obj, features, masks, instances, labels, classes, seed, ignore_index, min_pixels, head, head_option, head_config,
        device, out, overwrite, **aliases) -> None:
    """Train a head (the paper's MLP ensemble by default) on cached features and masks.

    \b
    Examples:
      ddpmseg fit --features feats.h5 --masks masks/ --out model/
      ddpmseg fit --features feats.h5 --masks masks/ --classes ffhq_34 --labels 20 --out model20/
      ddpmseg fit --features feats.h5 --head diffinst --instances coco.json --out inst/
    """
    from ddpmseg.pipeline import fit_model

    options = _head_options(head, head_option, head_config, aliases)
    s = fit_model(features, masks, out, instances=instances, head=head, options=options, labels=labels, classes=classes,
                  seed=seed, ignore_index=ignore_index, min_pixels=min_pixels, device=device, progress=obj["progress"],
                  overwrite=overwrite)
    if s.n_instances is not None:
        click.echo(f"fit: {plural(len(s.image_ids), 'image')}, {plural(s.n_instances, 'instance')}, {s.seconds:.1f} s "
                   f"({s.description}) -> {s.out}"
                   + _skipped(s.unlabelled, "cached image without annotations", "cached images without annotations"))
        return
    click.echo(f"fit: {plural(len(s.image_ids), 'image')}, {plural(s.n_pixels, 'pixel')}, "
               f"{plural(s.n_classes, 'class', 'classes')}, {s.seconds:.1f} s ({s.description}) -> {s.out}"
               + _skipped(s.unlabelled, "cached image without a mask", "cached images without a mask"))
    if s.untrained:
        click.echo(f"fit: WARNING no training pixel of {plural(len(s.untrained), 'class', 'classes')} "
                   f"({few(s.untrained)}): the model will never predict {'it' if len(s.untrained) == 1 else 'them'}; "
                   "label them in a mask, or lower --min-pixels if they are small", err=True)


@main.command()
@_apply(_images)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--ckpt", "checkpoint", default=None, type=click.Path(path_type=Path), help="Checkpoint, if moved since fit.")
@_device
@click.option("--legend/--no-legend", default=True, show_default=True,
              help="A legend of the classes beside the overlay and a colour bar beside the uncertainty map.")
@click.option("--skip-done", is_flag=True,
              help="Leave out images whose three PNGs exist (a rerun finishes the rest; the default with --engine ray).")
@click.option("--coco", default=None, type=click.Path(path_type=Path),
              help="Instance models: also write one COCO results JSON for the whole run (RLE masks, boxes, scores).")
@_overwrite
@_apply(_scale)
@click.pass_obj
def predict(obj, inputs, images, model_dir, out, checkpoint, device, legend, skip_done, coco, overwrite, shard, engine,
            address, workers, cpus_per_worker, gpus_per_worker) -> None:
    """Segment IMAGES (files or folders): label, overlay and uncertainty PNGs at the original size.

    \b
    Examples:
      ddpmseg predict photos/ --model model/ --out predictions/
      ddpmseg predict photos/*.jpg --model model/ --out predictions/ --skip-done
      ddpmseg predict photos/ --model inst/ --out found/ --coco found/results.json   (an instance model)

    An instance model (`fit --head diffinst`) writes NAME_instances.png (uint16 ids), NAME_instances.json
    and NAME_overlay.png instead.
    """
    from ddpmseg.pipeline import predict_images

    settings = _engine_settings(engine, address, workers, cpus_per_worker, gpus_per_worker)
    s = predict_images(_image_inputs(inputs, images), model_dir, out, checkpoint=checkpoint, device=device,
                       progress=obj["progress"], overwrite=overwrite, legend=legend, shard=shard,
                       skip_done=skip_done or (engine == "ray" and not overwrite), engine=engine, engine_settings=settings,
                       coco=coco)
    n = max(s.n_images, 1)
    split = "" if s.extract_seconds != s.extract_seconds else f", {s.extract_seconds / n:.2f} s of it extraction"
    click.echo(f"predict: {plural(s.n_images, 'image')} -> {s.out} ({s.seconds / n:.2f} s/image{split})"
               + (f"; {plural(s.already_done, 'image')} done before, left out" if s.already_done else "")
               + _skipped(s.not_images, "folder entry that is not an image", "folder entries that are not images"))


@main.command()
@_apply(_images)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--masks", default=None, type=click.Path(path_type=Path), help="Folder of label maps (class models).")
@click.option("--instances", default=None, type=click.Path(path_type=Path),
              help="Instance models: COCO JSON or instance-id PNGs; scores COCO mask AP, AP50, AP75 and per-class AP.")
@click.option("--ckpt", "checkpoint", default=None, type=click.Path(path_type=Path), help="Checkpoint, if moved since fit.")
@_device
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Folder for reliability.png (calibration) and confusion.png (rows true, columns predicted).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_overwrite
@click.pass_obj
def evaluate(obj, inputs, images, model_dir, masks, instances, checkpoint, device, out, as_json, overwrite) -> None:
    """Per-class IoU and mIoU of a model on labelled IMAGES (files or folders), calibration (ECE) and
    per-image scores.

    \b
    Examples:
      ddpmseg evaluate test/images --masks test/masks --model model/
      ddpmseg evaluate test/images --masks test/masks --model model/ --out figures/ --json
      ddpmseg evaluate test/images --instances test/coco.json --model inst/ --json
    """
    from ddpmseg.pipeline import evaluate_model

    r = evaluate_model(model_dir, _image_inputs(inputs, images), masks, instances=instances, checkpoint=checkpoint,
                       device=device, progress=obj["progress"] and not as_json, out=out, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(r))
        return
    if instances is not None:
        pct = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
        width = max([len(n) for n in r["per_class"]] + [4])
        for name, ap in r["per_class"].items():
            click.echo(f"{name:{width}s}  {pct(ap)}")
        if r["training_images"]:
            click.echo(f"evaluate: NOTE {len(r['training_images'])} of the {plural(r['n_images'], 'image')} trained this "
                       f"model ({few(r['training_images'])}): their score is not a held-out one")
        click.echo(f"evaluate: mask AP {pct(r['ap']).strip()}, AP50 {pct(r['ap50']).strip()}, AP75 {pct(r['ap75']).strip()} "
                   f"over {plural(r['n_images'], 'image')} ({plural(r['n_instances'], 'instance')}, "
                   f"{plural(r['n_predictions'], 'detection')})"
                   + _skipped(r["no_annotation"], "image without annotations", "images without annotations"))
        return
    width = max(len(n) for n in r["per_class"])
    for name, iou in r["per_class"].items():
        click.echo(f"{name:{width}s}  {100 * iou:5.1f}")
    rows = sorted(r["per_image"], key=lambda row: -row["uncertainty"])
    iw = max(len(row["image"]) for row in rows)
    click.echo(f"{'image':{iw}s}   mIoU  uncertainty (most uncertain first)")
    for row in rows:
        miou = "  n/a" if row["miou"] is None else f"{100 * row['miou']:5.1f}"
        click.echo(f"{row['image']:{iw}s}  {miou}  {row['uncertainty']:.4f}")
    if len(r["absent_classes"]) >= 2:
        click.echo(f"evaluate: WARNING the masks hold none of {len(r['absent_classes'])} of the model's "
                   f"{len(r['per_class'])} classes ({few(r['absent_classes'])}): were they drawn with this model's label "
                   "set? their IoU counts as 0", err=True)
    if r["untrained_classes"]:
        click.echo(f"evaluate: NOTE the model had no training pixel of {few(r['untrained_classes'])}: it never predicts "
                   "them", err=True)
    seen = r["training_images"]
    if seen:
        click.echo(f"evaluate: NOTE {len(seen)} of the {plural(r['n_images'], 'image')} trained this model "
                   f"({few(seen)}): their score is not a held-out one")
    click.echo(f"evaluate: mIoU {100 * r['miou']:.1f} over {plural(r['n_images'], 'image')}, ECE {r['ece']:.4f}"
               + (f"; reliability.png and confusion.png in {out}" if out else "")
               + _skipped(r["no_mask"], "image without a mask", "images without a mask"))


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@_apply(_images)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for suggest.csv (rank, image, score, path) and suggest.png.")
@click.option("--n", "n", type=click.IntRange(1), default=SUGGEST_N, show_default=True, help="Images to suggest.")
@click.option("--by", type=click.Choice(SUGGEST_STRATEGIES), default=SUGGEST_STRATEGIES[0], show_default=True,
              help="uncertainty: the reference's score (top 10 % of the pixel map, nats); bald: the map's mean "
                   "(nats); diversity: uncertainty, discounting images close to ones already picked; its scores "
                   "are relative (0-1: uncertainty over the pool's highest times distance over the largest), "
                   "not nats, so not comparable with the other two.")
@click.option("--ckpt", "checkpoint", default=None, type=click.Path(path_type=Path), help="Checkpoint, if moved since fit.")
@_device
@_overwrite
@click.pass_obj
def suggest(obj, model_dir, inputs, images, out, n, by, checkpoint, device, overwrite) -> None:
    """Which of the unlabelled IMAGES (files or folders) to label next: suggest.csv and a contact sheet.

    \b
    Examples:
      ddpmseg suggest unlabelled/ --model model/ --out next/
      ddpmseg suggest unlabelled/ --model model/ --by diversity --n 5 --out next/
    """
    from ddpmseg.active.suggest import suggest_images

    s = suggest_images(model_dir, _image_inputs(inputs, images), out, n=n, by=by, checkpoint=checkpoint, device=device,
                       progress=obj["progress"], overwrite=overwrite)
    for r, (name, score) in enumerate(s.ranked, 1):
        click.echo(f"{r:3d}. {name}  {score:.4g}")
    click.echo(f"suggest: {plural(len(s.ranked), 'image')} of {s.n_pool} by {by} -> {s.out / 'suggest.csv'}, "
               f"{s.out / 'suggest.png'}"
               + (f"; left out {plural(len(s.left_out), 'image')} that trained the model: {few(s.left_out)}"
                  if s.left_out else ""))


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@_apply(_common_backbone)
@click.option("--k", default=KMEANS_K, show_default=True, help="Clusters per cell.")
@_apply(_common_extract)
@click.option("--out", required=True, type=click.Path(),  # a str: a trailing slash (a folder) must survive
              help="Grid PNG to write (NAME.png), or a folder (existing, or ending with /) for IMAGE-STEM_kmeans.png.")
@_overwrite
@click.pass_obj
def kmeans(obj, image, checkpoint, preset, model_flags, image_size, num_head_channels, device, k, steps, blocks, seed,
           preprocess, precision, noise_samples, out, overwrite) -> None:
    """The paper's Figure-4 grid: k-means of each block's features per timestep.

    \b
    Examples:
      ddpmseg kmeans photo.jpg --ckpt checkpoints/ffhq.pt --out grid.png
      ddpmseg kmeans photo.jpg --ckpt run/ --k 4 --steps 50,250 --out grids/
    """
    from ddpmseg.pipeline import kmeans_grid_image

    cfg = _extract_config(steps, blocks, seed, preprocess, precision, noise_samples=noise_samples)
    path = kmeans_grid_image(image, checkpoint, out, k=k, config=cfg, device=device, progress=obj["progress"],
                             overwrite=overwrite, **_backbone_args(preset, model_flags, image_size, num_head_channels))
    click.echo(f"kmeans: {plural(len(cfg.steps), 'step')}, k={k} -> {path}")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="The teacher: a model folder from `ddpmseg fit`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Student folder to write (a model folder).")
@click.argument("inputs", nargs=-1, metavar="[IMAGES]...", type=click.Path(path_type=Path))
@click.option("--images", multiple=True, type=click.Path(path_type=Path),
              help="Unlabelled real images of the domain (folders or files; repeatable; also positional). The "
                   "teacher's own training images among them are the labelled set (see --labelled).")
@click.option("--samples", type=click.IntRange(0), default=0, show_default=True, help="Images to sample from the teacher's DDPM.")
@click.option("--sample-steps", type=click.IntRange(1), default=DISTILL_SAMPLE_STEPS, show_default=True,
              help="DDIM steps per sample; the DDPM's step count (1000) or more: full ancestral sampling, as the reference.")
@click.option("--labelled", multiple=True, type=click.Path(path_type=Path),
              help="The labelled images (files or folders; default: the teacher's training images among --images).")
@click.option("--masks", type=click.Path(path_type=Path), default=None, help="Their masks' folder (default: the teacher's fit --masks).")
@click.option("--drop-uncertain", type=click.FloatRange(0, 1, max_open=True), default=DISTILL_DROP, show_default=True,
              help="Fraction of the pseudo-labelled images to drop, most uncertain first (the reference's portion).")
@click.option("--skip-certain", type=click.IntRange(0), default=0, show_default=True,
              help="Also drop the N most certain images (the reference drops 30 of its 10,000 samples).")
@click.option("--student", type=click.Choice(list(STUDENTS)), default=DEFAULT_STUDENT, show_default=True,
              help="The student network (docs/distill.md compares them).")
@click.option("--student-weights", type=click.Path(path_type=Path), default=None, help="Your own weights for the student (all or its encoder's).")
@click.option("--size", type=click.IntRange(8), default=None, help="The student's input side (default: the teacher's grid).")
@click.option("--epochs", type=click.IntRange(1), default=STUDENT_TRAIN.epochs, show_default=True)
@click.option("--epoch-images", type=click.IntRange(1), default=STUDENT_TRAIN.epoch_images, show_default=True,
              help="Images drawn per epoch at least (shuffled passes over a small training set).")
@click.option("--batch-size", type=click.IntRange(1), default=STUDENT_TRAIN.batch_size, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=STUDENT_TRAIN.lr, show_default=True, help="Adam learning rate.")
@click.option("--augment/--no-augment", default=STUDENT_TRAIN.augment, show_default=True, help="Random scale and crop (and flips).")
@click.option("--flip/--no-flip", default=STUDENT_TRAIN.flip, show_default=True,
              help="Random left-right flips (turn off when classes are left/right parts).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the samples, the student's init and its batches.")
@click.option("--resume", is_flag=True, help="Continue a killed run in --out: finished samples and labels are kept, training goes on from its last epoch.")
@_device
@_overwrite
@click.pass_obj
def distill(obj, model_dir, out, inputs, images, samples, sample_steps, labelled, masks, drop_uncertain, skip_certain, student,
            student_weights, size, epochs, epoch_images, batch_size, lr, augment, flip, seed, resume, device, overwrite) -> None:
    """Distil a teacher model into a fast student network (the reference's DatasetDDPM).

    Pseudo-labels unlabelled --images and/or --samples drawn from the teacher's DDPM with the teacher,
    drops the most uncertain, and trains a small segmentation network on them plus the labelled images.
    The student folder works with predict, evaluate and suggest like a teacher's, and `ddpmseg export`
    turns it into ONNX.

    \b
    Examples:
      ddpmseg distill data/train data/unlabelled --model model/ --out student/
      ddpmseg distill --images data/train --samples 1000 --model model/ --out student/
    """
    from ddpmseg.distill import StudentTrainConfig, distill as run_distill

    train = StudentTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, epoch_images=epoch_images, augment=augment,
                               flip=flip, seed=seed)
    s = run_distill(model_dir, out, images=[*images, *inputs], samples=samples, sample_steps=sample_steps, labelled=labelled or None,
                    masks=masks, drop_uncertain=drop_uncertain, skip_certain=skip_certain, student=student,
                    student_weights=student_weights, size=size, train=train, resume=resume, overwrite=overwrite,
                    device=device, progress=obj["progress"])
    r = s.record
    click.echo(f"distill: {plural(s.n_samples, 'sample')} + {plural(s.n_images, 'unlabelled image')} pseudo-labelled, "
               f"{s.kept} kept ({s.dropped_uncertain} most uncertain, {s.dropped_certain} most certain dropped; {s.out / 'filter.png'}), "
               f"+ {s.n_labelled} labelled; {r.student['name']} ({r.student['n_parameters'] / 1e6:.1f} M parameters, "
               f"{r.student['size']} px), epoch {s.best_epoch} kept (mIoU {s.select_miou:.1f} on the labelled images), "
               f"{_seconds(s.seconds)} -> {s.out}")


@main.command()
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path),
              help="The .onnx file to write; NAME.json beside it says how to run it (input size, preprocessing, classes).")
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="An image to check ONNX Runtime against torch on (default: a seeded random input).")
@_overwrite
def export(student, onnx_path, image, overwrite) -> None:
    """Export a distilled STUDENT folder (`ddpmseg distill --out`) to ONNX, checked with ONNX Runtime.

    Input "image" (N, 3, S, S) float32 in [-1, 1], output "logits" (N, K, S, S); teachers do not export.

    \b
    Examples:
      ddpmseg export student/ --onnx student.onnx
      ddpmseg export student/ --onnx student.onnx --image photo.jpg --overwrite
    """
    from ddpmseg.distill.export import export_onnx

    s = export_onnx(student, onnx_path, image=image, overwrite=overwrite)
    on = s.image.name if s.image is not None else "a random input"
    click.echo(f"export: {s.path} ({s.size}x{s.size} input, {plural(s.n_classes, 'class', 'classes')}; {s.json_path.name} "
               f"beside it); ONNX Runtime vs torch on {on}: max |logit diff| {s.max_abs_diff:.1e}; "
               f"{s.onnxruntime_ms:.1f} ms vs {s.torch_ms:.1f} ms per image ({plural(s.threads, 'thread')})")


@main.command("train-ddpm")
@_apply(_images)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder: checkpoints, samples, logs.")
@click.option("--image-size", type=click.IntRange(1), default=None, help="Train a small default ADM for this size (32, 64, 128, 256).")
@click.option("--preset", default=None, help="Train this preset's architecture (e.g. ffhq_256) from scratch.")
@click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="JSON file of guided-diffusion flags.")
@click.option("--init", type=click.Path(path_type=Path), default=None, help="Fine-tune this checkpoint (e.g. ffhq.pt).")
@click.option("--steps", type=int, default=TRAIN.steps, show_default=True, help="Optimizer steps in all.")
@click.option("--batch-size", type=int, default=TRAIN.batch_size, show_default=True, help="Images per step (over all processes).")
@click.option("--lr", type=float, default=TRAIN.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=TRAIN.weight_decay, show_default=True)
@click.option("--ema", type=float, default=TRAIN.ema, show_default=True, help="EMA decay (after a warm-up).")
@click.option("--grad-clip", type=float, default=TRAIN.grad_clip, show_default=True, help="Max gradient norm (0: off).")
@click.option("--dropout", type=float, default=TRAIN.dropout, show_default=True)
@click.option("--schedule-sampler", type=click.Choice(SCHEDULE_SAMPLERS), default=TRAIN.schedule_sampler, show_default=True,
              help="Timestep sampling: uniform, or by each timestep's recent loss.")
@click.option("--precision", type=click.Choice(TRAIN_PRECISIONS), default=TRAIN.precision, show_default=True)
@click.option("--preprocess", type=click.Choice(TRAIN_PREPROCESS), default=TRAIN.preprocess, show_default=True,
              help="resize (as extract), crop (centre), random-crop (a random window along the long side).")
@click.option("--flip/--no-flip", default=TRAIN.flip, show_default=True, help="Random left-right flips.")
@click.option("--seed", type=int, default=TRAIN.seed, show_default=True)
@click.option("--save-every", type=int, default=TRAIN.save_every, show_default=True, help="Steps between checkpoints.")
@click.option("--keep-last", type=int, default=TRAIN.keep_last, show_default=True,
              help="Keep the checkpoint files of only the newest N saved steps (0: keep every save); older ones "
                   "are deleted once a newer save is complete, so --resume always finds one.")
@click.option("--sample-every", type=int, default=TRAIN.sample_every, show_default=True, help="Steps between sample grids (0: never).")
@click.option("--samples", "n_samples", type=int, default=TRAIN.n_samples, show_default=True, help="Images per sample grid.")
@click.option("--sample-steps", type=int, default=TRAIN.sample_steps, show_default=True, help="DDIM steps of the sample grids.")
@click.option("--log-every", type=int, default=TRAIN.log_every, show_default=True, help="Steps between log.jsonl lines.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint with its own settings: repeating them is "
                   "fine, a different value is refused; --steps, --save-every, --sample-every, --log-every, --keep-last may change.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader processes reading images.")
@_device
@click.pass_context
def train_ddpm(ctx: click.Context, inputs, images, out, image_size, preset, model_flags, init, resume, workers, device,
               **settings) -> None:
    """Train a guided-diffusion DDPM on unlabelled IMAGES (files or folders); --ckpt RUN/ then uses it.

    What it costs, measured on 2 CPU cores (AMD EPYC, batch 16): --image-size 32 about 0.8 s/step and
    31 MB per save (model, EMA and optimizer files, every --save-every steps, all kept unless --keep-last
    N); 64 px about 12 s/step (20,000 steps: 2.7 days) and 402 MB per save (20 saves: 8 GB). A GPU is
    far faster (not measured here); the bar shows the time left (eta).

    \b
    Examples:
      ddpmseg train-ddpm photos/ --out run/ --image-size 32 --steps 2000 --save-every 500 --keep-last 2
      ddpmseg train-ddpm photos/ --out run/ --image-size 32 --steps 4000 --resume

    Under torchrun (e.g. torchrun --nproc_per_node 4 -m ddpmseg.cli.main train-ddpm ...) every process
    takes its share of each batch and rank 0 writes the files.
    """
    from ddpmseg.train import TrainConfig, train_ddpm as run_training

    if resume:  # the run's own settings (train.json, flags.json): the library checks those given again
        config = {k: v for k, v in settings.items()
                  if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    else:
        config = TrainConfig(**settings)
    s = run_training(_image_inputs(inputs, images), out, config, preset=preset, model_flags=model_flags,
                     image_size=image_size, init=init, resume=resume, device=device, workers=workers,
                     progress=ctx.obj["progress"])
    resumed = f" (resumed at step {s.resumed_from})" if s.resumed_from else ""
    click.echo(f"train-ddpm: {plural(s.n_images, 'image')}, {s.n_params / 1e6:.1f} M parameters, step {s.step}{resumed}, "
               f"{s.images_per_s:.1f} images/s, loss {s.loss:.4f} -> {s.checkpoint}"
               + (f"; samples {s.samples}" if s.samples else "")
               + _skipped(s.not_images, "folder entry that is not an image", "folder entries that are not images"))


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Cache to write or extend: a .h5 file, or a folder (any name without .h5).")
def merge(sources, out) -> None:
    """Join feature caches of one extraction (e.g. the outputs of extract --shard I/N) into one.

    \b
    Examples:
      ddpmseg merge feats-0.h5 feats-1.h5 --out feats.h5
      ddpmseg merge shard*/ --out feats/
    """
    from ddpmseg.features.cache import merge_caches

    added, kept = merge_caches(list(sources), out)
    click.echo(f"merge: {plural(added, 'image')} added, {kept} already in {out}")


@main.command()
@_apply(_images)
@_apply(_common_backbone)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--method", type=click.Choice(anomaly_config.METHODS), default=anomaly_config.DEFAULT_METHOD,
              show_default=True, help="heal: |image - healed| after partial diffusion; knn: distance to the nearest "
              "normal patch in the DDPM features (PatchCore-style).")
@click.option("--normal", multiple=True, type=click.Path(path_type=Path),
              help="knn: normal images (folders or files, repeatable) for the bank; default: the images the run "
              "(--ckpt RUN/) was trained on.")
@click.option("--coreset", type=click.FloatRange(0, 1, min_open=True), default=anomaly_config.KNN_CORESET,
              show_default=True, help="knn: fraction of the normal patches kept in the bank (greedy k-centre below 1; "
              "1: every patch).")
@click.option("--max-bank-mb", type=click.FloatRange(0, min_open=True), default=anomaly_config.KNN_MAX_MB,
              show_default=True, help="knn: the bank's largest size in MiB (a random sample of the patches beyond).")
@click.option("--grid", type=click.IntRange(0), default=anomaly_config.KNN_GRID, show_default=True,
              help="knn: patch grid cells a side (0: half the model grid, at most 32).")
@click.option("--start-steps", default=",".join(map(str, anomaly_config.DEFAULT_START_STEPS)), show_default=True,
              help="heal: noise each image to each of these steps, heal it back, average the maps.")
@click.option("--sample-steps", type=click.IntRange(1), default=anomaly_config.DEFAULT_SAMPLE_STEPS, show_default=True,
              help="DDIM steps of each reverse process (evenly spaced from the start step to 0).")
@click.option("--ancestral", is_flag=True, help="Full ancestral sampling (every step from the start; slow) instead of DDIM.")
@click.option("--smooth", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Gaussian smoothing of the map (sigma in pixels of the model grid; 0: off).")
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the fixed noise (the one extract uses).")
@click.option("--batch-size", type=click.IntRange(1), default=anomaly_config.DEFAULT_BATCH_SIZE, show_default=True,
              help="Images per forward pass.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True)
@click.option("--vmax", type=click.FloatRange(0, min_open=True), default=None,
              help=f"Map value drawn brightest in the PNGs, one scale for every image (default: heal "
              f"{anomaly_config.DEFAULT_VMAX:g}; knn the bank's radius, the farthest a normal patch of an unseen "
              "normal image lay from the bank).")
@click.option("--save-maps", is_flag=True, help="Also write NAME_anomaly.npy (float32, original size) for evaluate-anomaly.")
@click.option("--skip-done", is_flag=True,
              help="Leave out images whose outputs and scores.csv row exist (a rerun finishes the rest).")
@_overwrite
@click.pass_context
def anomaly(ctx, inputs, images, checkpoint, preset, model_flags, image_size, num_head_channels, device, out,
            method, normal, coreset, max_bank_mb, grid, start_steps, sample_steps, ancestral, smooth, seed, batch_size, precision,
            vmax, save_maps, skip_done, overwrite) -> None:
    """Anomaly maps of IMAGES from a DDPM of normal images: the distance to the nearest normal patch of
    its features (--method knn, the default), or |image - healed| after partial diffusion (--method heal).

    \b
    Examples:
      ddpmseg anomaly new_images/ --ckpt normal_run/ --out maps/ --save-maps
      ddpmseg anomaly new_images/ --ckpt ffhq.pt --normal good_images/ --out maps/
      ddpmseg anomaly new_images/ --ckpt normal_run/ --method heal --out maps_heal/
      ddpmseg anomaly new_images/ --ckpt normal_run/ --step 5000 --method heal --start-steps 100 --out maps100/
    """
    from ddpmseg.anomaly.detect import anomaly_maps

    obj = ctx.obj
    other = next(m for m in anomaly_config.METHODS if m != method)
    foreign = [f"--{k.replace('_', '-')}" for k in anomaly_config.OPTIONS_OF[other]
               if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if foreign:  # knn became the default: a heal command line of before must not run knn and ignore its options
        raise DdpmsegError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} --method {other}'s, "
                           f"not {method}'s; add --method {other}"
                           + (f" (the default method is {method})" if method == anomaly_config.DEFAULT_METHOD else ""))
    s = anomaly_maps(_image_inputs(inputs, images), checkpoint, out, method=method, normal=list(normal) or None,
                     coreset=coreset, max_bank_mb=max_bank_mb, grid=grid, start_steps=_ints(start_steps, "start-steps"),
                     sample_steps=sample_steps, ancestral=ancestral, smooth=smooth, seed=seed, batch_size=batch_size,
                     save_maps=save_maps, vmax=vmax, device=device, precision=precision, progress=obj["progress"],
                     overwrite=overwrite, skip_done=skip_done,
                     **_backbone_args(preset, model_flags, image_size, num_head_channels))
    n = max(s.n_images, 1)
    click.echo(f"anomaly: {plural(s.n_images, 'image')} -> {s.out} ({s.seconds / n:.2f} s/image; scores in "
               f"{s.out / 'scores.csv'})"
               + (f"; {plural(s.already_done, 'image')} done before, left out" if s.already_done else "")
               + (f"; knn bank: {s.bank['patches']:,} patches of {plural(s.bank['images'], 'normal image')} "
                  f"({s.bank['mb']:g} MiB)" if s.bank else "")
               + f"; colour scale 0..{s.vmax:.3g}"
               + (f"; {100 * s.above_vmax:.2g} % of map pixels above --vmax {s.vmax:.3g} (drawn at the top colour"
                  + ("): raise --vmax to see them" if s.above_vmax >= 0.01 else ")") if s.above_vmax > 0 else "")
               + _skipped(s.not_images, "folder entry that is not an image", "folder entries that are not images"))


@main.command("evaluate-anomaly")
@click.option("--maps", "maps_dir", required=True, type=click.Path(path_type=Path),
              help="The --out folder of `ddpmseg anomaly` (NAME_anomaly.npy from --save-maps; scores.csv).")
@click.option("--masks", default=None, type=click.Path(path_type=Path),
              help="Folder of binary masks NAME.png / NAME.npy (non-zero = anomaly; empty for normal images).")
@click.option("--labels", default=None, type=click.Path(path_type=Path),
              help="Or, for data without masks, a CSV image,anomalous (stem, 0 or 1): image AUROC only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_anomaly_command(maps_dir, masks, labels, as_json) -> None:
    """Pixel AUROC, AUPRO (to 30 % FPR), best Dice and image AUROC of anomaly maps against masks
    (image AUROC alone against per-image --labels).

    \b
    Examples:
      ddpmseg evaluate-anomaly --maps anomalies/ --masks ground_truth/
      ddpmseg evaluate-anomaly --maps anomalies/ --masks ground_truth/ --json
      ddpmseg evaluate-anomaly --maps anomalies/ --labels defective.csv
    """
    from ddpmseg.anomaly.metrics import evaluate_anomaly, evaluate_image_labels, format_table

    if (masks is None) == (labels is None):
        raise DdpmsegError("give --masks DIR (per-pixel truth) or --labels CSV (per-image truth), one of them")
    r = evaluate_anomaly(maps_dir, masks) if masks is not None else evaluate_image_labels(maps_dir, labels)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(format_table(r))
    click.echo(f"evaluate-anomaly: {plural(r['n_images'], 'image')}, {r['n_anomalous']} with anomalies")


@main.command()
@_apply(_images)
@click.option("--classes", required=True, help="Label set: a CSV (index,name,r,g,b) or a shipped name (e.g. ffhq_34).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the labels (NAME.png, what fit --masks reads) and the strokes (strokes/NAME.json).")
@click.option("--features", type=click.Path(path_type=Path), default=None,
              help="A feature cache holding the images (from `ddpmseg extract`).")
@click.option("--ckpt", "checkpoint", type=click.Path(path_type=Path), default=None,
              help="Or a checkpoint: features are extracted on demand into OUT/.ddpmseg-label/features.")
@click.option("--preset", default=None, help="With --ckpt: architecture preset (see `ddpmseg presets`).")
@click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="With --ckpt: guided-diffusion flags JSON.")
@click.option("--image-size", type=click.IntRange(1), default=None, help="With --ckpt: a custom ADM's image size.")
@click.option("--num-head-channels", type=click.IntRange(1), default=None, help="With --ckpt: a custom ADM's head channels.")
@_apply(_common_extract)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1 / localhost lets other machines in (with the token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@_device
def label(inputs, images, classes, out, features, checkpoint, preset, model_flags, image_size, num_head_channels, steps,
          blocks, seed, preprocess, precision, noise_samples, host, port, open_browser, device) -> None:
    """Label IMAGES in the browser: paint strokes, Predict (a fit on every stroke so far), Accept, correct.

    Prints the page's URL with its access token; serves until Ctrl-C. Every edit is saved at once in
    OUT (pip install "ddpmseg[label]").

    \b
    Examples:
      ddpmseg label photos/ --classes classes.csv --out labels/ --features feats.h5
      ddpmseg label photos/ --classes classes.csv --out labels/ --ckpt ffhq.pt --open
      ddpmseg fit --features feats.h5 --masks labels/ --classes classes.csv --out model/
    """
    from ddpmseg.label import label_images

    if (features is None) == (checkpoint is None):
        raise click.UsageError("give the features: --features CACHE or --ckpt CKPT (one of the two)")
    if features is not None and any(v is not None for v in (preset, model_flags, image_size, num_head_channels)):
        raise click.UsageError("--preset / --model-flags / --image-size / --num-head-channels go with --ckpt only")
    label_images(_image_inputs(inputs, images), classes, out, features=features, checkpoint=checkpoint,
                 host=host, port=port, open_browser=open_browser,
                 backbone_args=_backbone_args(preset, model_flags, image_size, num_head_channels),
                 extract=_extract_config(steps, blocks, seed, preprocess, precision, noise_samples=noise_samples),
                 device=device, announce=lambda url: click.echo(f"label: open {url}  (Ctrl-C stops; labels in {out})"))


@main.command()
@click.option("--dir", "directory", default="ddpmseg-demo", show_default=True, type=click.Path(path_type=Path))
@click.pass_obj
def demo(obj, directory: Path) -> None:
    """Offline end-to-end run on a tiny random-weight ADM and synthetic images (rewrites DIR).

    \b
    Examples:
      ddpmseg demo
      ddpmseg demo --dir /tmp/ddpmseg-demo
    """
    from ddpmseg.demo import run_demo

    run_demo(directory, echo=click.echo, progress=obj["progress"])


if __name__ == "__main__":
    main()
