"""finetune.data: spec parsing, preprocessing, synthetic source, loaders, plots (offline, CPU)."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.functional as TF

from finetune.data import (
    DataError,
    Preprocessing,
    SyntheticShapes,
    build_data,
    build_loaders,
    check_data_spec,
    denormalize,
    normalize,
    parse_data_spec,
    plot_grid,
    resolve_preprocessing,
    show_data,
)


def small_prep(augment="none", size=16):
    return Preprocessing(
        input_size=(3, size, size),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        augment=augment,
    )


# ------------------------------------------------------------------------------------ specs
def test_parse_specs():
    s = parse_data_spec("synthetic")
    assert (s.kind, s.target) == ("synthetic", None)
    assert s.options == {"classes": 10, "size": 32, "n": 2000, "n_val": 500, "seed": None}
    s = parse_data_spec("synthetic:classes=5,size=16,n=10,seed=3")
    assert s.options == {"classes": 5, "size": 16, "n": 10, "n_val": 500, "seed": 3}
    assert parse_data_spec("imagefolder:/data/a,b=c").target == "/data/a,b=c"
    assert parse_data_spec("hf:user/ds").target == "user/ds"
    assert parse_data_spec("imagenet100").target is None
    assert parse_data_spec("imagenet100:/x/y").target == "/x/y"
    assert parse_data_spec("imagefolder:~/pics").target == os.path.expanduser("~/pics")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("cifar10", "unknown data kind 'cifar10'"),
        ("synthetc", "did you mean 'synthetic'"),
        ("synthetic:", "no options"),
        ("synthetic:clases=3", "unknown synthetic option 'clases'.*did you mean 'classes'"),
        ("synthetic:classes=x", "classes='x'.*non-negative integer"),
        ("synthetic:classes", "non-negative integer"),
        ("synthetic:classes=1", "classes=1.*>= 2"),
        ("synthetic:n=0", "n=0.*>= 1"),
        ("synthetic:classes=37", "classes=37 is too many; at most 36"),
        ("imagefolder:", "needs a target"),
        ("hf:", "needs a target"),
        ("imagenet100:", "empty directory"),
        ("imagefolder:/no/such/dir", "'/no/such/dir' does not exist"),
        ("hf:/no/such/dir", "'/no/such/dir' does not exist"),
        ("hf:not a hub id!", "neither an existing directory nor a hub id"),
        ("imagenet100:/no/such/dir", "'/no/such/dir' does not exist"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        check_data_spec(spec)


def test_check_imagefolder_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"no val/ subdirectory"):
        check_data_spec(f"imagefolder:{tmp_path}")
    (tmp_path / "val").mkdir()
    assert check_data_spec(f"imagefolder:{tmp_path}").target == str(tmp_path)
    with pytest.raises(DataError, match="no dataset_dict.json"):
        check_data_spec(f"hf:{tmp_path}")


def test_check_saved_dataset_splits(tmp_path):
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError, match=r"splits \['train'\].*validation, val, test"):
        check_data_spec(f"hf:{tmp_path}")
    from datasets import Dataset, DatasetDict

    real = tmp_path / "real"  # a complete folder, as DatasetDict.save_to_disk writes it
    DatasetDict({s: Dataset.from_dict({"label": [0, 1]}) for s in ("train", "test")}).save_to_disk(str(real))
    assert check_data_spec(f"hf:{real}").kind == "hf"


# ---------------------------------------------------------------------------- preprocessing
def test_normalize_round_trip_and_matches_torchvision():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z = normalize(x, mean, std)
    assert torch.allclose(z, TF.normalize(x, mean, std), atol=1e-6)
    assert torch.allclose(denormalize(z, mean, std), x, atol=1e-6)
    assert torch.allclose(denormalize(z[0], mean, std), x[0], atol=1e-6)  # [3, H, W] too


def test_resolve_preprocessing_from_pretrained_cfg():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    p = resolve_preprocessing(model, None)
    cfg = model.pretrained_cfg
    assert p.input_size == (3, 224, 224)
    assert (p.interpolation, p.crop_pct, p.mean, p.std) == (
        cfg["interpolation"], cfg["crop_pct"], tuple(cfg["mean"]), tuple(cfg["std"])
    )
    assert resolve_preprocessing(model, 64).input_size == (3, 64, 64)
    # a ViT built for 32 px takes 32 px inputs even though its pretrained_cfg says 224
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1)
    assert resolve_preprocessing(small, None).input_size == (3, 32, 32)


def test_preprocessing_json_and_round_trip(tmp_path):
    p = small_prep(augment="timm")
    path = tmp_path / "preprocessing.json"
    p.save(str(path))
    d = json.loads(path.read_text())
    assert set(d) == {
        "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
        "augment", "scale", "hflip", "color_jitter", "train_steps", "eval_steps",
    }
    order = ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize"]
    assert [next(i for i, s in enumerate(d["train_steps"]) if name in s) for name in order] == list(range(5))
    order = ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert [next(i for i, s in enumerate(d["eval_steps"]) if name in s) for name in order] == list(range(4))
    assert Preprocessing.from_dict(d) == p
    assert Preprocessing.load(str(path)) == p
    with pytest.raises(DataError, match="unknown preprocessing key"):
        Preprocessing.from_dict({**d, "mena": [0, 0, 0]})


def test_augment_none_and_no_jitter():
    p = small_prep(augment="none")
    assert p.to_dict()["train_steps"] == p.to_dict()["eval_steps"]
    p = Preprocessing(**{**small_prep(augment="timm").__dict__, "color_jitter": None})
    assert not any("ColorJitter" in s for s in p.to_dict()["train_steps"])
    with pytest.raises(DataError, match="augment='autoaug'"):
        small_prep(augment="autoaug")


# -------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic():
    a, b = SyntheticShapes(50, 10, 32, seed=1), SyntheticShapes(50, 10, 32, seed=1)
    for i in (0, 7, 49):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[10][0]))  # same class, other image
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(SyntheticShapes(50, 10, 32, 2)[0][0]))
    val = SyntheticShapes(50, 10, 32, seed=1, split="val")
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(val[0][0]))
    assert a[0][0].size == (32, 32) and a[0][0].mode == "RGB"


def test_synthetic_classes_balanced_and_named():
    ds = SyntheticShapes(103, 10, 16)
    counts = Counter(ds[i][1] for i in range(len(ds)))
    assert sorted(counts) == list(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    assert ds.class_names[0] == "red circle"
    full = SyntheticShapes(36, 36, 16)
    assert len(set(full.class_names)) == 36
    with pytest.raises(DataError, match="classes=37"):
        SyntheticShapes(10, 37, 16)


def test_synthetic_bundle_and_seed():
    b = build_data("synthetic:classes=4,size=16,n=20,n_val=8", small_prep(), seed=5)
    assert (len(b.train), len(b.val), b.num_classes, b.skipped_images) == (20, 8, 4, 0)
    x, y = b.train[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 3
    other = build_data("synthetic:classes=4,size=16,n=20,n_val=8", small_prep(), seed=6)
    assert not torch.equal(b.train[3][0], other.train[3][0])
    pinned = [build_data("synthetic:classes=4,size=16,n=20,seed=2", small_prep(), seed=s) for s in (5, 6)]
    assert torch.equal(pinned[0].train[3][0], pinned[1].train[3][0])


@pytest.fixture
def one_thread():
    """A tiny model is fastest on one thread; two threads on a busy 2-core box spin ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_is_learnable_by_a_small_vit(one_thread):
    """12 classes (each colour in two shapes, so colour alone is not enough): a 2-block ViT gets far
    above chance (1/12) in three short epochs."""
    torch.manual_seed(0)
    bundle = build_data("synthetic:classes=12,size=16,n=384,n_val=120", small_prep(augment="none", size=16))
    train, val = build_loaders(bundle, 32, 0, torch.device("cpu"), seed=0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2, embed_dim=64,
        num_heads=2, num_classes=12,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(3):
        train.sampler.set_epoch(epoch)
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
    assert correct / len(bundle.val) > 0.3


# ---------------------------------------------------------------------------------- loaders
def _labels_in_order(loader):
    return [y.tolist() for _, y in loader]


def test_loaders_shapes_and_drop_last():
    b = build_data("synthetic:classes=3,size=16,n=20,n_val=7", small_prep())
    train, val = build_loaders(b, batch_size=8, num_workers=0, device=torch.device("cpu"), seed=0, eval_batch_size=4)
    batches = list(train)
    assert len(batches) == 2 and all(x.shape == (8, 3, 16, 16) for x, _ in batches)  # 20 -> 2 full batches
    assert batches[0][1].dtype == torch.int64
    assert [len(y) for _, y in val] == [4, 3]
    assert not train.pin_memory and not train.persistent_workers
    tiny = build_data("synthetic:classes=3,size=16,n=5,n_val=2", small_prep())
    train, _ = build_loaders(tiny, batch_size=8, num_workers=0, device=torch.device("cpu"), seed=0)
    assert [len(y) for _, y in train] == [5]  # fewer images than a batch: keep them


def test_loader_order_reproducible_with_set_epoch():
    b = build_data("synthetic:classes=5,size=8,n=40,n_val=5", small_prep(size=8))
    train, _ = build_loaders(b, batch_size=10, num_workers=0, device=torch.device("cpu"), seed=3)
    train.sampler.set_epoch(1)
    first = _labels_in_order(train)
    assert _labels_in_order(train) == first  # no set_epoch: the same order again (as DistributedSampler)
    train.sampler.set_epoch(2)
    assert _labels_in_order(train) != first
    train.sampler.set_epoch(1)
    assert _labels_in_order(train) == first
    fresh, _ = build_loaders(b, batch_size=10, num_workers=0, device=torch.device("cpu"), seed=3)
    fresh.sampler.set_epoch(1)
    assert _labels_in_order(fresh) == first
    other, _ = build_loaders(b, batch_size=10, num_workers=0, device=torch.device("cpu"), seed=4)
    other.sampler.set_epoch(1)
    assert _labels_in_order(other) != first
    # epoch e of seed s is the permutation of seed s * 100003 + e (the order the loop always used)
    assert list(train.sampler) == torch.randperm(40, generator=torch.Generator().manual_seed(3 * 100003 + 1)).tolist()


def test_loader_with_persistent_workers_resumes_order():
    """Epoch 1 of a run equals epoch 1 of a run resumed there (a fresh loader, fresh workers)."""
    b = build_data("synthetic:classes=5,size=8,n=24,n_val=6", small_prep(size=8))
    train, val = build_loaders(b, batch_size=6, num_workers=2, device=torch.device("cpu"), seed=0)
    assert train.persistent_workers and train.worker_init_fn is not None
    orders = []
    for epoch in range(2):
        train.sampler.set_epoch(epoch)
        orders.append(_labels_in_order(train))
    resumed, _ = build_loaders(b, batch_size=6, num_workers=2, device=torch.device("cpu"), seed=0)
    resumed.sampler.set_epoch(1)
    assert _labels_in_order(resumed) == orders[1] != orders[0]
    assert sum(len(y) for _, y in val) == 6


# ------------------------------------------------------------------------------------ plots
def test_plot_grid_writes_png_with_denormalised_images(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "grid.png"
    fig = plot_grid(normalize(pixels, mean, std), [0, 2, 1], ["red circle", "a", "b"], str(path), mean, std, ncols=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == ["red circle", "b", "a"]
    shown = np.asarray(titled[0].images[0].get_array())
    assert np.allclose(shown, pixels[0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert plot_grid(normalize(pixels, mean, std), [0, 0, 0], ["x"], None, mean, std) is not None


def test_show_data(tmp_path):
    out = show_data("synthetic:classes=4,size=16,n=12,n_val=4", str(tmp_path / "show.png"), n=6, img_size=16)
    assert out == str(tmp_path / "show.png")
    assert (tmp_path / "show.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError, match="split='test'"):
        show_data("synthetic", str(tmp_path / "x.png"), split="test")
