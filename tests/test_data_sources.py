"""finetune.data sources on disk: image folders, Hugging Face save_to_disk copies, ImageNet-100 (offline)."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import IMAGENET100_HUB_ID, DataError, Preprocessing, build_data, imagenet100_wnids
from finetune.data.sources import wnid_descriptions

PREP = Preprocessing(
    input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment="none",
)


def write_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 10, 3), value, np.uint8)).save(path)


def make_folder(root, classes, per_class=2, splits=("train", "val")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                write_image(root / split / c / f"{i}.png", value=40 * i)
    return root


def tiny_dataset_dict(tmp_path, names, labels=(0, 1, 0, 1), val_split="validation", name="hfds"):
    """A few 6x6 images in an `picture` Image column and a `category` ClassLabel column."""
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "category": datasets.ClassLabel(names=list(names)),
            "index": datasets.Value("int64"),
        }
    )
    images = [Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)) for i in range(len(labels))]
    split = datasets.Dataset.from_dict(
        {"picture": images, "category": list(labels), "index": list(range(len(labels)))}, features=features
    )
    path = tmp_path / name
    datasets.DatasetDict({"train": split, val_split: split}).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------- imagefolder
def test_imagefolder(tmp_path):
    root = make_folder(tmp_path / "d", ["cat", "dog"], per_class=2)
    b = build_data(f"imagefolder:{root}", PREP)
    assert b.class_names == ["cat", "dog"] and b.num_classes == 2
    assert (len(b.train), len(b.val), b.skipped_images) == (4, 4, 0)
    x, y = b.train[3]
    assert x.shape == (3, 8, 8) and y == 1


def test_imagefolder_unreadable_image_named_and_skipped(tmp_path):
    root = make_folder(tmp_path / "d", ["cat", "dog"], per_class=2)
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image at all")
    b = build_data(f"imagefolder:{root}", PREP)
    index = [p for p, _ in b.train.samples].index(str(bad))
    with pytest.raises(DataError, match="broken.png"):
        b.train[index]
    b = build_data(f"imagefolder:{root}", PREP, skip_bad_images=True)
    assert b.skipped_images == 1 and len(b.train) == 4
    assert all(b.train[i][0].shape == (3, 8, 8) for i in range(len(b.train)))


def test_imagefolder_empty_and_mismatched(tmp_path):
    root = tmp_path / "empty"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
    with pytest.raises(DataError, match="train'? has no images"):
        build_data(f"imagefolder:{root}", PREP)
    with pytest.raises(DataError, match="no class folders"):
        (tmp_path / "bare" / "train").mkdir(parents=True)
        (tmp_path / "bare" / "val").mkdir(parents=True)
        build_data(f"imagefolder:{tmp_path / 'bare'}", PREP)
    root = make_folder(tmp_path / "m", ["cat", "dog"], splits=("train",))
    make_folder(root, ["cat", "emu"], splits=("val",))
    with pytest.raises(DataError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        build_data(f"imagefolder:{root}", PREP)
    only_bad = make_folder(tmp_path / "b", ["cat", "dog"], per_class=1)
    (only_bad / "train" / "cat" / "0.png").write_bytes(b"junk")
    (only_bad / "train" / "dog" / "0.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images"):
        build_data(f"imagefolder:{only_bad}", PREP, skip_bad_images=True)


# -------------------------------------------------------------------------------- hugging face
def test_hf_save_to_disk_detects_columns(tmp_path):
    path = tiny_dataset_dict(tmp_path, ["apple", "pear"], labels=(0, 1, 1, 0))
    b = build_data(f"hf:{path}", PREP)
    assert b.class_names == ["apple", "pear"] and b.num_classes == 2
    assert (len(b.train), len(b.val)) == (4, 4)
    x, y = b.train[2]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    # a 'test' split stands in for a missing validation split
    path = tiny_dataset_dict(tmp_path, ["apple", "pear"], val_split="test", name="with_test")
    assert len(build_data(f"hf:{path}", PREP).val) == 4


def test_hf_labels_beyond_class_count(tmp_path):
    path = tiny_dataset_dict(tmp_path, ["apple", "pear"])
    dd = datasets.load_from_disk(str(path))
    # ClassLabel casts do not range-check, so out-of-range labels can reach disk
    raw = dd.cast_column("category", datasets.Value("int64"))
    raw = raw.map(lambda r: {"category": r["category"] + 4 * (r["index"] == 3)})
    raw.cast_column("category", datasets.ClassLabel(names=["apple", "pear"])).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"label 5 at row 3.*outside 0..1"):
        build_data(f"hf:{tmp_path / 'bad'}", PREP)


def test_hf_without_classlabel_or_image(tmp_path):
    split = datasets.Dataset.from_dict(
        {"picture": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]},
        features=datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": split, "val": split}).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError, match="no unambiguous datasets.ClassLabel column.*label: Value"):
        build_data(f"hf:{tmp_path / 'nolabel'}", PREP)
    split = datasets.Dataset.from_dict(
        {"path": ["a", "b"], "label": [0, 1]},
        features=datasets.Features({"path": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    datasets.DatasetDict({"train": split, "val": split}).save_to_disk(str(tmp_path / "noimage"))
    with pytest.raises(DataError, match="no unambiguous datasets.Image column"):
        build_data(f"hf:{tmp_path / 'noimage'}", PREP)


def test_hf_unreadable_image_names_split_and_row(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = Image.new("RGB", (4, 4))
    split = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"garbage", "path": None}], "label": [0, 1]}, features=features
    )
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "corrupt"))
    b = build_data(f"hf:{tmp_path / 'corrupt'}", PREP)
    assert b.train[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"cannot read image 1 of .*corrupt\[train\]"):
        b.train[1]


def test_hf_hub_id_goes_to_load_dataset_and_errors_are_data_errors(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load hub dataset 'user/some-set': offline"):
        build_data("hf:user/some-set", PREP)
    assert calls == [(("user/some-set",), {})]  # no trust_remote_code, nothing else


# ------------------------------------------------------------------------------- imagenet-100
def test_imagenet100_list():
    wnids = imagenet100_wnids()
    assert len(wnids) == len(set(wnids)) == 100 and wnids[:2] == ["n02869837", "n01749939"]


def test_imagenet100_filters_imagenet1k_folder(tmp_path):
    wnids = imagenet100_wnids()
    root = make_folder(tmp_path / "in1k", wnids + ["n01440764", "n15075141"], per_class=1)
    b = build_data(f"imagenet100:{root}", PREP)
    assert b.num_classes == 100 and len(b.train) == len(b.val) == 100
    assert b.class_names[:2] == ["bonnet, poke bonnet", "green mamba"]
    # labels follow the CMC list order, as in the hub copy
    assert all(f"/{wnids[label]}/" in path for path, label in b.train.samples)


def test_imagenet100_folder_missing_wnids(tmp_path):
    wnids = imagenet100_wnids()
    root = make_folder(tmp_path / "in1k", wnids[2:], per_class=1)
    with pytest.raises(DataError, match=f"lacks 2 of the 100 required class folders: \\[{wnids[0]}, {wnids[1]}\\]"):
        build_data(f"imagenet100:{root}", PREP)


def test_imagenet100_save_to_disk_with_wnid_or_description_names(tmp_path):
    wnids = imagenet100_wnids()
    shuffled = wnids[::-1]  # any label order is kept; names are mapped per label
    path = tiny_dataset_dict(tmp_path, shuffled, labels=(0, 1, 2, 3), name="wnids")
    b = build_data(f"imagenet100:{path}", PREP)
    assert b.num_classes == 100 and b.class_names[:2] == wnid_descriptions(shuffled[:2])
    path = tiny_dataset_dict(tmp_path, wnid_descriptions(wnids), name="described")
    assert build_data(f"imagenet100:{path}", PREP).class_names[0] == "bonnet, poke bonnet"
    path = tiny_dataset_dict(tmp_path, wnids[:99] + ["n01440764"], name="wrong")
    with pytest.raises(DataError, match=f"not ImageNet-100.*missing \\[{wnids[99]}\\], unexpected \\[n01440764\\]"):
        build_data(f"imagenet100:{path}", PREP)


def test_imagenet100_default_is_hub_copy(tmp_path, monkeypatch):
    path = tiny_dataset_dict(tmp_path, wnid_descriptions(imagenet100_wnids()))
    calls = []

    def fake_hub(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.load_from_disk(str(path))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    b = build_data("imagenet100", PREP)
    assert calls == [(IMAGENET100_HUB_ID, {})] and b.num_classes == 100 and len(b.train) == 4


# ------------------------------------------------------------------ hostile folders and image modes
def test_one_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "d", ["cat"])
    with pytest.raises(DataError, match=r"has 1 class\(es\) \['cat'\]; training needs at least 2"):
        build_data(f"imagefolder:{root}", PREP)
    path = tiny_dataset_dict(tmp_path, ["apple"], labels=(0, 0))
    with pytest.raises(DataError, match="training needs at least 2"):
        build_data(f"hf:{path}", PREP)


@pytest.mark.parametrize("where", ["self", "parent", "root", "class"])
def test_symlink_loops_are_named(tmp_path, where):
    root = make_folder(tmp_path / "d", ["cat", "dog"])
    cat = root / "train" / "cat"
    if where == "self":
        link, target = cat / "loop.png", cat / "loop.png"
    elif where == "parent":
        link, target = cat / "sub", cat
    elif where == "root":
        link, target = cat / "up", root
    else:  # a class folder that is a link to its own split
        link, target = root / "train" / "emu", root / "train"
        (root / "val" / "emu").mkdir()
        write_image(root / "val" / "emu" / "0.png")
    link.symlink_to(target)
    with pytest.raises(DataError, match="symbolic link loop") as err:
        build_data(f"imagefolder:{root}", PREP)
    assert str(link) in str(err.value)


def test_a_symlinked_class_folder_that_does_not_loop_is_read(tmp_path):
    root = make_folder(tmp_path / "d", ["cat", "dog"])
    elsewhere = make_folder(tmp_path / "other", ["emu"])
    for split in ("train", "val"):
        (root / split / "emu").symlink_to(elsewhere / split / "emu")
    b = build_data(f"imagefolder:{root}", PREP)
    assert b.class_names == ["cat", "dog", "emu"] and len(b.train) == 6


def _folder_with(tmp_path, save):
    """A two-class folder whose train/cat/x.png is written by `save(path)`."""
    root = make_folder(tmp_path / "d", ["cat", "dog"], per_class=1)
    save(root / "train" / "cat" / "x.png")
    return root


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from finetune.data.images import load_rgb

    grey16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    root = _folder_with(tmp_path, lambda p: Image.fromarray(grey16).save(p))
    rgb = np.asarray(load_rgb(str(root / "train" / "cat" / "x.png")))
    assert Image.open(root / "train" / "cat" / "x.png").mode.startswith("I")
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb == rgb[..., :1]).all()
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert np.asarray(load_rgb_from(i32))[0, :, 1].tolist() == [0, 255, 255, 0]
    assert build_data(f"imagefolder:{root}", PREP).train[0][0].shape == (3, 8, 8)


def load_rgb_from(image):
    from finetune.data.images import to_rgb

    return to_rgb(image)


def test_palette_images_use_their_palette(tmp_path):
    from finetune.data.images import load_rgb

    def save(path):
        img = Image.new("P", (2, 1))
        img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        img.putpixel((1, 0), 1)
        img.info["transparency"] = 0
        img.save(path)

    root = _folder_with(tmp_path, save)
    path = str(root / "train" / "cat" / "x.png")
    assert Image.open(path).mode == "P"
    assert np.asarray(load_rgb(path)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    pa = Image.new("P", (1, 1))
    pa.putpalette([1, 2, 3] * 256)
    assert np.asarray(load_rgb_from(pa.convert("PA"))).tolist() == [[[1, 2, 3]]]


def test_truncated_images_are_skipped_when_asked(tmp_path):
    def save(path):
        rng = np.random.default_rng(0)
        jpg = path.with_suffix(".jpg")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=90)
        jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])

    root = _folder_with(tmp_path, save)
    with Image.open(root / "train" / "cat" / "x.jpg") as img:  # opens fine: only decoding finds it
        assert img.size == (64, 64)
    b = build_data(f"imagefolder:{root}", PREP)
    index = [p for p, _ in b.train.samples].index(str(root / "train" / "cat" / "x.jpg"))
    with pytest.raises(DataError, match=r"x\.jpg.*truncated"):
        b.train[index]
    b = build_data(f"imagefolder:{root}", PREP, skip_bad_images=True)
    assert b.skipped_images == 1 and len(b.train) == 2


def test_decompression_bombs_are_refused_naming_the_file(tmp_path, monkeypatch):
    root = _folder_with(tmp_path, lambda p: Image.new("L", (300, 300)).save(p))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 300x300 is 9x the limit, 200x200 4x
    b = build_data(f"imagefolder:{root}", PREP)
    index = [p for p, _ in b.train.samples].index(str(root / "train" / "cat" / "x.png"))
    with pytest.raises(DataError, match=r"x\.png'.*too many pixels"):
        b.train[index]
    Image.new("L", (150, 150)).save(root / "train" / "cat" / "x.png")  # above the limit, below 2x: PIL only warns
    with pytest.raises(DataError, match=r"x\.png'.*too many pixels"):
        b.train[index]
    b = build_data(f"imagefolder:{root}", PREP, skip_bad_images=True)
    assert b.skipped_images == 1 and len(b.train) == 2
