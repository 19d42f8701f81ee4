"""Build the performance tables of docs/performance.md from the result files in benchmarks/results/.

    python benchmarks/make_tables.py            # rewrite the tables in docs/performance.md
    python benchmarks/make_tables.py --check    # exit 1 if a table is not what the files give
    python benchmarks/make_tables.py --all      # every row of every file (history), not the newest

Every benchmark saves what it prints as ``benchmarks/results/<name>-<UTC
time>.json`` (``_common.Results``); figures measured before that are carried
as ``transcribed-*.json`` files whose ``provenance`` says where they come
from. A table lies between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in
the page; this script replaces what is between the markers and nothing else.
Each row is the newest measurement of its key (e.g. the fit mode) over all
files (a measured run's date, a transcribed file's publishing date), and
names its machine and its file. Ratios ("vs naive") are computed within one
file (one run, one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "performance.md"
DASH = "—"


@dataclass
class Result:
    path: Path
    data: dict

    @property
    def when(self) -> str:
        return self.data.get("date") or self.data.get("published") or ""

    @property
    def machine(self) -> str:
        return (self.data.get("machine") or {}).get("label") or "unknown machine"

    @property
    def source(self) -> str:
        return f"[{self.path.name}](../benchmarks/results/{self.path.name})"

    @property
    def transcribed(self) -> bool:
        return self.data.get("provenance", "measured") != "measured"

    def rows(self, kind: str) -> list[dict]:
        return [r for r in self.data.get("figures", []) if r.get("benchmark") == kind]


def load(folder: Path = RESULTS) -> list[Result]:
    """Every result file, oldest first."""
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("schema") == "ddpmseg-benchmark-result":
            out.append(Result(path, data))
    return sorted(out, key=lambda r: (r.when, r.path.name))


def pick(results: list[Result], kind: str, key: Callable[[dict], Any], every: bool = False,
         by_machine: bool = False) -> list[tuple[dict, Result]]:
    """The rows of ``kind``: per key the newest file's row (``every``: all rows), the newest file's rows
    first in their order, then keys only older files hold. ``by_machine``: one row per key and machine."""
    chosen: dict[Any, tuple[dict, Result]] = {}
    order: list[Any] = []
    for res in reversed(results):  # newest first
        for row in res.rows(kind):
            k = (key(row), res.machine if by_machine else None, res.path.name if every else None)
            if k not in chosen:
                chosen[k] = (row, res)
                order.append(k)
    return [chosen[k] for k in order]


# -- formatting ----------------------------------------------------------------------------------------
def _decimals(v: float) -> int:
    text = repr(float(v))
    return 0 if "e" in text or text.endswith(".0") else len(text.split(".")[1])


def num(v: Any, cap: int = 2, unit: str = "", lo: int = 0) -> str:
    """``v`` with ``lo`` to ``cap`` decimals (fewer than ``cap`` if it was recorded with fewer: a figure
    transcribed as 48.4 is not shown as 48.40); integers as integers; thousands separated."""
    if v is None:
        return DASH
    if isinstance(v, int) and not isinstance(v, bool) and lo == 0:
        return f"{v:,}{unit}"
    d = max(lo, min(cap, _decimals(v)))
    return f"{v:,.{d}f}{unit}"


def pm(mean: Any, sd: Any, cap: int = 2, lo: int = 1) -> str:
    """mean +- sd at the same number of decimals (mean alone when there is no spread)."""
    if mean is None:
        return DASH
    if sd is None:
        return num(mean, cap, lo=lo)
    d = max(lo, min(cap, max(_decimals(mean), _decimals(sd))))
    return f"{mean:.{d}f} ± {sd:.{d}f}"


def ratio(a: Any, b: Any) -> str:
    return DASH if a in (None, 0) or b in (None, 0) else f"{a / b:.2f}x"


def vs_naive(row: dict, naive: dict | None, key: str, rate: bool = False) -> str:
    """The row's speed-up over the naive row of its run: naive's ``key`` over the row's (a time), or the
    row's over naive's with ``rate`` (a throughput); a dash for the naive row itself or without one."""
    if row["mode"] == "naive" or naive is None:
        return DASH
    return ratio(row.get(key), naive[key]) if rate else ratio(naive[key], row[key])


def gb(row: dict, key: str = "peak_rss") -> str:
    if row.get(f"{key}_gb") is not None:
        return num(row[f"{key}_gb"], 2, " GB", lo=1)
    if row.get(f"{key}_mb") is not None:
        return f"{row[f'{key}_mb'] / 1024:.1f} GB"
    return DASH


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def same_file(res: Result, kind: str, **match: Any) -> dict | None:
    """The row of ``kind`` in the same file whose fields equal ``match``."""
    return next((r for r in res.rows(kind) if all(r.get(k) == v for k, v in match.items())), None)


TAIL = ["machine", "file"]


def tail(res: Result) -> list[str]:
    return [res.machine, res.source]


# -- the tables ----------------------------------------------------------------------------------------
EXTRACT_MODES = {
    "naive": "naive recipe (full forward per t, hooks, upsampled fp32)",
    "ddpmseg": "ddpmseg, fp32 (default)",
    "ddpmseg_bf16": "ddpmseg, `--precision bf16`",
    "ddpmseg_batch1": "explored: `--batch-size 1`, fp32",
    "ddpmseg_bf16_batch1": "explored: `--batch-size 1`, bf16",
    "ddpmseg_channels_last": "explored: channels_last, fp32",
    "ddpmseg_bf16_1thread": "explored: bf16 on 1 thread",
}


def t_extract(results, every):
    body = []
    for row, res in pick(results, "extract", lambda r: (r.get("preset"), r["mode"]), every):
        naive = same_file(res, "extract", mode="naive", preset=row.get("preset"))
        err = row.get("max_rel_error_vs_fp32")
        peak = row.get("fraction_of_matmul_peak")
        rate = DASH if row.get("achieved_gflops") is None else (
            num(row["achieved_gflops"], 0) + ("" if peak is None else f" ({peak:.0%})"))
        body.append([f"`{row.get('preset')}`", EXTRACT_MODES.get(row["mode"], row["mode"]),
                     num(row["seconds_per_image"], 2),
                     vs_naive(row, naive, "seconds_per_image"),
                     num(row.get("gflop_per_image"), 0), rate, gb(row), DASH if err is None else f"{100 * err:.2f} %",
                     *tail(res)])
    return table(["preset", "mode", "s / image", "vs naive", "GFLOP / image", "GFLOP/s (share of matmul peak)",
                  "peak RSS", "bf16 error vs fp32", *TAIL], body)


def t_matmul(results, every):
    body = []
    for row, res in pick(results, "matmul_peak", lambda r: r.get("threads"), every):
        bf16 = row.get("bf16_gflops")
        if bf16 is None and row.get("bf16_gflops_range"):
            lo, hi = row["bf16_gflops_range"]
            bf16_text = f"{lo:,}-{hi:,}"
        else:
            bf16_text = num(bf16, 0)
        body.append([row.get("threads"), num(row.get("fp32_gflops"), 0), bf16_text, *tail(res)])
    return table(["threads", "fp32 GFLOP/s", "bf16 GFLOP/s", *TAIL], body)


def t_cache_size(results, every):
    body = []
    for row, res in pick(results, "cache_size", lambda r: r.get("preset"), every):
        naive = row["naive_bytes_per_image"] / 1e9 if "naive_bytes_per_image" in row else row.get("naive_gb_per_image")
        disk = row["cache_bytes_per_image"] / 1e6 if "cache_bytes_per_image" in row else row.get("cache_mb_per_image")
        body.append([f"`{row.get('preset')}`", num(naive, 2, " GB"), num(disk, 1, " MB"), num(row.get("ratio"), 1) + "x",
                     *tail(res)])
    return table(["preset", "naive: upsampled fp32 features in RAM", "ddpmseg: native fp16 maps on disk", "smaller by",
                  *TAIL], body)


def t_predict(results, every):
    body = []
    for row, res in pick(results, "predict", lambda r: (r.get("preset"), r["mode"], r.get("precision")), every):
        naive = same_file(res, "predict", mode="naive", preset=row.get("preset"))
        body.append([row["mode"] + ("" if row["mode"] == "naive" else f" ({row.get('precision')})"),
                     num(row["seconds_per_image"], 2), num(row.get("extract_seconds_per_image"), 2),
                     num(row.get("classify_and_write_seconds_per_image"), 2),
                     vs_naive(row, naive, "seconds_per_image"), gb(row), *tail(res)])
    return table(["mode", "s / image, end to end", "extraction", "classification + PNGs", "vs naive", "peak RSS",
                  *TAIL], body)


FIT_MODES = {
    "naive": "naive trainer (the reference's loop, features in RAM)",
    "reference": "reference recipe (exact, streaming native maps)",
    "fast": "`fast`",
    "fast_fp32": "`fast`, fp32 layer 1",
    "tiles": "`tiles` (default)",
    "tiles_full": "`tiles`, the whole default fit to its stop",
    "reference_full": "reference recipe, the whole fit to its early stop",
}


def t_fit_speed(results, every):
    body = []
    for row, res in pick(results, "fit", lambda r: r["mode"], every):
        naive = same_file(res, "fit", mode="naive")
        body.append([FIT_MODES.get(row["mode"], row["mode"]), row.get("images", DASH),
                     num(row.get("member_pixels_per_s"), 0),
                     vs_naive(row, naive, "member_pixels_per_s", rate=True),
                     num(row.get("fit_seconds"), 1) if row["mode"] in ("tiles_full", "reference_full") else DASH,
                     num(row.get("steps_per_member"), 0) if row["mode"] in ("tiles_full", "reference_full") else DASH,
                     num(row.get("train_loss"), 3), gb(row), *tail(res)])
    return table(["mode", "images", "member-pixels / s", "vs naive", "fit s", "steps / member",
                  "training loss", "peak RSS", *TAIL], body)


def t_fit_full(results, every):
    body = []
    for row, res in pick(results, "fit_full_comparison", lambda r: (r.get("images"),), every):
        how = row.get("reference_full_fit", "projected")
        ref = num(row["reference_full_fit_seconds"], 0, " s")
        ref += " (**projected** from its measured rate at its minimum of 4 epochs; its early stop comes later)" \
            if how == "projected" else " (measured)"
        speed = DASH if row.get("speedup") is None else f"**{row['speedup']}x ({how})**"
        pixels = row.get("labelled_pixels")
        body.append([f"{row.get('images')} x 256² x 8448 dims, 34 classes, {num(pixels, 0)} labelled pixels",
                     num(row.get("tiles_full_fit_seconds"), 0, " s") + (
                         "" if row.get("tiles_steps_per_member") is None else
                         f" ({num(row['tiles_steps_per_member'], 0)} steps)"),
                     ref, speed, *tail(res)])
    return table(["fit", "`tiles` (default), measured", "reference recipe", "tiles faster by", *TAIL], body)


FEATURES = {
    "ffhq_256": "ffhq_256 architecture, random weights, 8448 dims",
    "trained": "the 32 px DDPM `train-ddpm` trained on the faces",
    "tiny": "tiny random-weight demo ADM (64 px, 1056 dims)",
}


def ece_cell(mean: Any, sd: Any, where: Any) -> str:
    cell = pm(mean, sd, 4, lo=3)
    return cell + (" (grid)" if cell != DASH and where == "model grid" else "")


def t_fit_quality(results, every):
    body = []
    for row, res in pick(results, "fit_quality_summary", lambda r: (r["kind"], r["recipe"]), every):
        fit = num(row.get("fit_seconds_mean"), 1)
        if row.get("fit_seconds_mean") is None and row.get("fit_seconds_range"):
            fit = "{}-{}".format(*row["fit_seconds_range"])
        body.append([FEATURES.get(row["kind"], row["kind"]), row.get("train_images", DASH),
                     f"`{row['recipe']}`" + (" (default)" if row["recipe"] == "tiles" else ""),
                     pm(row["miou_mean"], row.get("miou_std")),
                     ece_cell(row.get("ece_mean"), row.get("ece_std"), row.get("ece_at")), fit, *tail(res)])
    return table(["features", "training photos", "recipe", "held-out mIoU", "ECE", "fit s", *TAIL], body)


def t_tile_study(results, every):
    body = []
    for row, res in pick(results, "tile_study_summary", lambda r: (r["kind"], r["setting"]), every):
        side = row.get("tile_side_256")
        per_step = row.get("tiles_per_step", row.get("tiles_per_step_reported"))
        body.append([row["setting"] if side is None else f"{side}x{side} px", DASH if side is None else num(row.get("lr"), 4),
                     num(per_step, 0) + (" (as published)" if "tiles_per_step_reported" in row and per_step is not None else ""),
                     pm(row["miou_mean"], row.get("miou_std")), *tail(res)])
    return table(["tiles (of a 256 grid)", "lr", "tiles a step", "held-out mIoU", *TAIL], body)


def t_trained(results, every):
    body = []
    for row, res in pick(results, "trained_features_summary", lambda r: r["weights"], every):
        pc = row.get("per_class") or {}
        body.append([row["weights"], pm(row["miou_mean"], row.get("miou_std")), num(pc.get("nose"), 1, lo=1),
                     num(pc.get("mouth"), 1, lo=1), *tail(res)])
    return table(["weights", "held-out mIoU", "nose IoU", "mouth IoU", *TAIL], body)


WORKLOADS = {
    "fit": "fit, eyes8 tiny ADM (1056 dims)",
    "fit_ffhq": "fit, paper shapes (8448 dims, 34 classes)",
    "extract": "extract, tiny ADM",
    "extract_ffhq": "extract, full ffhq_256",
}
LOADS = {"idle": "idle", "loaded": "beside a busy job", "loaded_same": "two ddpmseg jobs at once"}
METRICS = {"member_steps_per_s": "member steps/s", "seconds_per_image": "s/image"}


def t_threads(results, every):
    body = []
    for row, res in pick(results, "threads_summary", lambda r: (r["workload"], r["machine"], r.get("policy")), every):
        body.append([WORKLOADS.get(row["workload"], row["workload"]), LOADS.get(row["machine"], row["machine"]),
                     METRICS.get(row["metric"], row["metric"]), num(row.get("baseline_value"), 3),
                     num(row.get("policy_value"), 3), num(row["speedup"], 2, "x", lo=1), *tail(res)])
    return table(["workload", "machine load", "metric", "spinning (default)", "passive", "passive's gain", *TAIL], body)


def t_threads_cli(results, every):
    body = [[row["case"], num(row["fit_seconds"], 1, " s", lo=1), *tail(res)]
            for row, res in pick(results, "threads_cli", lambda r: r["case"], every)]
    return table(["eyes8 reference fit through the CLI", "time", *TAIL], body)


def t_eyes8(results, every):
    body = [[f"`{row['recipe']}`", num(row.get("fit_seconds"), 1, " s"), num(row.get("peak_rss_gb"), 2, " GB"),
             *tail(res)] for row, res in pick(results, "eyes8_fit", lambda r: r["recipe"], every, by_machine=True)]
    return table(["recipe", "fit time", "peak RSS", *TAIL], body)


def _variant(row: dict) -> str:
    v = row["variant"]
    if v == "mlp":
        return "MLP ensemble (default `fit`)"
    if v == "control":
        return "control: the same decoder, no diffusion"
    m = re.fullmatch(r"ddp_s(\d+)_g(\d+)", v)
    if not m:
        return v
    steps, gens = int(m[1]), int(m[2])
    text = f"DDP, {steps} step{'s' * (steps != 1)}" + (f", {gens} generations" if gens > 1 else "")
    if row.get("width") not in (None, 128):
        text += f", width {row['width']}"
    elif steps == 3 and gens == 1:
        text += " (default)"
    if row.get("seeds") == 1:
        text += " (one seed)"
    return text


def t_ddp(results, every):
    body = []
    for row, res in pick(results, "ddp_head_summary", lambda r: (r["kind"], r["variant"], r.get("width")), every):
        body.append([FEATURES.get(row["kind"], row["kind"]), _variant(row),
                     pm(row["heldout_miou_mean"], row.get("heldout_miou_std"), 1),
                     ece_cell(row.get("ece_mean"), row.get("ece_std"), row.get("ece_at")),
                     num(row.get("fit_seconds_mean"), 0), num(row.get("classify_s_per_image_mean"), 3, lo=3), *tail(res)])
    return table(["features", "head", "held-out mIoU", "ECE", "fit s", "classify s / image", *TAIL], body)


def _setting(s: str) -> str:
    if s.startswith("baseline: "):
        return {"baseline: mean-image": "baseline: distance to the mean normal image",
                "baseline: random": "baseline: random map"}.get(s, s)
    m = re.fullmatch(r"t([\d+]+)_(ddim(\d+)|ancestral)( \(default\))?", s)
    if not m:
        return s
    how = f"DDIM {m[3]}" if m[3] else "ancestral"
    return f"start {m[1]}, {how}" + (" (heal's defaults before the real-defects table)" if m[4] else "")


def t_anomaly(results, every):
    body = []
    for row, res in pick(results, "anomaly_summary", lambda r: r["setting"], every):
        cells = [pm(row.get(f"{k}_mean"), row.get(f"{k}_std"), 3, lo=2)
                 for k in ("pixel_auroc", "aupro_30", "best_dice", "image_auroc")]
        body.append([_setting(row["setting"]), *cells, num(row.get("s_per_image_mean"), 3, lo=2), *tail(res)])
    return table(["maps", "pixel AUROC", "AUPRO (30 %)", "best Dice", "image AUROC", "s / image", *TAIL], body)


def t_ray(results, every):
    body = []
    for row, res in pick(results, "ray_summary", lambda r: (r["mode"], r["workers"]), every):
        name = "plain loop (2 torch threads)" if row["mode"] == "plain" else \
            f"`--engine ray`, {row['workers']} actor{'s' * (row['workers'] != 1)} of 1 CPU"
        body.append([name, num(row.get("fixed_seconds"), 1, lo=1), num(row.get("s_per_image"), 3, lo=3),
                     num(row.get("images_per_s"), 1, lo=1), *tail(res)])
    return table(["engine", "fixed s", "s / image", "images / s", *TAIL], body)


def t_cache_append(results, every):
    body = []
    for row, res in pick(results, "cache_append", lambda r: (r["kind"], r["cache_images"]), every):
        body.append(["single `.h5` file" if row["kind"] == "file" else "cache folder", num(row["cache_images"]),
                     num(row.get("cache_mb"), 0, " MB"), num(row["append_2_seconds"], 2, " s"),
                     num(row.get("empty_cache_2_seconds"), 2, " s"), *tail(res)])
    return table(["cache", "images in it", "size", "appending 2 images", "the same into an empty cache", *TAIL], body)


def t_calibration(results, every):
    body = []
    for row, res in pick(results, "calibration", lambda r: (r["kind"], r["noise_samples"]), every):
        n = row["noise_samples"]
        body.append([f"{n} noise draw{'s' * (n != 1)}" + (" (the paper)" if n == 1 else ""),
                     num(row.get("extract_s_per_image"), 3, lo=3), pm(row["heldout_miou_mean"], row.get("heldout_miou_std"), 1),
                     ece_cell(row.get("ece_ensemble_mean"), row.get("ece_ensemble_std"), row.get("ece_at")),
                     ece_cell(row.get("ece_members_mean"), row.get("ece_members_std"), row.get("ece_at")), *tail(res)])
    return table(["block maps averaged over", "extract s / photo", "held-out mIoU", "ECE, ensemble mean softmax",
                  "ECE, single members (mean)", *TAIL], body)


def t_active(results, every):
    rows = pick(results, "active_summary", lambda r: (r["kind"], r["strategy"]), every)
    labelled = (rows[0][0].get("labelled") or list(range(2, 2 + len(rows[0][0]["mean_curve"])))) if rows else []
    body = [[row["strategy"], *[num(v, 1, lo=1) for v in row["mean_curve"]], num(row.get("area"), 1, lo=1), *tail(res)]
            for row, res in rows]
    return table(["labelled photos", *[str(n) for n in labelled], "curve mean", *TAIL], body)


LABEL_KINDS = {"trained": "32 px DDPM trained on the faces", "tiny": "tiny random-weight ADM, 64 px"}


def _ms(row: dict, key: str, cap: int = 2, lo: int = 1) -> str:
    """A ``{"mean", "sd"}`` figure of bench_label's summary rows as mean +- sd."""
    v = row.get(key)
    return DASH if v is None else pm(v["mean"], v.get("sd"), cap, lo)


