"""Issue 23 items 4, 5 and 7 (what a new user hit, part 2): run folders and model folders (--ckpt
RUN/FILE, --ckpt RUN/ --step N, predict --model RUN/, fit --out RUN/, a mistyped --ckpt), train-ddpm's
--keep-last and ETA, and the small surprises (examples in every --help, kmeans --out, evaluate
--overwrite, masks in the image folder, blocks marking auto, extract's summary, suggest.csv)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.backbones import create_backbone, runs
from ddpmseg.cli.main import main
from cli_helpers import fails, ok

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(eyes8: Path, out: Path, flags: Path, *extra) -> str:
    """train-ddpm of the tiny 16 px ADM (``flags``: conftest's tiny16_json)."""
    return ok("train-ddpm", eyes8, "--out", out, "--model-flags", flags, "--batch-size", 2, "--sample-every", 0,
              "--log-every", 1, "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory, eyes8, tiny16_json) -> Path:
    """A train-ddpm run folder with steps 2 and 4 saved."""
    out = tmp_path_factory.mktemp("run") / "run"
    _train(eyes8, out, tiny16_json, "--steps", 4, "--save-every", 2)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------- item 4


def test_ckpt_an_earlier_steps_file_of_a_run_reads_the_runs_flags(run, eyes8, tmp_path):
    early = run / "ema_0.9999_000002.pt"
    backbone = create_backbone(early, device="cpu")  # was: "matches no preset ... pass --image-size"
    assert backbone.checkpoint.name == early.name
    assert all(torch.equal(v, _state(early)[k]) for k, v in backbone.model.state_dict().items())
    assert len(ok("blocks", "--ckpt", early).splitlines()) == 1 + 4


def test_ckpt_run_folder_with_step_picks_that_steps_ema(run, eyes8, tmp_path, tiny16_json):
    from ddpmseg.features.cache import FeatureCache

    said = ok("extract", eyes8 / "image_0.jpg", "--ckpt", run, "--step", 2, "--out", tmp_path / "f.h5")
    assert f"checkpoint {run / 'ema_0.9999_000002.pt'} (step 2 of the train-ddpm run {run})" in said
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert cache.record.checkpoint.name == "ema_0.9999_000002.pt"
    said = ok("extract", eyes8 / "image_0.jpg", "--ckpt", run, "--out", tmp_path / "g.h5")  # the newest: step 4
    assert "(step 4 of the train-ddpm run" in said
    assert runs.checkpoint_at(run) == run / "ema_0.9999_000004.pt" == runs.checkpoint_at(run, 4)
    fails("blocks", "--ckpt", run, "--step", 3, match=("--step 3", "ema_*_000003.pt", "steps 2, 4"))
    fails("blocks", "--ckpt", run / "ema_0.9999_000002.pt", "--step", 2, match=f"pass --ckpt {run}/ --step 2")
    torch.save(_state(run / "ema_0.9999_000002.pt"), tmp_path / "plain.pt")
    fails("blocks", "--ckpt", tmp_path / "plain.pt", "--model-flags", tiny16_json, "--step", 2,
          match=("not one; leave out --step",))
    for name in ("blocks", "extract", "kmeans", "anomaly"):  # where --ckpt is taken, --step is explained
        text = CliRunner().invoke(main, [name, "--help"]).output
        assert "--step" in text and "RUN/ema_0.9999_00NNNN.pt" in " ".join(text.split())


def test_convert_takes_a_run_folder_or_a_file_of_a_run(run, tmp_path):
    pytest.importorskip("diffusers")
    said = ok("convert", run / "ema_0.9999_000002.pt", "--out", tmp_path / "early")  # was: "matches no preset"
    assert "max relative output error" in said
    ok("convert", run, "--out", tmp_path / "newest")


def test_describe_folder_names_run_cache_and_model_folders(run, eyes_world, tmp_path):
    from ddpmseg.features.cache import FOLDER_MARKER

    d, _ = eyes_world
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / FOLDER_MARKER).write_text("{}")
    assert runs.describe_folder(run) == "a train-ddpm run folder"
    assert runs.describe_folder(cache) == "a feature cache folder"
    assert runs.describe_folder(d / "model") == "a model folder"
    assert runs.describe_folder(tmp_path / "nothing") is None and runs.describe_folder(run / "flags.json") is None


def test_fit_refuses_an_out_that_is_a_run_or_cache_folder(run, eyes_world, tmp_path):
    d, imgs = eyes_world
    before = sorted(p.name for p in run.iterdir())
    for flag in ((), ("--overwrite",)):
        fails("fit", "--features", d / "feats.h5", "--masks", imgs, "--out", run, *flag,
              match=(f"--out {run} is a train-ddpm run folder", "give a new folder"))
    assert sorted(p.name for p in run.iterdir()) == before  # no model.json written into the run
    cache = tmp_path / "cache"
    ok("extract", imgs / "image_0.jpg", "--ckpt", run, "--out", cache)
    fails("fit", "--features", d / "feats.h5", "--masks", imgs, "--out", cache, match="is a feature cache folder")


def test_predict_model_run_folder_says_it_is_a_ddpm(run, eyes8, tmp_path):
    err = fails("predict", eyes8 / "image_0.jpg", "--model", run, "--out", tmp_path / "p",
                match=(f"{run} is a train-ddpm run folder (a DDPM), not a model folder", "ddpmseg fit",
                       "--model MODEL/"))
    assert "rerun" not in err
    cache = tmp_path / "cache"
    ok("extract", eyes8 / "image_0.jpg", "--ckpt", run, "--out", cache)
    fails("evaluate", eyes8 / "image_0.jpg", "--model", cache, "--masks", eyes8,
          match=(f"{cache} is a feature cache folder, not a model folder", f"--features {cache}"))


def test_mistyped_ckpt_says_it_does_not_exist_and_names_the_close_folder(run, tmp_path, monkeypatch):
    monkeypatch.chdir(run.parent)
    err = fails("blocks", "--ckpt", "runn/", match=("checkpoint runn does not exist", "did you mean run",
                                                    "a train-ddpm run folder"))
    assert "download" not in err and "ffhq_256" not in err
    err = fails("blocks", "--ckpt", "ffhq.pt", match=("ffhq.pt does not exist", "ddpmseg download ffhq_256"))
    assert "lsun_cat_256" not in err  # one preset, not the list of all eleven
    err = fails("blocks", "--ckpt", "nowhere/x.pt", match="does not exist")
    assert "download" not in err


# --------------------------------------------------------------------------- item 5


def _step_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.suffix == ".pt")


