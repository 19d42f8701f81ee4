"""``ddpmseg`` commands. Each only parses options, calls one library function and
prints a summary line; errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from ddpmseg.classify.training import RECIPES
from ddpmseg.errors import DdpmsegError
from ddpmseg.pipeline import MIN_PIXELS
from ddpmseg.records import DEFAULT_BLOCKS, DEFAULT_STEPS, PREPROCESS_MODES, PRECISIONS, STORAGE_DTYPES, ExtractConfig


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DdpmsegError(f"--{name} takes comma-separated integers such as 50,150,250, got {value!r}") from None


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (library and OS messages can hold newlines)."""
    return " ".join(str(e).split())


class _Group(click.Group):
    """Turns library errors into one line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) if ctx.params else "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("ddpmseg: interrupted; finished work is kept, run the same command again to resume", err=True)
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
        except Exception as e:  # a bug: still one line unless --debug
            if debug:
                traceback.print_exc()
            click.echo(f"ddpmseg: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for details)", err=True)
            ctx.exit(2)


_common_backbone = [
    click.option("--ckpt", "checkpoint", required=True, type=click.Path(path_type=Path), help="Checkpoint: a guided-diffusion state dict file, or a diffusers UNet2DModel folder / hub id."),
    click.option("--preset", default=None, help="Architecture preset (see `ddpmseg presets`); default: match or infer from the checkpoint."),
    click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="JSON file of guided-diffusion flags for a custom architecture."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
]
_DEFAULT = ExtractConfig()
_common_extract = [
    click.option("--steps", default=",".join(map(str, DEFAULT_STEPS)), show_default=True, help="Diffusion timesteps."),
    click.option("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)), show_default=True, help="Decoder (output_blocks) indices."),
    click.option("--seed", default=_DEFAULT.seed, show_default=True, help="Seed of the shared noise."),
    click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=_DEFAULT.preprocess, show_default=True, help="resize: plain resize to the model size; crop: short side then centre crop."),
    click.option("--precision", type=click.Choice(list(PRECISIONS)), default=_DEFAULT.precision, show_default=True, help="U-Net arithmetic: fp32 (the recipe), bf16 (~1.6x faster on CPUs with bf16 units, ~1.3% feature error), fp16 (CUDA only)."),
]


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def _extract_config(steps: str, blocks: str, seed: int, preprocess: str, precision: str, storage: str = _DEFAULT.storage_dtype):
    return ExtractConfig(_ints(steps, "steps"), _ints(blocks, "blocks"), seed, preprocess, storage, precision)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(package_name="ddpmseg")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Label-efficient semantic segmentation on frozen diffusion-model features."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="ddpmseg: %(message)s")
    ctx.obj = {"progress": not quiet}


@main.command()
def presets() -> None:
    """List the architecture presets and where their checkpoints come from."""
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
    """Download a preset's published checkpoint (resumes a partial file)."""
    from ddpmseg.backbones.download import download_preset

    path = download_preset(preset, directory, url=url, progress=obj["progress"])
    click.echo(f"checkpoint ready: {path}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--preset", default=None, help="guided-diffusion preset of the checkpoint; default: match or infer.")
@click.option("--model-flags", type=click.Path(path_type=Path), default=None, help="JSON file of guided-diffusion flags.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the diffusers pipeline (unet/ + scheduler/).")
def convert(checkpoint: Path, preset, model_flags, out: Path) -> None:
    """Convert a guided-diffusion (ADM) checkpoint into a diffusers UNet2DModel + DDPMScheduler folder."""
    from ddpmseg.backbones.convert import convert_adm_to_diffusers

    r = convert_adm_to_diffusers(checkpoint, out, preset=preset, model_flags=model_flags)
    click.echo(f"converted {checkpoint} -> {r.out} ({r.n_params / 1e6:.1f} M parameters, "
               f"max relative output error {r.max_rel_err:.1e}); use it with --ckpt {r.out}")


@main.command()
@_apply(_common_backbone)
def blocks(checkpoint: Path, preset, model_flags, device) -> None:
    """List the decoder blocks of a checkpoint: index, module, channels, resolution."""
    from ddpmseg.backbones import create_backbone

    infos = create_backbone(checkpoint, preset, model_flags, device).blocks()
    width = max([18] + [len(b.module) for b in infos])
    click.echo(f"{'index':>5}  {'module':{width}s} {'channels':>8}  resolution")
    for b in infos:
        click.echo(f"{b.index:>5}  {b.module:{width}s} {b.channels:>8}  {b.resolution}x{b.resolution}")


@main.command()
@_apply(_common_backbone)
@click.option("--images", required=True, multiple=True, type=click.Path(path_type=Path), help="Image folder or files (repeatable).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature file (HDF5), e.g. feats.h5.")
@_apply(_common_extract)
@click.option("--batch-size", default=0, show_default=True, help="Timesteps per forward pass (0 = all of an image's at once).")
@click.option("--storage", type=click.Choice(STORAGE_DTYPES), default=_DEFAULT.storage_dtype, show_default=True, help="On-disk dtype of the block maps.")
@click.pass_obj
def extract(obj, checkpoint, preset, model_flags, device, images, out, steps, blocks, seed, preprocess, precision, batch_size, storage) -> None:
    """Extract decoder-block features of images into a cache file."""
    from ddpmseg.pipeline import extract_features

    cfg = _extract_config(steps, blocks, seed, preprocess, precision, storage)
    s = extract_features(checkpoint, images, out, config=cfg, preset=preset, model_flags=model_flags,
                         device=device, batch_size=batch_size, progress=obj["progress"])
    per = s.seconds / s.new if s.new else 0.0
    click.echo(f"extract: {s.new} new, {s.skipped} already cached, {s.total} in {s.out} "
               f"({per:.1f} s/image, {s.bytes_per_image / 2**20:.1f} MiB/image)")