def t_label_predict(results, every):
    body = []
    for row, res in pick(results, "label", lambda r: r["kind"], every):
        body.append([LABEL_KINDS.get(row["kind"], row["kind"]), _ms(row, "predict_first_s"), _ms(row, "label_fit_s"),
                     _ms(row, "predict_other_s"), _ms(row, "predict_after_edit_s"), _ms(row, "predict_first_ckpt_s"),
                     num(row["seeds"]), *tail(res)])
    return table(["features", "first Predict: fit + predict (s)", "of which the fit (s)", "Predict, another photo (s)",
                  "Predict after one more stroke (s)", "first Predict with `--ckpt` (s)", "seeds", *TAIL], body)


def t_label_quality(results, every):
    body = []
    for row, res in pick(results, "label", lambda r: r["kind"], every):
        body.append([LABEL_KINDS.get(row["kind"], row["kind"]), f"{row['n_labelled']} / {row['n_test']}",
                     _ms(row, "labelled_pixels_percent", 1) + " %",
                     _ms(row, "miou_strokes_label", 1), _ms(row, "miou_full_label", 1),
                     _ms(row, "miou_strokes_default", 1), _ms(row, "miou_full_default", 1),
                     f"{_ms(row, 'fit_s_strokes_label', 1)} / {_ms(row, 'fit_s_full_default', 0, 0)}", num(row["seeds"]),
                     *tail(res)])
    return table(["features", "labelled / held-out photos", "pixels under strokes", "strokes, Predict's fit",
                  "full masks, Predict's fit", "strokes, `fit` default", "full masks, `fit` default",
                  "fit s: strokes (Predict's) / full masks (default)", "seeds", *TAIL], body)


