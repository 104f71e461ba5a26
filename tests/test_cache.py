"""The decode-once cache: build, manifest and file checks, batched crops/flips/normalisation, and
training from `cache:` (end to end, resume, accuracy against the per-image PIL path)."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import RandomResizedCrop

from finetune.callbacks import Callback
from finetune.config import TrainConfig
from finetune.data import DataError, Preprocessing, build_cache, build_data, build_loaders, check_data_spec, verify_cache
from finetune.data.cache import read_manifest
from finetune.data.gpu_transforms import RATIO, BatchEvalTransform, BatchTrainTransform, sample_crop_boxes
from finetune.train import run_training
from orchestrator.cli import main as cli_main

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = ("ant", "bee", "cat")
SIZES = [(40, 30), (30, 50), (33, 33), (64, 20)]  # (w, h): landscape, portrait, square, extreme


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prep(size=16, augment="timm", crop_pct=0.875, interpolation="bicubic", **kw):
    kw.setdefault("color_jitter", None)
    return Preprocessing((3, size, size), interpolation, crop_pct, "center", MEAN, STD, augment=augment, **kw)


def _png_folder(root, per_class=(4, 2), corrupt=False):
    """train/ and val/ PNG class folders with random images of several shapes."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = SIZES[(i + len(c)) % len(SIZES)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "bee" / "broken.png").write_bytes(b"not a png")
    return root