def test_keep_last_keeps_the_newest_saves_and_resume_continues(eyes8, tmp_path, tiny16_json):
    out = tmp_path / "run"
    _train(eyes8, out, tiny16_json, "--steps", 6, "--save-every", 2, "--keep-last", 1)
    assert _step_files(out) == ["ema_0.9999_000006.pt", "model000006.pt", "opt000006.pt"]
    assert json.loads((out / "train.json").read_text())["keep_last"] == 1
    ok("train-ddpm", eyes8, "--out", out, "--resume", "--steps", 8, "--keep-last", 2, "--device", "cpu")
    assert _step_files(out) == ["ema_0.9999_000006.pt", "ema_0.9999_000008.pt", "model000006.pt", "model000008.pt",
                                "opt000006.pt", "opt000008.pt"]
    # the same weights as a run that kept everything
    ref = tmp_path / "ref"
    _train(eyes8, ref, tiny16_json, "--steps", 8, "--save-every", 2)
    assert len(_step_files(ref)) == 12
    a, b = _state(out / "ema_0.9999_000008.pt"), _state(ref / "ema_0.9999_000008.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fails("train-ddpm", eyes8, "--out", tmp_path / "bad", "--image-size", 32, "--keep-last", -1, match="--keep-last")


def test_prune_deletes_only_after_a_complete_save_and_finishes_a_killed_prune(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "flags.json").write_text("{}")

    def save(step, parts=("model", "ema", "opt")):
        for part in parts:
            name = {"model": f"model{step:06d}.pt", "ema": f"ema_0.9999_{step:06d}.pt", "opt": f"opt{step:06d}.pt"}[part]
            (run / name).write_bytes(b"x")

    save(2), save(4)
    save(6, ("model", "ema"))  # a save killed before its optimizer file: step 6 is not saved
    assert runs.prune(run, 1) == [2]
    assert _step_files(run) == ["ema_0.9999_000004.pt", "ema_0.9999_000006.pt", "model000004.pt", "model000006.pt",
                                "opt000004.pt"]
    save(6)
    (run / "ema_0.9999_000002.pt").write_bytes(b"x")  # what a prune killed after the optimizer file left
    assert runs.prune(run, 1) == [2, 4] and runs.saved_steps(run) == [6]
    assert runs.prune(run, 0) == [] and runs.prune(run, 5) == []
    assert _step_files(run) == ["ema_0.9999_000006.pt", "model000006.pt", "opt000006.pt"]


def test_train_ddpm_bar_shows_the_time_left_once(eyes8, tmp_path, tiny16_json):
    r = CliRunner().invoke(main, ["train-ddpm", str(eyes8), "--out", str(tmp_path / "run"), "--model-flags",
                                  str(tiny16_json), "--steps", 3, "--batch-size", 2, "--sample-every", 0,
                                  "--log-every", 1, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    frames = [f for f in re.split(r"[\r\n]+", r.stderr) if f.startswith("train:")]
    # tqdm's own time left, labelled: "train: 100%|...| 3/3 [00:01, eta=00:00, 2.41step/s, img_s=..., loss=...]"
    assert frames and all(f.count("eta=") == 1 for f in frames), r.stderr
    assert not [f for f in frames if "<" in f], r.stderr  # not also tqdm's default "[elapsed<left, rate]"
    assert re.search(r"\| 3/3 \[\d\d:\d\d, eta=00:00, ", frames[-1]), frames[-1]
    assert "loss=" in frames[-1] and "img_s=" in frames[-1]


def test_train_ddpm_help_states_the_cost():
    text = " ".join(CliRunner().invoke(main, ["train-ddpm", "--help"]).output.split())
    assert "--keep-last" in text and "s/step" in text and "MB per save" in text


# --------------------------------------------------------------------------- item 7


def test_every_help_shows_an_example_command():
    for name, command in main.commands.items():
        text = CliRunner().invoke(main, [name, "--help"]).output
        examples = [line.strip() for line in text.splitlines() if line.strip().startswith(f"ddpmseg {name}")]
        assert "Examples:" in text and examples, (name, text)
        assert all(len(e) < 110 for e in examples), examples  # each its own line, as written


def test_kmeans_out_folder_and_suffixes(tiny_ckpt, eyes8, tmp_path):
    base = ["kmeans", eyes8 / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--k", 2,
            "--steps", 50, "--blocks", 5]
    said = ok(*base, "--out", f"{tmp_path / 'kdir'}/")  # a new folder, named with a trailing slash
    made = tmp_path / "kdir" / "image_0_kmeans.png"
    assert str(made) in said and Image.open(made).format == "PNG"
    ok(*base, "--out", tmp_path / "kdir", "--overwrite")  # an existing folder, without the slash
    fails(*base, "--out", tmp_path / "k.jpg", match=("--out", "k.jpg", "writes a PNG", "k.png", "k.jpg/"))
    fails(*base, "--out", tmp_path / "grid", match=("a name without a suffix", "grid.png", "grid/"))
    assert not (tmp_path / "k.jpg").exists() and not (tmp_path / "grid").exists()


def test_evaluate_out_refuses_to_replace_its_pictures_without_overwrite(eyes_world, eyes8, tmp_path):
    d, _ = eyes_world
    args = ["evaluate", eyes8 / "image_5.jpg", "--model", d / "model", "--masks", eyes8, "--out", tmp_path / "figs"]
    ok(*args)
    before = (tmp_path / "figs" / "confusion.png").stat().st_mtime_ns
    fails(*args, match=("would replace 2 existing files", "reliability.png", "--overwrite"))
    assert (tmp_path / "figs" / "confusion.png").stat().st_mtime_ns == before
    ok(*args, "--overwrite")


def test_no_mask_found_says_what_is_there_and_why_it_did_not_count(tmp_path):
    from ddpmseg.data.masks import no_mask_found

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("001.png", "002.jpg", "003_mask.png", "004.webp"):
        (folder / name).write_bytes(b"x")
    said = no_mask_found([("001", folder / "001.png")], folder)
    assert "looked for ID.npy, ID.png" in said
    assert f"{folder / '001.png'} is there, but it is the image itself" in said and "001.npy" in said
    assert "is no label map" in no_mask_found([("002", tmp_path / "elsewhere" / "002.png")], folder)
    assert "rename it 003.png" in no_mask_found([("003", None)], folder)
    assert "a .webp file is no label map" in no_mask_found([("004", None)], folder)
    assert no_mask_found([("00", None)], folder).endswith("for image_{i}")  # 001.png is not 00's


def test_blocks_marks_the_auto_picks(tiny_ckpt, run):
    def auto(*args) -> list[int]:
        rows = ok("blocks", *args).splitlines()
        assert rows[0].endswith("in --blocks auto")
        return [int(r.split()[0]) for r in rows[1:] if r.endswith("yes")]

    # tiny_ckpt: channel_mult 1,1,2,2,4,4 with 2 res blocks: 6 levels x (2 + 1) = 18 decoder blocks, the
    # paper's decoder, so its depths: int(b * 17 / 17 + 0.5) = b
    assert auto("--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1]) == [5, 6, 7, 8, 12]
    # the 16 px run: channel_mult 1,2 with 1 res block: 2 x (1 + 1) = 4 blocks; int(b * 3 / 17 + 0.5) for
    # b = 5, 6, 7, 8, 12 is int(1.38), int(1.56), int(1.74), int(1.91), int(2.62): 1, 1, 1, 1, 2
    assert auto("--ckpt", run) == [1, 2]


def test_extract_summary_time_precision_and_out_help(tiny_ckpt, eyes8, tmp_path):
    said = ok("extract", eyes8 / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1],
              "--out", tmp_path / "f.h5")
    assert "0.0 s/image" not in said and re.search(r"\((\d+(\.\d+)? (s|ms))/image, ", said), said
    assert "checkpoint" not in said  # no run folder, no step to name
    text = " ".join(CliRunner().invoke(main, ["extract", "--help"]).output.split())
    assert "a .h5 file (e.g. feats.h5), or a folder" in text
    from ddpmseg.cli.main import _seconds

    assert [_seconds(s) for s in (12.34, 0.4219, 0.0347, 0.00081)] == ["12.3 s", "0.42 s", "35 ms", "0.81 ms"]


def test_suggest_csv_has_paths_and_says_the_diversity_scale(eyes_world, eyes8, tmp_path):
    d, _ = eyes_world
    pool = [eyes8 / f"image_{i}.jpg" for i in (4, 5, 6, 7)]
    ok("suggest", "--model", d / "model", *pool, "--out", tmp_path / "d", "--n", 2, "--by", "diversity")
    with open(tmp_path / "d" / "suggest.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["rank", "image", "diversity score (relative 0-1, not nats)", "path"]
    assert all(Path(row[3]) == (eyes8 / f"{row[1]}.jpg").resolve() for row in rows[1:])
    # no pool image trained the model, so the first pick is the most uncertain image, at weight 1 (its score over
    # the pool's highest) with nothing picked to be far from
    ok("suggest", "--model", d / "model", *pool, "--out", tmp_path / "u", "--n", 1)
    with open(tmp_path / "u" / "suggest.csv", newline="") as f:
        most_uncertain = list(csv.reader(f))[1][1]
    assert rows[1][:3] == ["1", most_uncertain, "1"]
    text = " ".join(CliRunner().invoke(main, ["suggest", "--help"]).output.split())
    assert "not nats, so not comparable" in text


def test_diversity_scores_by_hand():
    """suggest.csv's diversity score: the pick's uncertainty over the pool's highest, times its distance to the
    nearest picked (or labelled) image over the largest such distance. Three images on a line at 0, 1, 2."""
    from ddpmseg.active.strategies import rank

    e = np.array([[0.0], [1.0], [2.0]])
    u = {"uncertainty": np.array([0.5, 0.4, 0.25]), "bald": np.zeros(3)}  # weights 1, 0.8, 0.5
    # 1st: the most uncertain, image 0: weight 1. Distances to it 0, 1, 2, over 2: 0, 0.5, 1; times the weights:
    # image 1 0.4, image 2 0.5 -> image 2 at 0.5. Then distances to the nearest pick 0, 1, 0, over 1: image 1 at 0.8
    picks = rank(u, 3, "diversity", e)
    assert [i for i, _ in picks] == [0, 2, 1] and [v for _, v in picks] == pytest.approx([1.0, 0.5, 0.8])
    # image 2 labelled already (an image at 2): distances to it 2, 1, 0, over 2: 1, 0.5, 0; the weights are
    # 0.3 / 0.5 = 0.6, 1, 0.9: image 0 at 0.6 (the most uncertain image, 1, is close to the labelled one). Then
    # distances to the nearest 0, 1, 0, over 1: image 1 at 1 x 1
    u = {"uncertainty": np.array([0.3, 0.5, 0.45]), "bald": np.zeros(3)}
    picks = rank(u, 2, "diversity", e, labelled=np.array([[2.0]]))
    assert [i for i, _ in picks] == [0, 1] and [v for _, v in picks] == pytest.approx([0.6, 1.0])