def t_precision(results, every):
    body = []
    for row, res in pick(results, "precision_quality_summary", lambda r: r["precision"], every):
        err = same_file(res, "precision_feature_error")
        err_text = DASH if row["precision"] == "fp32" or err is None else \
            f"{100 * err['mean_rel_error']:.2f} % mean / {100 * err['max_rel_error']:.2f} % max"
        body.append([row["precision"], pm(row["miou_mean"], row.get("miou_std")), err_text, *tail(res)])
    return table(["features", "held-out mIoU", "block-map error vs fp32", *TAIL], body)


def t_distill_quality(results, every):
    body = []
    for row, res in pick(results, "distill_quality_summary", lambda r: r["variant"], every):
        body.append([row["variant"], pm(row["miou_mean"], row.get("miou_std"), 1), num(row.get("seeds")), *tail(res)])
    return table(["model (FASSEG, 10 labelled photos)", "held-out mIoU", "seeds", *TAIL], body)


def t_distill_sampling(results, every):
    body = []
    for row, res in pick(results, "distill_sampling", lambda r: r["sample_steps"], every):
        how = "ancestral, every step" if row["sampler"] == "ancestral" else f"DDIM {row['sample_steps']} steps"
        body.append([how, num(row["samples"]), num(row["s_per_sample"], 3, lo=2),
                     num(row["teacher_uncertainty_median"], 3, lo=3), num(row["teacher_uncertainty_p90"], 3, lo=3), *tail(res)])
    return table(["sampler", "samples", "s / sample", "teacher's image uncertainty, median", "90th percentile", *TAIL], body)


