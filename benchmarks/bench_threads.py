"""What OpenMP's wait policy costs on an idle machine and gains on a loaded one (extract and fit).

    python benchmarks/bench_threads.py [--images 8] [--fraction 0.02]

torch's OpenMP threads spin while they wait for work. Alone on the machine
that is harmless; beside another busy process the spinning threads of both
take the cores from each other. The CLI sets ``OMP_WAIT_POLICY=PASSIVE``
unless the user set a policy; this measures that choice. Each workload runs
in a fresh child process (the policy is read when torch starts) with the
policy unset (OpenMP's default), PASSIVE, or libgomp's spin count set
(``spinN``: GOMP_SPINCOUNT=N, spin that long before sleeping), on an idle
machine and beside a competing process that runs small torch matmuls on
every core with the default policy (another user's training job, say) or,
with ``--same-policy-competitor``, with the measured policy (two ddpmseg jobs). Workloads, from the demo's
tiny ADM (64 px) on eyes8:

extract        ``extract_features`` of ``--images`` images: seconds per image
fit            ``fit_model``, reference recipe, 10 members, one epoch over
               ``--fraction`` of the labelled pixels: member steps per second
extract_ffhq   one 256x256 image through the full ffhq_256 architecture (random
               weights, after a warm-up image): seconds per image
fit_ffhq       the paper's classifier on its feature shapes (8448 dims, 34 classes, random
               native maps of 2 images, 2048 labelled pixels, one epoch): member steps per second

Each workload runs ``--repeat`` times in its child (the ffhq ones at most twice) and reports the median.

Prints one JSON object per run and a summary with the PASSIVE / default
ratios (a ratio > 1 is a gain), idle and loaded. Everything printed is saved
in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import EYES8, Results

CHILD = textwrap.dedent("""
    import json, statistics, sys, time
    from pathlib import Path
    import torch
    from ddpmseg.pipeline import extract_features, fit_model
    work, workload, n, fraction, repeat = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[6])
    images = sorted(Path(sys.argv[5]).glob("image_*.jpg"))[:n]
    ckpt, flags = work / "tiny_adm.pt", work / "tiny_adm.json"

    def extract():
        out = work / f"feats_{time.time_ns()}.h5"
        t0 = time.perf_counter()
        s = extract_features(ckpt, images, out, model_flags=flags, device="cpu")
        out.unlink()
        return (time.perf_counter() - t0) / s.new

    def fit():
        s = fit_model(work / "feats.h5", Path(sys.argv[5]), work / f"model_{time.time_ns()}", device="cpu", head="mlp",
                      options={"recipe": "reference", "n_members": 10, "max_epochs": 1, "pixel_fraction": fraction})
        return sum(s.n_iter) / s.seconds

    def fit_ffhq():
        sys.path.insert(0, sys.argv[7])
        import numpy as np
        from bench_fit import KEYS, SIZE, _budget_labels, _labels, _maps
        from ddpmseg.heads.mlp import PixelEnsemble
        from ddpmseg.features.pixels import CachePixels
        source = CachePixels(_maps(2), KEYS, SIZE)
        y = _budget_labels(_labels(source, 2), 2048)
        t0 = time.perf_counter()
        est = PixelEnsemble(n_classes=34, max_epochs=1, random_state=0, recipe="reference").fit(source, y)
        return sum(est.n_iter_) / (time.perf_counter() - t0)

    def extract_ffhq():
        sys.path.insert(0, sys.argv[7])
        from bench_extract import build_backbone
        from ddpmseg.features.extractor import extract_block_maps, make_noise
        backbone, x0, noise = build_backbone("ffhq_256"), torch.rand(1, 3, 256, 256) * 2 - 1, make_noise(0, 256)
        extract_block_maps(backbone, x0, noise, (50, 150, 250), (5, 6, 7, 8, 12))  # warm-up
        t0 = time.perf_counter()
        extract_block_maps(backbone, x0, noise, (50, 150, 250), (5, 6, 7, 8, 12))
        return time.perf_counter() - t0

    key = {"extract": "seconds_per_image", "fit": "member_steps_per_s", "extract_ffhq": "seconds_per_image",
           "fit_ffhq": "member_steps_per_s"}[workload]
    runs = [globals()[workload]() for _ in range(min(repeat, 2) if workload.endswith("ffhq") else repeat)]
    print(json.dumps({"threads": torch.get_num_threads(), key: statistics.median(runs), "runs": len(runs)}))
