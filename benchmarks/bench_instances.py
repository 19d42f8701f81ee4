"""Instances: DiffusionInst (1 and 4 DDIM steps), its control (learned fixed proposals, one step) and
the connected components of the MLP ensemble's class map, held-out COCO mask AP over seeds.

(a) synthetic scenes (ddpmseg.instances.synthetic, 64 px; features of the 32 px FASSEG DDPM run at
64 px: it is fully convolutional), 20 train / 20 test; (b) FASSEG: each connected component of eyes,
nose and mouth is an instance, the first 10 photos train, the last 10 test, features of the 32 px DDPM
(~/.cache/ddpmseg/bench/fasseg32), the head at 64 px, scored at the photos' own size (363x512).
Timings (head only, from cached features) are single-threaded and, unless run alone, contaminated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FASSEG, Results  # noqa: E402

from ddpmseg.data import LabelSet, Preprocess, load_label_set, load_mask  # noqa: E402
from ddpmseg.features.cache import FeatureCache  # noqa: E402
from ddpmseg.heads import ImageMaps, get_head  # noqa: E402
from ddpmseg.instances.baseline import components  # noqa: E402
from ddpmseg.instances.core import instances_from_semantic  # noqa: E402
from ddpmseg.instances.metrics import mask_ap  # noqa: E402
from ddpmseg.instances.synthetic import CLASS_NAMES, make_scenes  # noqa: E402
from ddpmseg.model import SegmentationModel  # noqa: E402
from ddpmseg.pipeline import extract_features, fit_model  # noqa: E402

RUN = Path.home() / ".cache" / "ddpmseg" / "bench" / "fasseg32"
THINGS = {"eyes": 3, "nose": 4, "mouth": 5}


def synthetic(work: Path, n_train: int, n_test: int) -> dict:
    from PIL import Image

    scenes = make_scenes(n_train + n_test, 64, seed=1234)
    (work / "syn" / "masks").mkdir(parents=True)
    paths, truth = [], {}
    for i, (img, inst) in enumerate(scenes):
        p = work / "syn" / f"scene{i:03d}.png"
        Image.fromarray(img).save(p)
        sem = np.zeros(img.shape[:2], np.uint8)
        for m, c in zip(inst.masks, inst.classes):
            sem[m] = c
        Image.fromarray(sem).save(work / "syn" / "masks" / p.name)
        paths.append(p)
        truth[p.stem] = inst
    feats = work / "syn.h5"
    flags = json.loads((RUN / "flags.json").read_text())  # the same weights at 64 px: attention at the same depth
    flags.update(image_size=64, attention_resolutions=",".join(str(2 * int(a)) for a in flags["attention_resolutions"].split(",")))
    (work / "flags64.json").write_text(json.dumps(flags))
    ckpt = sorted(RUN.glob("ema_*.pt"))[-1]
    extract_features(ckpt, paths, feats, model_flags=work / "flags64.json", device="cpu")
    labels = LabelSet("synthetic", ("background", *CLASS_NAMES), ((0, 0, 0), (200, 60, 50), (50, 160, 60), (60, 80, 210)))
    labels.to_csv(work / "syn" / "classes.csv")
    return dict(name="synthetic", feats=feats, train=[p.stem for p in paths[:n_train]],
                test=[p.stem for p in paths[n_train:]], truth=truth, masks=work / "syn" / "masks",
                classes=str(work / "syn" / "classes.csv"), things=[1, 2, 3],
                categories={i + 1: n for i, n in enumerate(CLASS_NAMES)}, min_area=1)


def fasseg(work: Path, n_train: int, n_test: int) -> dict:
    images = sorted((FASSEG / "train" / "images").glob("*.png"))
    images = images[:n_train] + images[-n_test:]
    labelset = load_label_set(FASSEG / "classes.csv")
    truth = {p.stem: instances_from_semantic(load_mask(FASSEG / "train" / "labels" / p.name, labelset),
                                             list(THINGS.values()), min_area=20) for p in images}
    feats = work / "fasseg.h5"
    extract_features(RUN, images, feats, device="cpu")
    return dict(name="fasseg", feats=feats, train=[p.stem for p in images[:n_train]],
                test=[p.stem for p in images[n_train:]], truth=truth, masks=FASSEG / "train" / "labels",
                classes=str(FASSEG / "classes.csv"), things=list(THINGS.values()),
                categories={v: k for k, v in THINGS.items()}, min_area=20)


def run_dataset(d: dict, args: argparse.Namespace, out: Results) -> None:
    with FeatureCache(d["feats"]) as cache:
        keys, size = tuple(cache.record.extract.keys), cache.image_size
        maps = {i: cache.block_maps(i) for i in d["train"] + d["test"]}
        pres = {i: Preprocess.from_dict(cache.preprocess(i)) for i in maps}
    n_classes = max(d["categories"]) + 1
    truth = {i: d["truth"][i] for i in d["test"]}
    spec = get_head("diffinst")
    scores: dict[str, list] = {}
    for seed in range(args.seeds):
        for variant, diffusion in (("diffinst", True), ("control", False)):
            if variant not in args.variants:
                continue
            cfg = spec.make_config({"iterations": args.iterations, "diffusion": diffusion, "width": args.width,
                                    "proposals": args.proposals, "stages": args.stages})
            r = cfg.working_resolution(size)
            est = spec.build(cfg, n_classes=n_classes, ignore_index=255, random_state=seed, device="cpu", progress=False)
            t0 = time.perf_counter()
            est.fit(ImageMaps([maps[i] for i in d["train"]], keys, size),
                    [d["truth"][i].to_grid(pres[i], r) for i in d["train"]])
            fit_s = time.perf_counter() - t0
            n_params = sum(p.numel() for p in est.module_.parameters())
            for steps in ((1, 4) if diffusion else (1,)):
                t0 = time.perf_counter()
                pred = {i: est.predict_instances(maps[i], keys, size, steps=steps).to_original(pres[i]) for i in d["test"]}
                pred_s = (time.perf_counter() - t0) / len(d["test"])
                res = mask_ap(truth, pred, d["categories"])
                name = f"{variant} {steps} step{'s' if steps > 1 else ''}" if diffusion else "control (learned proposals, 1 step)"
                scores.setdefault(name, []).append(res)
                out.row("instances", dataset=d["name"], variant=name, seed=seed, ap=res["ap"], ap50=res["ap50"],
                        ap75=res["ap75"], per_class=res["per_class"], fit_seconds=round(fit_s, 1),
                        predict_s_per_image=round(pred_s, 4), parameters=n_params, iterations=args.iterations,
                        proposals=args.proposals, stages=args.stages, width=args.width, resolution=r,
                        final_loss=round(est.final_loss_, 3))
        if "components" not in args.variants:
            continue
        with tempfile.TemporaryDirectory() as tmp:  # the baseline: the MLP ensemble's class map, components
            t0 = time.perf_counter()
            f = fit_model(d["feats"], d["masks"], Path(tmp) / "m", classes=d["classes"], seed=seed, device="cpu",
                          labels=len(d["train"]))
            fit_s = time.perf_counter() - t0
            model = SegmentationModel.load(Path(tmp) / "m")
            assert list(f.image_ids) == d["train"], f.image_ids
            t0 = time.perf_counter()
            pred = {}
            from ddpmseg.data import restore_labels, restore_map

            for i in d["test"]:
                seg = model.classifier.predict_block_maps(maps[i], keys, size)
                lab = restore_labels(seg.labels, pres[i], fill=255)
                pred[i] = components(lab, restore_map(seg.proba, pres[i]), d["things"], d["min_area"])
            pred_s = (time.perf_counter() - t0) / len(d["test"])
        res = mask_ap(truth, pred, d["categories"])
        name = "components of the MLP ensemble's class map"
        scores.setdefault(name, []).append(res)
        out.row("instances", dataset=d["name"], variant=name, seed=seed, ap=res["ap"], ap50=res["ap50"], ap75=res["ap75"],
                per_class=res["per_class"], fit_seconds=round(fit_s, 1), predict_s_per_image=round(pred_s, 4))
    for name, rs in scores.items():
        ap, ap50 = [100 * r["ap"] for r in rs], [100 * r["ap50"] for r in rs]
        rows = [r for r in out.rows if r["benchmark"] == "instances" and r["dataset"] == d["name"] and r["variant"] == name]
        out.row("instances_summary", dataset=d["name"], variant=name, seeds=len(rs), train=len(d["train"]),
                test=len(d["test"]), ap_mean=round(statistics.mean(ap), 1),
                ap_std=round(statistics.stdev(ap), 1) if len(ap) > 1 else 0.0, ap50_mean=round(statistics.mean(ap50), 1),
                ap50_std=round(statistics.stdev(ap50), 1) if len(ap50) > 1 else 0.0,
                fit_seconds_mean=round(statistics.mean(r["fit_seconds"] for r in rows), 1),
                predict_s_per_image_mean=round(statistics.mean(r["predict_s_per_image"] for r in rows), 4),
                parameters=rows[0].get("parameters"), iterations=rows[0].get("iterations"),
                timings="contaminated" if args.contaminated else "alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--proposals", type=int, default=32)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--datasets", default="synthetic,fasseg")
    ap.add_argument("--train", type=int, default=0, help="training images (0: 20 synthetic, 10 FASSEG)")
    ap.add_argument("--test", type=int, default=0, help="test images (0: 20 synthetic, 10 FASSEG)")
    ap.add_argument("--contaminated", action="store_true", help="mark the timings as measured beside other load")
    ap.add_argument("--variants", default="diffinst,control,components",
                    help="which to run, comma-separated: diffinst (1 and 4 steps), control, components")
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - {"diffinst", "control", "components"})
    if unknown or not args.variants:
        ap.error(f"--variants: unknown {unknown}; choose from diffinst, control, components")
    torch.set_num_threads(1)
    with Results("instances", args) as out, tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            make = synthetic if name == "synthetic" else fasseg
            default = (20, 20) if name == "synthetic" else (10, 10)
            run_dataset(make(Path(tmp), args.train or default[0], args.test or default[1]), args, out)


if __name__ == "__main__":
    main()
