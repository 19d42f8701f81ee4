"""Anomaly maps: the metrics on hand-made cases, the reverse process against guided-diffusion's own
sampling loop, and train-ddpm -> anomaly -> evaluate-anomaly on a made-up data set (AUROC above chance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, ok
from ddpmseg.anomaly import metrics
from ddpmseg.anomaly.detect import image_score
from ddpmseg.anomaly.heal import Healer, respaced_steps
from ddpmseg.anomaly.synthetic import make_anomaly_dataset
from ddpmseg.backbones import AdmConfig, create_backbone
from ddpmseg.backbones.adm import build_diffusion, random_unet
from ddpmseg.errors import DdpmsegError

pytestmark = pytest.mark.usefixtures("one_thread")
# 32 px, two levels (32, 16), no attention (it would be at 4 px): trains on the CPU in well under a minute
FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
             num_head_channels=32, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)


# -- metrics -----------------------------------------------------------------------------------
def test_pixel_auroc_and_best_dice_on_a_hand_made_case():
    maps = [np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([[0.3, 0.05], [0.0, 0.6]])]
    masks = [np.array([[1, 0], [1, 0]], bool), np.array([[0, 0], [0, 1]], bool)]
    # positives 0.9, 0.8, 0.6; negatives 0.1, 0.2, 0.3, 0.05, 0.0: every positive above every negative
    assert metrics.pixel_auroc(maps, masks) == 1.0
    dice, threshold = metrics.best_dice(maps, masks)
    assert dice == 1.0 and 0.3 < threshold <= 0.6
    flipped = [1 - m for m in maps]
    assert metrics.pixel_auroc(flipped, masks) == 0.0


def test_aupro_perfect_random_and_region_weighting():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:25] = True  # a big region (400 px)
    mask[30:32, 30:32] = True  # a small one (4 px)
    perfect = mask.astype(float) + 0.01 * rng.random(mask.shape)
    assert metrics.aupro([perfect], [mask]) > 0.99
    many = np.zeros((200, 200), bool)
    for i in range(10):
        for j in range(10):
            many[20 * i + 5 : 20 * i + 12, 20 * j + 5 : 20 * j + 12] = True
    # random: a region's expected overlap equals the FPR, so the normalised area to 0.3 is 0.15
    assert abs(metrics.aupro([rng.random((200, 200))], [many]) - 0.15) < 0.015
    # only the big region found: per-region overlap averages regions (0.5), pixel AUROC barely notices
    big_only = np.where(mask & (np.arange(40)[:, None] < 28), 1.0, 0.0) + 0.01 * rng.random(mask.shape)
    assert 0.45 < metrics.aupro([big_only], [mask]) < 0.6
    assert metrics.pixel_auroc([big_only], [mask]) > 0.98


def test_image_auroc_and_score():
    assert image_score(np.arange(100.0).reshape(10, 10), 0.01) == 99.0  # the top 1 % of 100 pixels: one
    assert image_score(np.arange(1000.0), 0.01) == np.mean(np.arange(990, 1000))
    assert image_score(np.arange(1000.0)) == np.mean(np.arange(800, 1000))  # heal's default: the top 20 %
    assert metrics.image_auroc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert metrics.image_auroc([0.1, 0.2], [True, True]) is None


# -- the reverse process ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    d = tmp_path_factory.mktemp("adm")
    torch.save(random_unet(AdmConfig.from_flags(FLAGS), seed=0).state_dict(), d / "m.pt")
    (d / "flags.json").write_text(json.dumps(FLAGS))
    return create_backbone(d / "m.pt", flags=d / "flags.json", device="cpu")


def test_respaced_steps():
    assert respaced_steps(100, 5) == [0, 25, 50, 75, 100]
    assert respaced_steps(3, 50) == [0, 1, 2, 3]
    assert respaced_steps(250, 1) == [250]
    with pytest.raises(DdpmsegError):
        respaced_steps(10, 0)


def test_ddim_healing_equals_guided_diffusions_own_ddim_loop(random_backbone):
    """Starting at the last step of a 'ddimN' respacing, the healer's DDIM equals guided-diffusion's
    ddim_sample_loop over that respacing (its own loop, its own timestep map)."""
    b = random_backbone
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    spaced = build_diffusion(b.config, respacing="10")  # 10 steps evenly over 0..999: 0, 111, ..., 999
    start = int(spaced.timestep_map[-1])
    x_t = b.q_sample(x0, torch.full((2,), start), noise)
    with torch.no_grad():
        expect = spaced.ddim_sample_loop(b.model, x_t.shape, noise=x_t, clip_denoised=True, device=torch.device("cpu"))
    healer = Healer(b, sample_steps=len(spaced.timestep_map))
    assert sorted(healer.timesteps(start)) == [int(t) for t in spaced.timestep_map]
    torch.testing.assert_close(healer.heal(x0, start, noise), expect.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_ancestral_healing_is_seeded_and_bad_starts_are_refused(random_backbone):
    x0 = torch.zeros(1, 3, 32, 32)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = Healer(random_backbone, ancestral=True, seed=3).heal(x0, 5, noise)
    b = Healer(random_backbone, ancestral=True, seed=3).heal(x0, 5, noise)
    c = Healer(random_backbone, ancestral=True, seed=4).heal(x0, 5, noise)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert Healer(random_backbone, ancestral=True).timesteps(5) == [5, 4, 3, 2, 1, 0]
    with pytest.raises(DdpmsegError, match=r"--start-steps 1000 out of range: .* steps 1\.\.999"):
        Healer(random_backbone).heal(x0, 1000, noise)


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return make_anomaly_dataset(tmp_path_factory.mktemp("textures"), n_train=48, n_good=6, n_defect=3, size=32, seed=0)


@pytest.fixture(scope="module")
def normal_ddpm(tmp_path_factory, textures) -> Path:
    """A tiny DDPM of the normal textures, trained by `ddpmseg train-ddpm` for a short CPU budget."""
    d = tmp_path_factory.mktemp("normal")
    (d / "flags.json").write_text(json.dumps(FLAGS))
    ok("train-ddpm", textures / "train", "--out", d / "run", "--model-flags", d / "flags.json", "--steps", 300,
       "--batch-size", 8, "--lr", 1e-3, "--save-every", 300, "--sample-every", 0, "--log-every", 50, "--device", "cpu")
    return d / "run"


def test_train_ddpm_then_anomaly_then_evaluate_anomaly(normal_ddpm, textures, tmp_path):
    out = tmp_path / "maps"
    said = ok("anomaly", textures / "test", "--ckpt", normal_ddpm, "--out", out, "--method", "heal", "--start-steps", "100,250",
              "--sample-steps", 10, "--save-maps", "--device", "cpu")
    assert "anomaly: 15 images" in said
    names = sorted(p.stem for p in (textures / "test").glob("*.png"))
    for n in names:
        for kind in ("anomaly.png", "healed.png", "anomaly.npy"):
            assert (out / f"{n}_{kind}").is_file(), (n, kind)
    m = np.load(out / "blob_000_anomaly.npy")
    assert m.shape == (32, 32) and m.dtype == np.float32
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "image,score" and len(rows) == 1 + len(names)
    # an image's score is the mean of its map's top TOP_FRACTION: that many of the 32 x 32 values, by hand
    from ddpmseg.anomaly.config import TOP_FRACTION

    k = round(TOP_FRACTION * 32 * 32)
    score = dict(r.split(",") for r in rows[1:])["blob_000"]
    assert float(score) == pytest.approx(float(np.sort(m.ravel().astype(np.float64))[-k:].mean()), rel=1e-5)
    result = json.loads(ok("evaluate-anomaly", "--maps", out, "--masks", textures / "masks", "--json"))
    assert result["n_images"] == 15 and result["n_anomalous"] == 9
    assert result["pixel_auroc"] > 0.75, result  # chance is 0.5
    assert result["aupro_30"] > 0.2 and result["best_dice"] > 0.2, result
    table = ok("evaluate-anomaly", "--maps", out, "--masks", textures / "masks")
    assert "pixel AUROC" in table and "AUPRO" in table
    # outputs are not replaced without --overwrite, and a missing mask is named
    fails("anomaly", textures / "test", "--ckpt", normal_ddpm, "--out", out, "--method", "heal", match="would replace")
    (textures / "masks" / "good_000.png").rename(tmp_path / "moved.png")
    try:
        fails("evaluate-anomaly", "--maps", out, "--masks", textures / "masks", match=("1 of 15 maps have no mask", "good_000"))
    finally:
        (tmp_path / "moved.png").rename(textures / "masks" / "good_000.png")


def test_anomaly_bad_inputs(normal_ddpm, textures, tmp_path):
    img = textures / "test" / "good_000.png"
    heal = ("--method", "heal")
    fails("anomaly", img, "--ckpt", normal_ddpm, "--out", tmp_path / "a", *heal, "--start-steps", "100,100",
          match="duplicated start step")
    fails("anomaly", img, "--ckpt", normal_ddpm, "--out", tmp_path / "a", *heal, "--start-steps", "5000",
          match="--start-steps 5000 out of range")
    # knn is the default: a heal command line of before is refused, not run as knn with its options ignored
    fails("anomaly", img, "--ckpt", normal_ddpm, "--out", tmp_path / "a", "--start-steps", "100", "--smooth", 1,
          match="--start-steps, --smooth are --method heal's, not knn's; add --method heal (the default method is knn)")
    fails("anomaly", img, "--ckpt", normal_ddpm, "--out", tmp_path / "a", *heal, "--coreset", 0.5,
          match="--coreset is --method knn's, not heal's; add --method knn")
    assert not (tmp_path / "a").exists()
    bad = tmp_path / "masks"
    bad.mkdir()
    maps = tmp_path / "maps"
    ok("anomaly", img, "--ckpt", normal_ddpm, "--out", maps, *heal, "--start-steps", "50", "--sample-steps", 2, "--save-maps")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad / "good_000.png")
    fails("evaluate-anomaly", "--maps", maps, "--masks", bad, match="is 10x10 (WxH) but its map is 32x32")
    fails("evaluate-anomaly", "--maps", tmp_path, "--masks", bad, match="no *_anomaly.npy in")


# -- knn: distances to normal patches of the DDPM features -----------------------------------------
def test_greedy_coreset_equals_a_plain_farthest_point_loop():
    from ddpmseg.anomaly.knn import greedy_coreset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)  # 6 dims: no random projection (the JL size is larger)
    chosen, dist = greedy_coreset(torch.from_numpy(x), 20, seed=3)
    picked = [int(chosen[0])]  # the same random start; then, by hand, the point farthest from all picked
    for _ in range(19):
        d = np.min([np.linalg.norm(x - x[i], axis=1) for i in picked], axis=0)
        picked.append(int(np.argmax(d)))
    assert chosen.tolist() == picked
    final = np.min([np.linalg.norm(x - x[i], axis=1) for i in picked], axis=0)
    assert np.allclose(dist.numpy(), final, atol=5e-3)  # the expansion |x|^2 - 2xc + |c|^2 loses ~1e-6 near 0


def test_bank_keeps_every_patch_greedy_below_one_and_a_seeded_sample_beyond_its_size():
    from ddpmseg.anomaly.knn import KnnSettings, build_bank, greedy_coreset

    rng = np.random.default_rng(2)
    feats = [torch.from_numpy(rng.normal(size=(64, 8)).astype(np.float32)) for _ in range(4)]  # 4 images, 256 patches
    x = torch.cat(feats)
    every = build_bank(feats, [4, 4], KnnSettings((50,), (1,), 0, 8, scale=False), "k")
    assert torch.equal(every.vectors, x)  # the default: all patches, in order
    greedy = build_bank(feats, [4, 4], KnnSettings((50,), (1,), 0, 8, coreset=0.1, scale=False), "k")
    assert torch.equal(greedy.vectors, x[greedy_coreset(x, 26, 0)[0]])  # round(0.1 * 256) by greedy k-centre
    cap = 100 * 8 * 4 / 2**20  # MiB of 100 vectors of 8 float32
    capped = [build_bank(feats, [4, 4], KnnSettings((50,), (1,), seed, 8, scale=False, max_mb=cap), "k")
              for seed in (0, 0, 1)]
    assert len(capped[0].vectors) == 100 and torch.equal(capped[0].vectors, capped[1].vectors)
    assert not torch.equal(capped[0].vectors, capped[2].vectors)  # a random sample, seeded
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in capped[0].vectors.tolist()) and len({tuple(r) for r in capped[0].vectors.tolist()}) == 100
    assert KnnSettings((50,), (1,), 0, 8, coreset=0.5, max_mb=cap).bank_size(256, 8) == 100  # greedy, capped too


def test_nearest_distance_and_patch_features_against_plain_computations(random_backbone):
    from scipy.ndimage import uniform_filter
    from scipy.spatial.distance import cdist

    from ddpmseg.anomaly.knn import KnnSettings, block_widths, nearest_distance, patch_features
    from ddpmseg.features.extractor import extract_block_maps

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 7)), rng.normal(size=(5000, 7))  # the bank in two chunks
    got = nearest_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float(), chunk=4096)
    assert np.allclose(got.numpy(), cdist(a, b).min(1), atol=1e-4)

    x0 = torch.rand(1, 3, 32, 32) * 2 - 1
    noise = torch.randn(1, 3, 32, 32)
    blocks = tuple(random_backbone.default_blocks())
    settings = KnnSettings((50, 150), blocks, 0, grid=16)
    feats = patch_features(random_backbone, x0, noise, settings)
    widths = block_widths(random_backbone, settings)
    assert feats.shape == (16 * 16, sum(widths))
    maps = extract_block_maps(random_backbone, x0, noise, (50, 150), blocks)
    lo = 0
    for (t, blk), w in zip([(t, b) for t in (50, 150) for b in blocks], widths):
        m = maps[(t, blk)].numpy()
        if m.shape[-1] == 16:  # at the grid's resolution: the 3x3 mean with zeros beyond the border, unresized
            want = uniform_filter(m.astype(np.float64), size=(1, 3, 3), mode="constant", cval=0.0)
            assert np.allclose(feats[:, lo : lo + w].T.reshape(w, 16, 16).numpy(), want, atol=1e-4)
        lo += w
    assert lo == feats.shape[1]


def test_anomaly_knn_end_to_end(normal_ddpm, textures, tmp_path):
    """The bank from the run's own training images (train.json), kept and reused, one scale, the same
    outputs as heal but the healed picture; a changed training image is a one-line error."""
    from ddpmseg.anomaly.knn import BANK_FILE

    out = tmp_path / "knn"
    said = ok("anomaly", textures / "test", "--ckpt", normal_ddpm, "--out", out, "--method", "knn", "--save-maps",
              "--device", "cpu")
    assert "anomaly: 15 images" in said and "colour scale 0.." in said
    assert "knn bank: 12,288 patches of 48 normal images" in said  # every patch: 48 images x 16 x 16
    listed = json.loads((normal_ddpm / "train.json").read_text())["images"]
    assert len(listed) == 48 and all(Path(e["path"]).is_absolute() and len(e["sha256"]) == 64 for e in listed)
    assert (out / BANK_FILE).is_file() and not list(out.glob("*_healed.png"))
    result = json.loads(ok("evaluate-anomaly", "--maps", out, "--masks", textures / "masks", "--json"))
    assert result["pixel_auroc"] > 0.75 and result["image_auroc"] > 0.75, result  # chance is 0.5
    # the image score is the largest patch distance (scores.csv), and evaluate-anomaly scores images by it
    rows = dict(r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:])
    assert len(rows) == 15 and all(float(v) > 0 for v in rows.values())
    # per-image truth instead of masks (data such as ELPV has no masks): the same image AUROC, by hand too
    truth = {n: int(np.asarray(Image.open(textures / "masks" / f"{n}.png")).any()) for n in rows}
    (tmp_path / "labels.csv").write_text("image,anomalous\n" + "".join(f"{n},{v}\n" for n, v in truth.items()))
    by_labels = json.loads(ok("evaluate-anomaly", "--maps", out, "--labels", tmp_path / "labels.csv", "--json"))
    pos = [float(rows[n]) for n in rows if truth[n]]
    neg = [float(rows[n]) for n in rows if not truth[n]]
    pairs = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])  # AUROC = P(score of + > score of -)
    assert by_labels["image_auroc"] == pytest.approx(result["image_auroc"]) == pytest.approx(pairs)
    assert by_labels["pixel_auroc"] is None and "n/a" not in ok("evaluate-anomaly", "--maps", out, "--labels",
                                                               tmp_path / "labels.csv")
    (tmp_path / "short.csv").write_text("image,anomalous\ngood_000,0\n")
    fails("evaluate-anomaly", "--maps", out, "--labels", tmp_path / "short.csv", match="has no row for 14 scored images")
    fails("evaluate-anomaly", "--maps", out, match="give --masks DIR")
    stamp = (out / BANK_FILE).stat().st_mtime_ns
    ok("anomaly", textures / "test" / "good_000.png", "--ckpt", normal_ddpm, "--out", out, "--method", "knn",
       "--overwrite", "--device", "cpu")
    assert (out / BANK_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert float(dict(r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:])["good_000"]) == \
        pytest.approx(float(rows["good_000"]), rel=1e-5)
    ok("anomaly", textures / "test" / "good_000.png", "--ckpt", normal_ddpm, "--out", out, "--method", "knn",
       "--overwrite", "--coreset", 0.5, "--device", "cpu")
    assert (out / BANK_FILE).stat().st_mtime_ns != stamp  # other settings: another bank
    first = Path(listed[0]["path"])
    kept = first.read_bytes()
    try:
        first.write_bytes(kept + b"\0")
        fails("anomaly", textures / "test" / "good_000.png", "--ckpt", normal_ddpm, "--out", tmp_path / "k2",
              "--method", "knn", match=(str(first), "has changed since training", "--normal"))
    finally:
        first.write_bytes(kept)


def test_anomaly_knn_bad_inputs(random_backbone, textures, tmp_path):
    (tmp_path / "w").mkdir()
    ckpt = tmp_path / "w" / "random.pt"  # no flags.json beside it: not a run folder
    torch.save(random_backbone.model.state_dict(), ckpt)
    img = textures / "test" / "good_000.png"
    fails("anomaly", img, "--ckpt", ckpt, "--model-flags", _flags_file(tmp_path), "--out", tmp_path / "a",
          "--method", "knn", match=("is not a train-ddpm run folder", "--normal DIR"))
    fails("anomaly", img, "--ckpt", ckpt, "--model-flags", _flags_file(tmp_path), "--out", tmp_path / "a",
          "--method", "knn", "--normal", textures / "train", "--grid", 99, match="--grid 99")
    said = ok("anomaly", img, "--ckpt", ckpt, "--model-flags", _flags_file(tmp_path), "--out", tmp_path / "b",
              "--method", "knn", "--normal", textures / "train", "--grid", 8, "--device", "cpu")
    assert "anomaly: 1 image" in said
    # a small image's picture is enlarged so the map is legible beside its colour bar
    assert Image.open(tmp_path / "b" / "good_000_anomaly.png").height >= 256


def _flags_file(tmp_path: Path) -> Path:
    f = tmp_path / "flags.json"
    f.write_text(json.dumps(FLAGS))
    return f
