"""What Ctrl-C leaves behind, by command: the line ``ddpmseg: interrupted; ...`` must say what is true.

:func:`before` notes, as a command starts, what its outputs already hold (cheap: file names and
times, a cache's image count); :func:`message` looks again after the interrupt and says what
this run finished, what is kept, and the command that continues. Both only read files and never
raise: a message that cannot look says only what holds whatever happened.

Imports nothing heavy at load time (``ddpmseg --help`` stays instant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ddpmseg._text import plural

NOTHING = "nothing was written"

# Commands that write nothing before they finish (or write atomically at the end).
_NOTHING_WRITTEN = {
    "fit": "no model was written (fit does not resume); run it again to start over",
    "convert": NOTHING + " (the folder appears only when complete); run it again",
}


def _end_outputs(command: str, p: dict) -> list[Path]:
    """The files a command writes only at its end, one after the other."""
    if command == "evaluate":
        return [Path(p["out"]) / n for n in ("reliability.png", "confusion.png")] if p.get("out") else []
    if command == "suggest":
        return [Path(p["out"]) / n for n in ("suggest.csv", "suggest.png")]
    return [Path(p["out"])]  # kmeans: the grid PNG


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _end_before(command: str) -> Callable[[dict], Any]:
    return lambda p: {str(f): _mtime(f) for f in _end_outputs(command, p)}


def _end(command: str) -> Callable[[dict, Any], str]:
    def say(p: dict, noted: Any) -> str:
        written = [f.name for f in _end_outputs(command, p) if noted is None or _mtime(f) != noted.get(str(f))]
        if noted is None or not written:
            what = {"evaluate": "the figures of --out come", "suggest": "suggest.csv and suggest.png come",
                    "kmeans": "the grid PNG comes"}[command]
            return f"{NOTHING} ({what} at the end); run it again"
        return f"only {', '.join(written)} was written before the interrupt; run it again with --overwrite"
    return say


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    """File name -> modification time (ns) of the files in ``folder`` matching ``pattern``."""
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern) if p.is_file()}


def _written_since(folder: Path, pattern: str, before: dict[str, int] | None) -> int:
    """How many files matching ``pattern`` are new or rewritten since ``before``."""
    now = _mtimes(folder, pattern)
    return sum(1 for name, t in now.items() if before is None or before.get(name) != t)


# -- extract ---------------------------------------------------------------------------------------
def _cached_images(out: Path) -> int:
    """Finished images of a cache: a folder's image files, an HDF5 file's complete images and its parts."""
    from ddpmseg.features.cache import finished_images

    return finished_images(out)


def _extract_before(p: dict) -> Any:
    return _cached_images(Path(p["out"]))


def _extract(p: dict, before: Any) -> str:
    out = Path(p["out"])
    now = _cached_images(out)
    if before is None:
        return f"the images finished before the interrupt are kept in {out}; run the same command again to extract the rest"
    if now > before:
        return (f"the cache {out} keeps the {plural(now - before, 'image')} this run finished ({now} in all); "
                "run the same command again to extract the rest")
    held = f" (it holds the {plural(now, 'image')} cached before)" if now else ""
    return f"no image finished, so nothing was added to {out}{held}; run the same command again to extract them"


# -- predict / anomaly -----------------------------------------------------------------------------
def _predict_before(p: dict) -> Any:
    return _mtimes(Path(p["out"]), "*_labels.png")  # written last: an image with it is finished


def _finished(p: dict, before: Any, last: str, kept: str) -> str:
    """predict's and anomaly's message: ``kept`` of the images whose ``last`` file this run wrote, and --skip-done."""
    out = Path(p["out"])
    n = _written_since(out, last, before)
    again = "rerun with --skip-done to finish the rest" + (" (in place of --overwrite)" if p.get("overwrite") else "")
    if n:
        return f"{kept} of the {plural(n, 'image')} this run finished are kept in {out}; {again}"
    return f"no image finished; {again}"


def _predict(p: dict, before: Any) -> str:
    return _finished(p, before, "*_labels.png", "the PNGs")


def _anomaly_last(p: dict) -> str:
    from ddpmseg.anomaly.config import MAP_SUFFIX

    if p.get("save_maps"):  # what each image writes last
        return f"*{MAP_SUFFIX}"
    return "*_healed.png" if p.get("method") == "heal" else "*_anomaly.png"


def _anomaly_before(p: dict) -> Any:
    return _mtimes(Path(p["out"]), _anomaly_last(p))


def _anomaly(p: dict, before: Any) -> str:
    return _finished(p, before, _anomaly_last(p), "the outputs and scores.csv rows")


# -- train-ddpm ------------------------------------------------------------------------------------
def _train(p: dict, before: Any) -> str:
    from ddpmseg.backbones import runs

    out = Path(p["out"])
    steps = runs.saved_steps(out) if out.is_dir() else []
    again = "run the same command again" if p.get("resume") else "continue with the same command and --resume"
    if steps:
        saved = (f"the checkpoint of step {steps[0]} is" if len(steps) == 1 else
                 f"the checkpoints of {len(steps)} steps ({steps[0]} to {steps[-1]}) are")
        return f"{saved} kept in {out}; {again}"
    if not runs.is_run(out):
        return f"no checkpoint was saved and {out} holds no run yet; run the same command again to start over"
    every = ""
    try:
        every = f" (the first comes at step {int(json.loads((out / runs.TRAIN_CONFIG).read_text())['save_every'])})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    resume = "run the same command again" if p.get("resume") else "the same command with --resume (it reuses the folder)"
    return (f"no checkpoint was saved yet{every}, so nothing is kept to continue from; rerunning starts over "
            f"from step 0: {resume}, or use a new --out")


# -- distill --------------------------------------------------------------------------------------
def _distill(p: dict, before: Any) -> str:
    out = Path(p["out"])
    kept = []
    samples = len(list((out / "samples").glob("sample_?????.png"))) if (out / "samples").is_dir() else 0
    labels = sum(len(list((out / f).glob("*.json"))) for f in ("samples", "pseudo") if (out / f).is_dir())
    if samples:
        kept.append(plural(samples, "sample"))
    if labels:
        kept.append(f"{plural(labels, 'pseudo-label')}")
    if (out / "train_log.jsonl").is_file():
        epochs = len((out / "train_log.jsonl").read_text().splitlines())
        kept.append(f"the student's training after {plural(epochs, 'epoch')}")
    if not kept:
        return f"nothing to continue from was written in {out}; run the same command again"
    return f"{', '.join(kept)} are kept in {out}; continue with the same command and --resume"


# -- download --------------------------------------------------------------------------------------
def _download(p: dict, before: Any) -> str:
    from ddpmseg.backbones import get_preset

    preset = get_preset(p["preset"])
    dest = Path(p["directory"]) / preset.filename
    if preset.family == "diffusers":
        return (f"the files fetched so far stay in {dest} (huggingface_hub resumes); "
                "run the same command again to fetch the rest")
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        return f"{dest} is complete but was not checked; run the same command again to check it"
    if part.is_file() and part.stat().st_size:
        return f"the partial download is kept ({part}, {part.stat().st_size:,} bytes); run the same command again to resume"
    return "nothing was downloaded yet; run the same command again"


# -- merge / demo ----------------------------------------------------------------------------------
def _merge(p: dict, before: Any) -> str:
    out = Path(p["out"])
    now = _cached_images(out)
    if before is not None and now > before:
        n = now - before
        return (f"the {plural(n, 'image')} merged so far {'is' if n == 1 else 'are'} kept in {out} ({now} in all); "
                "run the same command again to merge the rest")
    if before is None:
        return f"the images merged before the interrupt are kept in {out}; run the same command again to merge the rest"
    return f"no image was merged into {out}; run the same command again"


def _demo(p: dict, before: Any) -> str:
    return f"{p['directory']} holds the demo's steps that finished; run it again (it rewrites the folder)"


def _label(p: dict, noted: Any) -> str:
    out = Path(p["out"])
    n = len([f for f in out.glob("*.png") if f.is_file()]) if out.is_dir() else 0
    return (f"the labelling server stopped; every edit was saved as it was made: {plural(n, 'labelled image')} in "
            f"{out} (NAME.png, strokes/NAME.json); run the same command to go on, or `ddpmseg fit --masks {out}`")


_BEFORE: dict[str, Callable[[dict], Any]] = {
    "extract": _extract_before,
    "merge": lambda p: _cached_images(Path(p["out"])),
    "predict": _predict_before,
    "anomaly": _anomaly_before,
    **{c: _end_before(c) for c in ("evaluate", "suggest", "kmeans")},
}
_AFTER: dict[str, Callable[[dict, Any], str]] = {
    "extract": _extract,
    "merge": _merge,
    "predict": _predict,
    "anomaly": _anomaly,
    "train-ddpm": _train,
    "distill": _distill,
    "download": _download,
    "demo": _demo,
    "label": _label,
    **{c: _end(c) for c in ("evaluate", "suggest", "kmeans")},
}
# What holds whatever the files show, should looking fail.
_FALLBACK = {
    "extract": "the images finished before the interrupt are kept in the cache; run the same command again to extract the rest",
    "merge": "the images merged before the interrupt are kept; run the same command again to merge the rest",
    "predict": "the PNGs of images that finished are kept; rerun with --skip-done to finish the rest",
    "anomaly": "the outputs and scores of images that finished are kept; rerun with --skip-done to finish the rest",
    "train-ddpm": "the checkpoints saved before the interrupt, if any, are kept in --out; with some, continue with "
                  "the same command and --resume",
    "distill": "finished samples, pseudo-labels and training epochs, if any, are kept in --out; continue with the "
               "same command and --resume",
    "download": "a partial download, if any, is kept as FILE.part; run the same command again to resume",
    "demo": "the demo folder holds the steps that finished; run it again",
    "label": "every edit was saved in --out as it was made; run the same command to go on",
    "evaluate": "the figures of --out, if any, are written at the end; run it again",
    "suggest": "suggest.csv and suggest.png are written at the end; run it again (with --overwrite if they are there)",
    "kmeans": "the grid PNG is written at the end; run it again (with --overwrite if it is there)",
}


def before(command: str, params: dict) -> Any:
    """What ``command``'s outputs hold as it starts (None: not noted)."""
    try:
        f = _BEFORE.get(command)
        return f(params) if f else None
    except Exception:  # noqa: BLE001 (a note that cannot be taken must not stop the command)
        return None


def message(command: str, params: dict | None, noted: Any = None) -> str:
    """The true rest of ``ddpmseg: interrupted; ...`` for ``command`` run with ``params``."""
    if command in _NOTHING_WRITTEN:
        return _NOTHING_WRITTEN[command]
    f = _AFTER.get(command)
    if f is None:
        return NOTHING
    try:
        return f(params or {}, noted)
    except Exception:  # noqa: BLE001 (Ctrl-C must end with one line, never a traceback)
        return _FALLBACK[command]