@main.command()
@click.option("--features", required=True, type=click.Path(path_type=Path), help="Feature file from `ddpmseg extract`.")
@click.option("--masks", required=True, type=click.Path(path_type=Path), help="Folder of label maps (.npy, label PNGs or colour PNGs with --classes).")
@click.option("--labels", default=None, type=int, help="Use the first N labelled images (natural sort order).")
@click.option("--classes", default=None, help="Label set: a shipped name (e.g. ffhq_34) or a CSV index,name,r,g,b.")
@click.option("--ensemble", default=10, show_default=True, help="Number of MLPs in the ensemble.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-epochs", default=100, show_default=True)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="reference", show_default=True,
              help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()) + ".")
@click.option("--ignore-index", default=None, type=int,
              help="Label neither trained nor scored (default: the label set's, else 255; bedroom_28: 0).")
@click.option("--min-pixels", default=MIN_PIXELS, show_default=True, type=click.IntRange(0),
              help="A class covering fewer pixels of an image is ignored in that image (the reference's rule).")
@click.option("--pixel-fraction", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the labelled pixels visited per epoch (a fresh random subset each epoch).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model folder to write.")
@click.pass_obj
def fit(obj, features, masks, labels, classes, ensemble, seed, max_epochs, recipe, ignore_index, min_pixels,
        pixel_fraction, device, out) -> None:
    """Train the pixel-classifier ensemble on cached features and masks."""
    from ddpmseg.pipeline import fit_model

    s = fit_model(features, masks, out, labels=labels, classes=classes, ensemble=ensemble, seed=seed,
                  max_epochs=max_epochs, ignore_index=ignore_index, min_pixels=min_pixels, device=device,
                  progress=obj["progress"], recipe=recipe, pixel_fraction=pixel_fraction)
    click.echo(f"fit: {len(s.image_ids)} images, {s.n_pixels} pixels, {s.n_classes} classes, "
               f"{s.seconds:.1f} s, steps per member {min(s.n_iter)}-{max(s.n_iter)} -> {s.out}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--ckpt", "checkpoint", default=None, type=click.Path(path_type=Path), help="Checkpoint, if moved since fit.")
@click.option("--device", default="auto", show_default=True)
@click.pass_obj
def predict(obj, images, model_dir, out, checkpoint, device) -> None:
    """Segment images: label, overlay and uncertainty PNGs at the original size."""
    from ddpmseg.pipeline import predict_images

    s = predict_images(images, model_dir, out, checkpoint=checkpoint, device=device, progress=obj["progress"])
    n = max(s.n_images, 1)
    click.echo(f"predict: {s.n_images} images -> {s.out} ({s.seconds / n:.2f} s/image, "
               f"{s.extract_seconds / n:.2f} s of it extraction)")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--images", required=True, multiple=True, type=click.Path(path_type=Path))
@click.option("--masks", required=True, type=click.Path(path_type=Path))
@click.option("--ckpt", "checkpoint", default=None, type=click.Path(path_type=Path), help="Checkpoint, if moved since fit.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def evaluate(obj, model_dir, images, masks, checkpoint, device, as_json) -> None:
    """Per-class IoU and mIoU of a model on labelled images."""
    from ddpmseg.pipeline import evaluate_model

    r = evaluate_model(model_dir, images, masks, checkpoint=checkpoint, device=device,
                       progress=obj["progress"] and not as_json)
    if as_json:
        click.echo(json.dumps(r))
        return
    width = max(len(n) for n in r["per_class"])
    for name, iou in r["per_class"].items():
        click.echo(f"{name:{width}s}  {100 * iou:5.1f}")
    click.echo(f"evaluate: mIoU {100 * r['miou']:.1f} over {r['n_images']} images")


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@_apply(_common_backbone)
@click.option("--k", default=5, show_default=True, help="Clusters per cell.")
@_apply(_common_extract)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Grid PNG to write.")
@click.pass_obj
def kmeans(obj, image, checkpoint, preset, model_flags, device, k, steps, blocks, seed, preprocess, precision, out) -> None:
    """The paper's Figure-4 grid: k-means of each block's features per timestep."""
    from ddpmseg.pipeline import kmeans_grid_image

    cfg = _extract_config(steps, blocks, seed, preprocess, precision)
    path = kmeans_grid_image(image, checkpoint, out, k=k, config=cfg, preset=preset, model_flags=model_flags,
                             device=device, progress=obj["progress"])
    click.echo(f"kmeans: {len(cfg.blocks)} blocks x {len(cfg.steps)} steps, k={k} -> {path}")


@main.command()
@click.option("--dir", "directory", default="ddpmseg-demo", show_default=True, type=click.Path(path_type=Path))
@click.pass_obj
def demo(obj, directory: Path) -> None:
    """Offline end-to-end run on a tiny random-weight ADM and synthetic images."""
    from ddpmseg.demo import run_demo

    run_demo(directory, echo=click.echo, progress=obj["progress"])


if __name__ == "__main__":
    main()