def t_distill_speed(results, every):
    body = []
    for row, res in pick(results, "distill_speed", lambda r: r["model"], every):
        first = same_file(res, "distill_speed", model="teacher ffhq_256")
        body.append([row["model"], num(row["s_per_image"], 3, lo=2), num(row.get("loop_s_per_image"), 3, lo=2),
                     DASH if row is first or first is None else f"{first['s_per_image'] / row['s_per_image']:.0f}x",
                     gb(row), *tail(res)])
    for row, res in pick(results, "distill_onnx", lambda r: "onnx", every):
        body.append(["student unet 256, ONNX Runtime (network only)", num(row["onnxruntime_ms"] / 1000, 4, lo=3),
                     DASH, f"torch {num(row['torch_ms'], 1, ' ms')}, max logit diff {row['max_abs_diff']:.1e}", DASH, *tail(res)])
    return table(["predict, 256x256 images", "s / image end to end", "s / image in the loop", "vs the teacher",
                  "peak RSS", *TAIL], body)


def t_student_forward(results, every):
    body = [[f"`{row['student']}`", num(row["parameters_m"], 2, " M"), num(row["ms_256"], 1, " ms"), *tail(res)]
            for row, res in pick(results, "student_forward", lambda r: r["student"], every)]
    return table(["student", "parameters", "forward at 256 px", *TAIL], body)