def _expected_square(path, size):
    """Shorter side to `size` (PIL bicubic, long side truncated like torchvision), centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


@pytest.fixture
def folder_cache(tmp_path):
    src = _png_folder(tmp_path / "src")
    manifest = build_cache(f"imagefolder:{src}", tmp_path / "cache", size=16, num_workers=0)
    return src, tmp_path / "cache", manifest


# ---------------------------------------------------------------------------------------- building
def test_round_trip_of_pixels_and_labels(folder_cache):
    src, cache, manifest = folder_cache
    assert manifest["class_names"] == list(CLASSES)
    assert {s: manifest["splits"][s]["count"] for s in ("train", "val")} == {"train": 12, "val": 6}
    assert read_manifest(cache) == manifest
    bundle = build_data(f"cache:{cache}", prep())
    for split, dataset in (("train", bundle.train), ("val", bundle.val)):
        files = sorted((src / split).glob("*/*.png"))  # torchvision order: sorted classes, sorted files
        assert len(dataset) == len(files)
        for i, path in enumerate(files):
            image, label = dataset[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
            assert label == CLASSES.index(path.parent.name)
            np.testing.assert_array_equal(image.numpy(), _expected_square(path, 16))
    assert bundle.class_names == list(CLASSES) and bundle.num_classes == 3
    assert bundle.train_batch_transform is not None and bundle.eval_batch_transform is not None


def test_parallel_decoding_writes_the_same_cache(folder_cache, tmp_path):
    src, cache, manifest = folder_cache
    parallel = build_cache(f"imagefolder:{src}", tmp_path / "par", size=16, num_workers=2)
    for split in ("train", "val"):
        for key in ("images", "labels"):
            assert parallel["splits"][split][key]["sha256"] == manifest["splits"][split][key]["sha256"]


def test_loader_workers_read_the_same_batches(folder_cache):
    """Worker processes open the memmap themselves (the dataset pickles its path, not its pixels)."""
    _, cache, _ = folder_cache
    bundle = build_data(f"cache:{cache}", prep())
    batches = []
    for workers in (0, 1):
        train, val = build_loaders(bundle, batch_size=4, num_workers=workers, device=torch.device("cpu"), seed=3)
        train.sampler.set_epoch(7)
        batches.append([(x.clone(), y.clone()) for loader in (train, val) for x, y in loader])
    assert len(batches[0]) == 3 + 2
    for (xa, ya), (xb, yb) in zip(*batches):
        assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 16, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert pickle.loads(pickle.dumps(bundle.train))[5][1] == bundle.train[5][1]


def test_npy_files_and_manifest_sizes(folder_cache):
    _, cache, manifest = folder_cache
    images = np.load(cache / "train_images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (12, 3, 16, 16)
    for split in ("train", "val"):
        for key in ("images", "labels"):
            entry = manifest["splits"][split][key]
            assert os.path.getsize(cache / entry["path"]) == entry["bytes"] and len(entry["sha256"]) == 64
    assert manifest["total_bytes"] == sum(os.path.getsize(p) for p in cache.glob("*.npy"))
    assert manifest["size"] == 16 and manifest["layout"] == "NCHW" and manifest["source"].startswith("imagefolder:")


def test_unreadable_image_fails_the_build_and_leaves_nothing(tmp_path):
    src = _png_folder(tmp_path / "src", corrupt=True)
    with pytest.raises(DataError, match="broken.png"):
        build_cache(f"imagefolder:{src}", tmp_path / "cache", size=16, num_workers=0)
    assert not (tmp_path / "cache").exists()
    # no work directory left behind (the build's lock file stays: removing it could race a waiting build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "src"]
    manifest = build_cache(f"imagefolder:{src}", tmp_path / "cache", size=16, num_workers=0, skip_bad_images=True)
    assert manifest["skipped_images"] == 1 and manifest["splits"]["train"]["count"] == 12


def test_refuses_a_non_empty_target_and_a_cache_source(folder_cache, tmp_path):
    src, cache, _ = folder_cache
    with pytest.raises(DataError, match="already exists and is not empty"):
        build_cache(f"imagefolder:{src}", cache, size=16)
    with pytest.raises(DataError, match="already a decoded cache"):
        build_cache(f"cache:{cache}", tmp_path / "other", size=16)


# ------------------------------------------------------------------------------- manifest / files
def test_missing_or_bad_manifest_is_a_clear_error(folder_cache, tmp_path):
    _, cache, manifest = folder_cache
    with pytest.raises(DataError, match="does not exist"):
        check_data_spec(f"cache:{tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="needs a target"):
        check_data_spec("cache:")
    path = cache / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        check_data_spec(f"cache:{cache}")
    path.write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(DataError, match="format 'other'"):
        check_data_spec(f"cache:{cache}")
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "class_names"}))
    with pytest.raises(DataError, match="lacks class_names"):
        check_data_spec(f"cache:{cache}")
    path.unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        check_data_spec(f"cache:{cache}")


def test_truncated_cache_file_names_the_file_and_sizes(folder_cache):
    _, cache, manifest = folder_cache
    f = cache / "train_images.npy"
    expected = manifest["splits"]["train"]["images"]["bytes"]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        build_data(f"cache:{cache}", prep())
    message = str(err.value)
    assert str(f) in message and str(expected) in message and str(expected - 100) in message and "truncated" in message
    f.unlink()
    with pytest.raises(DataError, match="train_images.npy.*missing"):
        check_data_spec(f"cache:{cache}")


def test_corrupted_bytes_fail_the_checksum(folder_cache):
    _, cache, _ = folder_cache
    f = cache / "val_images.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel changed
    f.write_bytes(bytes(data))
    check_data_spec(f"cache:{cache}")  # sizes still match
    with pytest.raises(DataError, match="val_images.npy.*sha256"):
        build_data(f"cache:{cache}", prep())  # small caches are checksummed on load
    with pytest.raises(DataError, match="sha256"):
        verify_cache(cache)


# --------------------------------------------------------------------------------- batch transforms
def test_crop_boxes_stay_inside_and_follow_scale_and_ratio():
    torch.manual_seed(0)
    height, width = 37, 53
    boxes = sample_crop_boxes(2000, height, width, (0.08, 1.0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.int64
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = (h * w).float() / (height * width)
    assert area.min() > 0.06 and area.max() <= 1.0 and area.std() > 0.2  # spread over the scale range
    ratio = w.float() / h.float()
    assert ratio.min() > 0.7 and ratio.max() < 1.4  # (3/4, 4/3) up to integer rounding
    assert len(set(top.tolist())) > 20 and len(set(left.tolist())) > 20  # positions vary


def test_crop_box_fallback_matches_torchvision():
    """No try fits (scale > 1): the whole image, aspect clamped into (3/4, 4/3), centred."""
    image = torch.zeros(3, 37, 53)
    for height, width in ((37, 53), (53, 37), (40, 40)):
        expected = RandomResizedCrop.get_params(image.new_zeros(3, height, width), [2.0, 3.0], list(RATIO))
        got = sample_crop_boxes(4, height, width, (2.0, 3.0))
        assert all(tuple(row) == tuple(expected) for row in got.tolist())


@pytest.mark.parametrize("resample", ["loop", "roi"])
def test_constant_image_stays_constant_after_normalisation(resample):
    value = torch.tensor([10, 128, 250], dtype=torch.uint8)
    x = value.view(1, 3, 1, 1).expand(5, 3, 24, 24).contiguous()  # (5, 3, 24, 24)
    torch.manual_seed(0)
    out = BatchTrainTransform(prep(size=16), resample=resample)(x)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    expected = (value.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-4, rtol=0)
    ev = BatchEvalTransform(prep(size=16))(x)
    torch.testing.assert_close(ev, expected.view(1, 3, 1, 1).expand_as(ev), atol=1e-4, rtol=0)


@pytest.mark.parametrize("resample", ["loop", "roi"])
def test_full_crop_flip_is_exact(resample):
    """scale=(1, 1) on a square image at the output size: the crop is the image itself, so the output
    is the normalised image, mirrored when hflip=1."""
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    norm = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for hflip, expected in ((0.0, norm), (1.0, norm.flip(-1))):
        out = BatchTrainTransform(prep(size=16, scale=(1.0, 1.0), hflip=hflip), resample=resample)(x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_flip_probability_and_rng_reproducibility():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 16).expand(400, 3, 16, 16).contiguous()  # left-right ramp
    tf = BatchTrainTransform(prep(size=16, scale=(1.0, 1.0), hflip=0.5))
    torch.manual_seed(3)
    out = tf(x)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert 0.4 < flipped.float().mean() < 0.6
    torch.manual_seed(3)
    torch.testing.assert_close(tf(x), out, atol=0, rtol=0)  # the global RNG decides everything


def test_threads_share_the_work_without_changing_the_output():
    x = torch.randint(0, 256, (9, 3, 40, 40), dtype=torch.uint8)
    outs = []
    for threads in (1, 3):
        torch.manual_seed(5)
        outs.append(BatchTrainTransform(prep(size=24, color_jitter=0.3), threads=threads)(x))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    with pytest.raises(DataError, match="threads=0"):
        BatchTrainTransform(prep(), threads=0)


def test_loop_and_roi_resample_the_same_boxes():
    """Same RNG state -> same boxes; the two resamplers differ only in the filter, so on a smooth image
    their outputs agree closely (a swapped x/y or an off-by-one box would not)."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    smooth = torch.stack([xx * 5, yy * 5, (xx + yy) * 2.5]).clamp(0, 255).to(torch.uint8)  # (3, 48, 48)
    x = smooth.unsqueeze(0).repeat(8, 1, 1, 1)
    p = prep(size=24, scale=(0.2, 0.6), interpolation="bilinear")
    torch.manual_seed(1)
    loop = BatchTrainTransform(p, resample="loop")(x)
    torch.manual_seed(1)
    roi = BatchTrainTransform(p, resample="roi")(x)
    assert (loop - roi).abs().mean() < 0.02 and (loop - roi).abs().max() < 0.15


