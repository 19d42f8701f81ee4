"""The training loop: guided-diffusion's objective, our loop (no MPI), crash-safe checkpoints, torchrun.

One step: this process's share of the step's samples (``TrainImages``), for
each its timestep and noise from its own seeded generator, guided-diffusion's
``GaussianDiffusion.training_losses`` (the MSE on the noise, plus the
variational bound when the model learns its sigmas: the "hybrid" loss of the
published checkpoints), AdamW, optional gradient clipping, then the EMA.
Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel, every rank takes ``batch_size / world`` samples of
each step, and rank 0 writes every file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import ddpmseg.backbones.runs as runs
from ddpmseg import data, viz
from ddpmseg._io import check_writable, file_sha256, write_atomic
from ddpmseg.backbones import AdmConfig, adm_architecture, get_preset, read_state_dict, resolve_device
from ddpmseg.backbones.adm import build_diffusion, build_unet
from ddpmseg.errors import DdpmsegError
from ddpmseg.train.config import RESUMABLE, TrainConfig, option_name, resumed_config, small_architecture
from ddpmseg.train.data import DIFFUSION, STEP, TrainImages, generator, seed_of

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    out: Path
    step: int  # steps completed
    resumed_from: int
    seconds: float
    images_per_s: float
    loss: float  # mean training loss of the last log interval
    checkpoint: Path
    samples: Path | None
    n_params: int
    n_images: int
    not_images: list[str]


class _Dist:
    """This process's place under torchrun (rank 0 of 1 otherwise)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every rank, concatenated in rank order (each rank has the same length)."""
        if self.world == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world)]
        torch.distributed.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()