OLD_CONTROL, NEW_CONTROL = "control (fixed proposals, 1 step)", "control (learned proposals, 1 step)"


def t_instances(results, every):
    """Per data set and model the newest run's row; a control rerun (``--variants control``, after the
    control's proposal boxes were made to learn) takes the place of the old control row, which trained
    non-learning boxes (``every``: all rows as they are)."""
    body = []
    rows = pick(results, "instances_summary", lambda r: (r["dataset"], r["variant"]), every)
    if not every:
        new = {row["dataset"]: (row, res) for row, res in rows if row["variant"] == NEW_CONTROL}
        placed = [new[row["dataset"]] if row["variant"] == OLD_CONTROL and row["dataset"] in new else (row, res)
                  for row, res in rows if not (row["variant"] == NEW_CONTROL and any(
                      r["dataset"] == row["dataset"] and r["variant"] == OLD_CONTROL for r, _ in rows))]
        rows = placed
    for row, res in rows:
        size = f"{row['parameters'] / 1e6:.2f} M, {row['iterations']} steps" if row.get("parameters") else DASH
        timing = " (contaminated)" if row.get("timings") == "contaminated" else ""
        body.append([row["dataset"], row["variant"], pm(row["ap_mean"], row.get("ap_std"), 1),
                     pm(row["ap50_mean"], row.get("ap50_std"), 1), num(row["seeds"]), size,
                     num(row["fit_seconds_mean"], 0) + timing, num(row["predict_s_per_image_mean"], 3, lo=3) + timing,
                     *tail(res)])
    return table(["data", "model", "mask AP", "AP50", "seeds", "head size, training", "fit s", "predict s / image",
                  *TAIL], body)