""")

COMPETITOR = textwrap.dedent("""
    import torch
    a = torch.randn(192, 192)
    while True:  # many short parallel regions: the threads wait (spin) between them
        for _ in range(100):
            a = torch.tanh(a @ a * 0.01)
""")


def policy_env(policy: str) -> dict[str, str]:
    """The environment of a policy: ``default`` (nothing set), ``PASSIVE`` / ``ACTIVE``
    (OMP_WAIT_POLICY), or ``spinN`` (libgomp's GOMP_SPINCOUNT=N: spin that long, then sleep)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin"):
        env["GOMP_SPINCOUNT"] = policy[4:]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return env


def run(work: Path, workload: str, policy: str, args: argparse.Namespace) -> dict:
    env = policy_env(policy)
    cmd = [sys.executable, "-c", CHILD, str(work), workload, str(args.images), str(args.fraction), str(EYES8),
           str(args.repeat), str(Path(__file__).resolve().parent)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images extracted per extract run")
    ap.add_argument("--fraction", type=float, default=0.05, help="pixel fraction of the one fit epoch")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each small workload (median reported)")
    ap.add_argument("--workloads", default="extract,fit,extract_ffhq,fit_ffhq",
                    help="subset of extract,fit,extract_ffhq,fit_ffhq")
    ap.add_argument("--policies", default="default,PASSIVE",
                    help="comma-separated: default, PASSIVE, ACTIVE, spinN (the first is the baseline)")
    ap.add_argument("--same-policy-competitor", action="store_true",
                    help="also load the machine with a competitor that uses the measured policy (two ddpmseg jobs)")
    args = ap.parse_args()
    from ddpmseg.demo import make_tiny_checkpoint
    from ddpmseg.pipeline import extract_features

    with Results("threads", args) as log, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, flags = make_tiny_checkpoint(work)
        extract_features(ckpt, sorted(EYES8.glob("image_*.jpg")), work / "feats.h5", model_flags=flags, device="cpu")
        results: dict[tuple[str, str, str], dict] = {}
        loads = ["idle", "loaded"] + (["loaded_same"] if args.same_policy_competitor else [])
        for load in loads:
            for workload in args.workloads.split(","):
                for policy in args.policies.split(","):
                    competitor = None
                    if load != "idle":  # another job: OpenMP's default policy, or (loaded_same) this run's
                        env = policy_env(policy if load == "loaded_same" else "default")
                        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
                        time.sleep(3)  # let it start and spin
                    try:
                        r = run(work, workload, policy, args)
                    finally:
                        if competitor is not None:
                            competitor.kill()
                            competitor.wait()
                    results[(workload, load, policy)] = r
                    log.row("threads", workload=workload, machine=load, wait_policy=policy,
                            **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        keys = {"extract": ("seconds_per_image", False), "fit": ("member_steps_per_s", True),
                "extract_ffhq": ("seconds_per_image", False), "fit_ffhq": ("member_steps_per_s", True)}
        base = args.policies.split(",")[0]
        for workload in args.workloads.split(","):
            key, higher_is_better = keys[workload]
            for load in loads:
                d = results[(workload, load, base)][key]
                for policy in args.policies.split(",")[1:]:
                    p = results[(workload, load, policy)][key]
                    log.row("threads_summary", workload=workload, machine=load, metric=key, baseline=base,
                            policy=policy, baseline_value=round(d, 3), policy_value=round(p, 3),
                            speedup=round(p / d if higher_is_better else d / p, 2))

if __name__ == "__main__":
    main()