class LossSecondMoment:
    """Importance sampling of timesteps by the root mean square of each one's last 10 losses
    (guided-diffusion's "loss-second-moment" sampler; uniform until every timestep has 10)."""

    def __init__(self, n_steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.history = np.zeros((n_steps, history))
        self.counts = np.zeros(n_steps, dtype=np.int64)
        self.uniform_prob = uniform_prob

    def weights(self) -> np.ndarray:
        if not (self.counts == self.history.shape[1]).all():
            return np.ones(len(self.counts))
        w = np.sqrt(np.mean(self.history**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / len(w)

    def update(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        full = self.history.shape[1]
        for t, loss in zip(ts, losses):
            if self.counts[t] == full:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": torch.from_numpy(self.history), "counts": torch.from_numpy(self.counts)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.history, self.counts = state["history"].numpy().copy(), state["counts"].numpy().copy()


def _sampler_file(run: Path, step: int) -> Path:
    return run / f"sampler{step:06d}.pt"


def _draws(samples: list[int], seed: int, n_steps: int, shape: tuple[int, ...], weights: np.ndarray | None):
    """(t, importance weights, noise) of the samples, each from the sample's own generator."""
    ts, noise = [], []
    p = None if weights is None else torch.from_numpy(weights / weights.sum())
    for k in samples:
        g = generator(seed, k, DIFFUSION)
        if p is None:
            ts.append(int(torch.randint(n_steps, (), generator=g)))
        else:
            ts.append(int(torch.multinomial(p, 1, generator=g)))
        noise.append(torch.randn(shape, generator=g))
    t = torch.tensor(ts)
    w = torch.ones(len(ts)) if p is None else 1.0 / (n_steps * p[t].float())
    return t, w, torch.stack(noise)


def _architecture(out: Path, resume: bool, preset: str | None, model_flags: str | Path | None,
                  image_size: int | None, init: str | Path | None,
                  saved_init: str | None = None) -> tuple[AdmConfig, dict | None]:
    """The run's architecture and, with ``init``, the weights to start from (on resume: the run's own
    ``saved_init`` when no step was saved yet, so a fine-tune killed early starts again from its weights)."""
    if resume:
        arch = AdmConfig.from_json(out / runs.FLAGS)
        if saved_init and not runs.saved_steps(out):
            return arch, read_state_dict(runs.latest_ema(saved_init)[0] if runs.is_run(saved_init) else saved_init)
        return arch, None
    given = [o for o, v in (("--preset", preset), ("--model-flags", model_flags), ("--image-size", image_size)) if v]
    if len(given) > 1:
        raise DdpmsegError(f"give one of {' / '.join(given)}: each fixes the architecture on its own")
    if init is not None:
        if runs.is_run(init):  # a run folder: its newest EMA weights
            init = runs.latest_ema(init)[0]
        if preset is None and model_flags is None and runs.is_run(Path(init).parent):
            model_flags = Path(init).parent / runs.FLAGS  # a checkpoint of a run: the run's flags
        state = read_state_dict(init)
        found = get_preset(preset) if preset else None
        return adm_architecture(state, str(init), found, model_flags, image_size)[1], state
    if preset:
        found = get_preset(preset)
        if found.family != "adm":
            raise DdpmsegError(f"--preset {preset} is a diffusers model; train-ddpm trains guided-diffusion ADMs")
        return found.config, None
    if model_flags:
        return AdmConfig.from_json(model_flags), None
    if image_size:
        return small_architecture(image_size), None
    raise DdpmsegError("give the architecture: --image-size S (a small default for 32/64/128/256 px), "
                       "--preset NAME, --model-flags FILE, or --init CKPT to fine-tune a checkpoint")


def _check_out(out: Path, resume: bool) -> None:
    check_writable(out, folder=True)
    if resume:
        if not runs.is_run(out):
            raise DdpmsegError(f"--resume: {out} is not a training run (no {runs.FLAGS}); start one without --resume")
        if not (out / runs.TRAIN_CONFIG).is_file():
            raise DdpmsegError(f"--resume: {out} has no {runs.TRAIN_CONFIG}; start a new run in another --out")
    elif out.is_dir() and any(out.iterdir()):
        hint = "pass --resume to continue it" if runs.is_run(out) else "choose a new or empty folder"
        raise DdpmsegError(f"--out {out} exists and is not empty; {hint}")


def _differences(given: Any, run: AdmConfig) -> str:
    """What of architecture ``given`` differs from the run's, as ``name value (run's: value)``."""
    if not isinstance(given, AdmConfig):
        return f"a {given.family} model, not guided-diffusion's ADM"
    mine, theirs = given.to_dict(), run.to_dict()
    diff = [f"{k} {mine[k]} (the run's {theirs[k]})" for k in mine if mine[k] != theirs.get(k)]
    return ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")


def _architecture_conflicts(out: Path, preset: str | None, model_flags: str | Path | None, image_size: int | None,
                            init: str | Path | None, saved_init: str | None) -> list[str]:
    """What the architecture options repeated with ``--resume`` say that the run did not do."""
    flags = out / runs.FLAGS
    run = AdmConfig.from_json(flags)
    conflicts = []
    if image_size is not None and image_size != run.image_size:
        conflicts.append(f"--image-size {image_size} differs from the run's {run.image_size} ({flags})")
    for option, value, config in (("--preset", preset, lambda: get_preset(preset).config),
                                  ("--model-flags", model_flags, lambda: AdmConfig.from_json(model_flags))):
        if value is not None:
            given = config()
            if given != run:
                conflicts.append(f"{option} {value} differs from the run's architecture ({flags}): "
                                 f"{_differences(given, run)}")
    if init is not None and str(Path(init).resolve()) != saved_init:
        theirs = saved_init or "none (trained from scratch)"
        conflicts.append(f"--init {init} differs from the run's {theirs} ({out / runs.TRAIN_CONFIG})")
    return conflicts


def _resumed_config(out: Path, given: TrainConfig | Mapping[str, Any] | None, steps: int | None, preset: str | None,
                    model_flags: str | Path | None, image_size: int | None, init: str | Path | None) -> TrainConfig:
    """The run's own settings (``train.json``), after checking that what the call repeats agrees with them."""
    source = out / runs.TRAIN_CONFIG
    saved = TrainConfig.from_json(source)
    config, conflicts = resumed_config(saved, given or {}, str(source))
    conflicts += _architecture_conflicts(out, preset, model_flags, image_size, init, saved.init)
    if conflicts:
        may = ", ".join(option_name(k) for k in RESUMABLE)
        raise DdpmsegError(f"--resume continues the run in {out} with its own settings, but "
                           f"{'; '.join(conflicts)}; leave out what differs or give the run's values "
                           f"(only {may} may change)")
    return config if steps is None else dataclasses.replace(config, steps=steps)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _read_log(out: Path, until: int) -> list[dict]:
    """The run's log lines up to step ``until`` (a line cut by a kill, or past a resume point, is dropped)."""
    rows = []
    path = out / runs.LOG
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", until + 1) <= until:
            rows.append(row)
    return rows


class _Trainer:
    """The model, its EMA, the optimizer and what a checkpoint holds."""

    def __init__(self, arch: AdmConfig, config: TrainConfig, init_state: dict | None, dist: _Dist) -> None:
        self.arch, self.config, self.dist = arch, config, dist
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # guided-diffusion's init, seeded
            self.model = build_unet(arch, dropout=config.dropout).train().requires_grad_(True)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.model.to(dist.device)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.net = self.model
        if dist.world > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.diffusion = build_diffusion(arch)
        self.sampler = LossSecondMoment(arch.diffusion_steps) if config.schedule_sampler != "uniform" else None

    def ema_state(self) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.model.named_parameters()]
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({n: e.detach().clone() for n, e in zip(names, self.ema)})
        return state

    def save(self, out: Path, step: int) -> Path:
        """Model, EMA and optimizer (and sampler) files of ``step``, each atomically; the optimizer last."""
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        ema = runs.ema_file(out, self.config.ema, step)
        write_atomic(runs.model_file(out, step), lambda p: torch.save(cpu(self.model.state_dict()), p))
        write_atomic(ema, lambda p: torch.save(cpu(self.ema_state()), p))
        if self.sampler is not None:
            write_atomic(_sampler_file(out, step), lambda p: torch.save(self.sampler.state_dict(), p))
        write_atomic(runs.opt_file(out, step), lambda p: torch.save(self.opt.state_dict(), p))
        return ema

    def load(self, out: Path, step: int) -> None:
        self.model.load_state_dict(torch.load(runs.model_file(out, step), map_location=self.dist.device, weights_only=True))
        ema = torch.load(runs.ema_file(out, self.config.ema, step), map_location=self.dist.device, weights_only=True)
        for e, (n, _) in zip(self.ema, self.model.named_parameters()):
            e.copy_(ema[n])
        self.opt.load_state_dict(torch.load(runs.opt_file(out, step), map_location=self.dist.device, weights_only=True))
        if self.sampler is not None:
            self.sampler.load_state_dict(torch.load(_sampler_file(out, step), weights_only=True))

    def step(self, step: int, batch: torch.Tensor, samples: list[int]) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step; (mean loss over all ranks, this rank's t, its per-sample losses)."""
        cfg, dev = self.config, self.dist.device
        torch.manual_seed(seed_of(cfg.seed, step, STEP))  # dropout, if any: the same draws after a resume
        weights = self.sampler.weights() if self.sampler is not None else None
        t, w, noise = _draws(samples, cfg.seed, self.arch.diffusion_steps, tuple(batch.shape[1:]), weights)
        x0, t, w, noise = batch.to(dev), t.to(dev), w.to(dev), noise.to(dev)
        net = self.net
        if cfg.precision == "bf16":
            def net(x, ts, _net=self.net):  # bf16 matmuls and convs, the loss terms in fp32
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    return _net(x, ts).float()
        terms = self.diffusion.training_losses(net, x0, t, noise=noise)
        loss = (terms["loss"] * w).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # warm-up: a short run's EMA is not its initial weights
        with torch.no_grad():
            for e, p in zip(self.ema, self.model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        if self.sampler is not None:
            ts, losses = self.dist.gather(t), self.dist.gather(terms["loss"].detach())
            self.sampler.update(ts.tolist(), losses.tolist())
        return float(self.dist.mean(loss.detach().reshape(1))), t, terms["loss"].detach()

    @torch.no_grad()
    def sample_grid(self, path: Path, step: int | None = None) -> Path:
        """DDIM samples of the EMA weights (respaced to ``sample_steps``), one fixed noise per run, enlarged
        to a grid at least 256 px wide under a header saying the step, EMA and sampler."""
        cfg, s = self.config, self.arch.image_size
        if not hasattr(self, "_sampling_model"):
            self._sampling_model = build_unet(self.arch).to(self.dist.device)
        model = self._sampling_model
        model.load_state_dict(self.ema_state())
        spaced = build_diffusion(self.arch, respacing=f"ddim{cfg.sample_steps}")
        noise = torch.randn((cfg.n_samples, 3, s, s), generator=torch.Generator().manual_seed(cfg.seed))
        x = spaced.ddim_sample_loop(model, noise.shape, noise=noise.to(self.dist.device), clip_denoised=True)
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        header = (f"step {step:,}, " if step is not None else "") + f"EMA {cfg.ema:g}, DDIM {cfg.sample_steps} steps"
        viz.save_png_atomic(path, viz.sample_sheet(images, header))
        return path


def train_ddpm(
    images: Sequence[str | Path],
    out: str | Path,
    config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    model_flags: str | Path | None = None,
    image_size: int | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    steps: int | None = None,
    device: str = "auto",
    workers: int = 0,
    progress: bool = False,
) -> TrainSummary:
    """Train a guided-diffusion ADM on ``images`` (unlabelled) into the run folder ``out``.

    The architecture comes from ``preset``, ``model_flags``, ``image_size``
    (:func:`~ddpmseg.train.config.small_architecture`) or ``init`` (a
    checkpoint to fine-tune; its architecture as ``--ckpt`` reads it).
    ``config`` may also be a mapping of some of TrainConfig's fields (the rest
    their defaults).

    ``resume=True`` continues ``out`` from its last complete checkpoint with
    its own settings (``RUN/train.json``, ``RUN/flags.json``) and, on the CPU,
    gives the weights the uninterrupted run would have. What the call repeats
    (``config``, a TrainConfig or a mapping of the settings given again, and
    ``preset`` / ``model_flags`` / ``image_size`` / ``init``) must agree with
    the run's, else a DdpmsegError names each setting that differs with both
    values; ``steps`` and the other :data:`~ddpmseg.train.config.RESUMABLE`
    settings (how often to save, sample and log) may change. ``--ckpt out``
    then loads the newest EMA checkpoint on every other command.
    """
    out = Path(out)
    dist = _Dist(resolve_device(device))
    try:
        _check_out(out, resume)
        if resume:
            config = _resumed_config(out, config, steps, preset, model_flags, image_size, init)
        elif isinstance(config, Mapping):
            config = TrainConfig(**config)
        config = config or TrainConfig()
        if steps is not None and not resume:
            config = dataclasses.replace(config, steps=steps)
        skipped: list[str] = []
        paths = data.list_images(images, skipped=skipped)
        for p in paths:  # every image readable before any training
            data.load_rgb(p)
        arch, init_state = _architecture(out, resume, preset, model_flags, image_size, init,
                                         config.init if resume else None)
        if init is not None:
            config = dataclasses.replace(config, init=str(Path(init).resolve()))
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if config.batch_size % dist.world:
            raise DdpmsegError(f"--batch-size {config.batch_size} must split evenly over the {dist.world} processes")
        trainer = _Trainer(arch, config, init_state, dist)
        start = 0
        if resume:
            done = runs.saved_steps(out)
            start = done[-1] if done else 0
            if start:
                trainer.load(out, start)
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in out.glob(".*.tmp"):  # of a save killed midway
                tmp.unlink(missing_ok=True)
            _write_json(out / runs.FLAGS, {**arch.to_dict(), "dropout": config.dropout})
            # the training images (absolute paths, contents) beside the settings: `anomaly --method knn` builds its
            # bank of normal patches from them by default
            _write_json(out / runs.TRAIN_CONFIG, {**config.to_dict(), runs.IMAGES_KEY: [
                {"path": str(p.resolve()), "sha256": file_sha256(p)} for p in paths]})
            kept = _read_log(out, start)
            write_atomic(out / runs.LOG, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        dist.barrier()
        return _run(trainer, paths, out, start, workers, progress, skipped)
    finally:
        dist.close()


def _run(trainer: _Trainer, paths: list[Path], out: Path, start: int, workers: int, progress: bool,
         skipped: list[str]) -> TrainSummary:
    cfg, dist, arch = trainer.config, trainer.dist, trainer.arch
    dataset = TrainImages(paths, arch.image_size, cfg.batch_size, cfg.seed, cfg.preprocess, cfg.flip, dist.rank, dist.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, cfg.steps), num_workers=workers)
    # one time-left figure, tqdm's own, labelled eta=: smoothing=0 makes it this run's mean step time so far
    # (saves and sample grids included) times the steps left, where tqdm's default would follow the last few steps
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and dist.main),
               smoothing=0, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, eta={remaining}, "
                                       "{rate_fmt}{postfix}]")
    logfile = (out / runs.LOG).open("a") if dist.main else None
    checkpoint, samples = None, None
    losses, seen, t0, interval_t0, last_loss = [], 0, time.perf_counter(), time.perf_counter(), math.nan
    try:
        for step, batch in zip(range(start, cfg.steps), loader):
            loss, _, _ = trainer.step(step, batch, dataset.samples(step))
            losses.append(loss)
            seen += cfg.batch_size
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                rate = cfg.batch_size * len(losses) / max(now - interval_t0, 1e-9)
                last_loss = float(np.mean(losses))
                if logfile is not None:
                    row = {"step": done, "loss": round(last_loss, 6), "lr": cfg.lr, "images_per_s": round(rate, 3)}
                    logfile.write(json.dumps(row) + "\n")
                    logfile.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
                losses, interval_t0 = [], now
            bar.update(1)
            if dist.main and (done % cfg.save_every == 0 or done == cfg.steps):
                checkpoint = trainer.save(out, done)
                runs.prune(out, cfg.keep_last)  # only now that the new step is saved whole
                plot = viz.line_plot(*_curve(out, done), f"training loss (mean of each logged interval), step {done:,}",
                                     "step", log_y=True, ylabel="training loss (log scale)")
                viz.save_png_atomic(out / "loss.png", plot)
            if dist.main and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                samples = trainer.sample_grid(out / f"samples_{done:06d}.png", done)
    finally:
        bar.close()
        if logfile is not None:
            logfile.close()
    seconds = time.perf_counter() - t0
    if checkpoint is None:  # nothing left to train (a resume at the last step)
        done_steps = runs.saved_steps(out)
        checkpoint = runs.ema_file(out, cfg.ema, done_steps[-1]) if done_steps else out
    return TrainSummary(out, max(start, cfg.steps), start, seconds, seen / max(seconds, 1e-9), last_loss, checkpoint,
                        samples, sum(p.numel() for p in trainer.model.parameters()), len(paths), skipped)


def _curve(out: Path, until: int) -> tuple[list[float], list[float]]:
    rows = _read_log(out, until)
    return [r["step"] for r in rows], [r["loss"] for r in rows]