def test_eval_transform_matches_timm_on_pil():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    pixels = np.stack([xx * 6, yy * 6, 255 - xx * 3], -1) + rng.integers(0, 20, (40, 40, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    p = prep(size=32, crop_pct=0.9)  # resize 40 -> floor(32 / 0.9) = 35, centre crop 32
    expected = create_transform(input_size=(3, 32, 32), interpolation="bicubic", mean=MEAN, std=STD, crop_pct=0.9)(image)
    x = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).unsqueeze(0)  # (1, 3, 40, 40)
    got = BatchEvalTransform(p)(x)[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.03  # PIL vs torch bicubic: a few grey levels apart


def test_color_jitter_changes_pixels_within_range():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    plain = BatchTrainTransform(prep(size=16, scale=(1.0, 1.0), hflip=0.0))(x)
    jittered = BatchTrainTransform(prep(size=16, scale=(1.0, 1.0), hflip=0.0, color_jitter=0.4))(x)
    assert not torch.allclose(plain, jittered)
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (jittered >= low.view(1, 3, 1, 1) - 1e-5).all() and (jittered <= high.view(1, 3, 1, 1) + 1e-5).all()


def test_batch_transforms_refuse_float_input():
    with pytest.raises(DataError, match="uint8"):
        BatchEvalTransform(prep())(torch.zeros(2, 3, 16, 16))


# ------------------------------------------------------------------------------------ CLI, training
def test_cli_data_cache(tmp_path, capsys):
    out = tmp_path / "c"
    spec = "synthetic:classes=3,size=16,n=10,n_val=4"
    assert cli_main(["data", "cache", "--data", spec, "--out", str(out), "--size", "16", "--num-workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "train:    10 images" in text and f"cache:{out}" in text
    assert read_manifest(out)["splits"]["val"]["count"] == 4
    assert cli_main(["data", "cache", "--data", "synthetic", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def _tiny_cfg(data, **kw):
    base = dict(
        model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, data=data, epochs=1,
        batch_size=16, lr=1e-3, warmup_epochs=0.5, num_workers=0, topk=[1, 2], log_interval=2,
    )
    return TrainConfig.from_dict({**base, **kw})


def test_cache_trains_end_to_end_and_resumes_exactly(tmp_path):
    build_cache("synthetic:classes=4,size=32,n=64,n_val=32", tmp_path / "c", size=36, num_workers=0)
    cfg = _tiny_cfg(f"cache:{tmp_path / 'c'}", epochs=2, augment="timm", color_jitter=0.4)
    full = run_training(cfg, tmp_path / "run", progress=False)
    assert full["status"] == "finished" and full["data"]["train_size"] == 64 and full["data"]["val_size"] == 32
    assert (tmp_path / "run" / "weights.safetensors").is_file() and math.isfinite(full["metrics"]["val/loss"])

    class StopAfterOne(Callback):
        def on_epoch_end(self, state, metrics):
            state.should_stop, state.stop_reason = True, "interrupted"

    run_training(cfg, tmp_path / "part", [StopAfterOne()], progress=False)
    resumed = run_training(cfg, tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint", progress=False)
    stable = lambda h: [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/", "infer/"))} for m in h]  # noqa: E731
    assert stable(resumed["history"]) == stable(full["history"])


@pytest.mark.slow
def test_cache_path_matches_pil_path_accuracy(tmp_path):
    """The same synthetic task (12 classes: colour alone is not enough; chance 0.083), model and seed:
    per-image PIL transforms vs the cache and its batched transforms. Both learn and land within noise
    of each other (measured: 0.633 vs 0.596 after 4 epochs)."""
    spec = "synthetic:classes=12,size=32,n=768,n_val=240"
    build_cache(spec, tmp_path / "c", size=32, num_workers=0)
    common = dict(epochs=4, lr=2e-3, batch_size=32, augment="timm", scale=(0.5, 1.0), color_jitter=None)
    pil = run_training(_tiny_cfg(spec, **common), progress=False)["metrics"]["val/acc1"]
    cached = run_training(_tiny_cfg(f"cache:{tmp_path / 'c'}", **common), progress=False)["metrics"]["val/acc1"]
    print(f"val/acc1: PIL path {pil:.3f}, cache path {cached:.3f}")
    assert pil > 0.4 and cached > 0.4, (pil, cached)
    assert abs(pil - cached) < 0.12, (pil, cached)


def test_data_show_applies_the_batch_transform_of_a_cache(folder_cache, tmp_path, monkeypatch):
    import finetune.data.plots as plots

    seen = {}

    def capture(images, labels, class_names, path, mean, std, **kw):
        seen["images"] = images
        return None

    monkeypatch.setattr(plots, "plot_grid", capture)
    _, cache_dir, _ = folder_cache
    plots.show_data(f"cache:{cache_dir}", str(tmp_path / "grid.png"), n=4, img_size=32, split="val")
    images = seen["images"]
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert images.min() < 0  # normalised, not raw uint8 pixels


def _rewrite_labels(cache, labels):
    """Replace train labels and fix the manifest's size and checksum (a consistent but wrong cache)."""
    from finetune.io_utils import sha256_file

    path = cache / "train_labels.npy"
    np.save(path, np.asarray(labels, dtype=np.int64))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["splits"]["train"]["labels"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", [3, -1, 2**40])
def test_labels_outside_the_classes_name_the_file_and_the_label(folder_cache, bad):
    _, cache, manifest = folder_cache
    n = manifest["splits"]["train"]["count"]
    _rewrite_labels(cache, [0] * (n - 1) + [bad])
    with pytest.raises(DataError) as err:
        build_data(f"cache:{cache}", prep())
    message = str(err.value)
    assert "train_labels.npy" in message and f"label {bad} at index {n - 1}" in message and "outside 0..2" in message


def test_a_pickled_labels_file_is_refused_without_unpickling(folder_cache, tmp_path):
    _, cache, manifest = folder_cache
    path = cache / "train_labels.npy"
    np.save(path, np.array([{"evil": 1}] * manifest["splits"]["train"]["count"], dtype=object), allow_pickle=True)
    from finetune.io_utils import sha256_file

    data = json.loads((cache / "manifest.json").read_text())
    data["splits"]["train"]["labels"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="train_labels.npy' is not a readable .npy array"):
        build_data(f"cache:{cache}", prep())


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.update(class_names=["only"]), "class_names must be a list of at least 2 names"),
        (lambda m: m.update(class_names="ab"), "class_names must be a list"),
        (lambda m: m.update(size="16"), "size='16' must be a positive integer"),
        (lambda m: m["splits"]["train"].update(count=-1), "train count=-1"),
        (lambda m: m["splits"]["val"]["images"].update(path="../../etc/passwd"), "val images must give a file name"),
        (lambda m: m.update(skipped_images="x"), "skipped_images='x'"),
    ],
)
def test_a_malformed_manifest_names_the_entry(folder_cache, change, fragment):
    _, cache, manifest = folder_cache
    data = json.loads((cache / "manifest.json").read_text())
    change(data)
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="manifest.json'") as err:
        check_data_spec(f"cache:{cache}")
    assert fragment in str(err.value)