REAL_DEFAULTS = {"heal": "heal t50 (10 DDIM steps), top 20 %", "knn": "knn, all patches (no coreset)"}  # `anomaly`'s
REAL_NAMES = {"knn, all patches (no coreset)": "knn, every patch up to 512 MiB (a random sample beyond)",
              "knn, coreset 1 %, grid S/2": "knn, greedy coreset 1 % (PatchCore's; the default before this table)",
              "heal t100+250+400, top 1 %": "heal t100+250+400, top 1 % (the defaults before this table)"}


def _real_setting(s: str) -> str:
    return s.replace(" (default)", "")


def t_anomaly_real(results, every):
    """Per image size and setting the newest run's summary (``every``: all), the baseline first, then heal,
    then knn; the gain over the baseline of the same run; seconds per image from the per-seed rows."""
    import statistics

    picked = pick(results, "anomaly_real_summary", lambda r: (r["size"], _real_setting(r["setting"])), every)
    # the baseline needs no DDPM and the split is fixed: every run of a size has the same one (the newest shown)
    bases = {row["size"]: row for row, _ in picked if row["setting"] == "baseline: mean image"}

    def rank(s: str) -> int:  # baseline, heal's start steps and combinations, its image scores (healx), knn
        return 0 if s.startswith("baseline") else 2 if "DDIM steps" in s else 1 if s.startswith("heal") else 3

    body = []
    for row, res in sorted(picked, key=lambda x: (x[0]["size"], rank(x[0]["setting"]))):
        name = _real_setting(row["setting"])
        base = same_file(res, "anomaly_real_summary", size=row["size"], setting="baseline: mean image") \
            or bases.get(row["size"])
        gain = DASH if base is None or name.startswith("baseline") else \
            f"{row['image_auroc_mean'] - base['image_auroc_mean']:+.3f}"
        seeds = [r for r in res.rows("anomaly_real") if r["setting"] == row["setting"] and r["size"] == row["size"]]
        speed = [r["s_per_image"] for r in seeds if r.get("s_per_image") is not None]
        bank = [r for r in seeds if r.get("bank_patches")]
        shown = REAL_NAMES.get(name, name) + (" **(default)**" if name in REAL_DEFAULTS.values() else "")
        body.append([f"{row['size']} px", shown, pm(row["image_auroc_mean"], row.get("image_auroc_std") or None, 3, lo=3),
                     gain, num(row["seeds"]), num(statistics.mean(speed), 3, lo=2) if speed else DASH,
                     f"{bank[0]['bank_patches']:,}" if bank else DASH, *tail(res)])
    return table(["size", "detector, image score", "image AUROC", "vs baseline", "seeds", "s / image",
                  "bank patches", *TAIL], body)


SEGDIFF_VARIANTS = {
    "mlp": "MLP ensemble (default `fit`), 32 px features",
    "ddp": "DDP head, 32 px features",
    "segdiff_frozen": "SegDiff, G on the frozen 32 px features",
    "segdiff_rrdb": "SegDiff, G an RRDB on the 64 px pixels",
    "control_rrdb": "control: SegDiff's network as a one-step segmenter, 64 px pixels",
}
SEGDIFF_SAMPLING = {"ddim10_g1": "DDIM 10 steps, 1 generation", "ddim10_g9": "DDIM 10 steps, 9 generations",
                    "ancestral_g1": "ancestral 100 steps, 1 generation", "ancestral_g9": "ancestral 100 steps, 9 generations"}


def t_segdiff(results, every):
    """From the per-seed rows, per run setting (the newest run of each; ``every``: every run), so a run stopped
    early still shows what it measured (marked)."""
    import statistics

    body = []
    runs: dict[Any, Result] = {}
    for res in results:  # oldest first: a newer run of the same settings replaces an older one
        if res.rows("segdiff"):
            args = res.data.get("args") or {}
            key = res.path.name if every else tuple(args.get(k) for k in ("iterations", "crop", "size", "ddp_iterations"))
            runs[key] = res
    for res in sorted(runs.values(), key=lambda r: -len(r.rows("segdiff"))):  # the full comparison first
        args = res.data.get("args") or {}
        groups: dict[str, list[dict]] = {}
        for row in res.rows("segdiff"):
            groups.setdefault(row["variant"], []).append(row)
        timing = "" if args.get("alone") else " (shared CPU)"
        for variant, rows in groups.items():
            base = next((k for k in SEGDIFF_VARIANTS if variant == k or variant.startswith(k + "_")), variant)
            sampling = variant[len(base) + 1:]
            steps = {"ddp": args.get("ddp_iterations"), "mlp": None}.get(base, args.get("iterations"))
            miou = [r["heldout_miou"] for r in rows]
            sd = statistics.stdev(miou) if len(miou) > 1 else None
            seeds = num(len(rows)) + ("" if res.data.get("complete", True) else " (run stopped early)")
            body.append([SEGDIFF_VARIANTS.get(base, base), num(steps) if steps else DASH,
                         SEGDIFF_SAMPLING.get(sampling, sampling or DASH), pm(statistics.mean(miou), sd, 1), seeds,
                         num(statistics.mean(r["fit_seconds"] for r in rows), 0) + timing,
                         num(statistics.mean(r["predict_s_per_image"] for r in rows), 3, lo=3) + timing, *tail(res)])
    return table(["head", "training steps", "inference", "held-out mIoU", "seeds", "fit s", "predict s / image",
                  *TAIL], body)


TABLES: dict[str, Callable[[list[Result], bool], str]] = {
    "extract": t_extract, "matmul-peak": t_matmul, "cache-size": t_cache_size, "predict": t_predict,
    "fit-speed": t_fit_speed, "fit-full": t_fit_full, "fit-quality": t_fit_quality, "tile-study": t_tile_study,
    "eyes8-fit": t_eyes8, "trained-features": t_trained, "threads": t_threads, "threads-cli": t_threads_cli,
    "ddp-head": t_ddp, "anomaly": t_anomaly, "ray": t_ray, "cache-append": t_cache_append,
    "calibration": t_calibration, "active": t_active, "precision-quality": t_precision,
    "distill-quality": t_distill_quality, "distill-sampling": t_distill_sampling, "distill-speed": t_distill_speed,
    "student-forward": t_student_forward, "segdiff": t_segdiff, "instances": t_instances,
    "label-predict": t_label_predict, "anomaly-real": t_anomaly_real, "label-quality": t_label_quality,
}
MARKER = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str, results: list[Result], every: bool = False) -> str:
    """``text`` with every marked table rebuilt from ``results``; an unknown table name is an error."""
    def one(m: re.Match) -> str:
        name = m[2]
        if name not in TABLES:
            raise SystemExit(f"{DOC}: table {name!r} is unknown; known: {', '.join(TABLES)}")
        return f"{m[1]}{TABLES[name](results, every)}\n{m[4]}"

    return MARKER.sub(one, text)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``: a reader
    (or a crash, or Ctrl-C) sees the old page or the complete new one, never a half-written page.

    The same steps as ``ddpmseg._io.write_atomic``, written out here because this script runs with
    the standard library only (CI calls it before anything is imported) and a private module of
    the package is not imported from outside it. The page keeps its permissions (a new one gets
    0o666 less the umask, as a plain write).
    """
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=DOC, help="the page holding the table markers")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table would change")
    ap.add_argument("--all", action="store_true", help="every row of every file instead of the newest per key")
    args = ap.parse_args()
    text = args.doc.read_text(encoding="utf-8")
    new = render(text, load(args.results), args.all)
    names = [m[2] for m in MARKER.finditer(text)]
    if args.check:
        if new != text:
            print(f"{args.doc}: tables differ from {args.results}; run python benchmarks/make_tables.py", file=sys.stderr)
            return 1
        print(f"{args.doc}: {len(names)} tables up to date")
        return 0
    if new != text:
        write_atomic(args.doc, new)
    print(f"{args.doc}: {len(names)} tables from {len(load(args.results))} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
