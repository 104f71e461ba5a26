"""Hostile input, generated per class (hypothesis), through the real command line in-process.

Every refused case must: exit 2, print no traceback, end stderr with one `vitsweep: error:` line (or
argparse's `error:` line) that names the offending key or value, create or change no file (the whole
temporary directory, inputs and any earlier run included, is hashed before and after), and neither
import nor start Ray. Classes: non-finite numbers, out-of-range values, wrong YAML types (train
--config and a sweep's fixed:), hostile YAML files (alias bombs, deep nesting, oversize, binary,
NUL bytes), device strings, --out (empty, a file, under a file, a finished run), --resume with a
changed config, data (one class, symlink loops, cache labels), image decoding (16-bit, palette,
decompression bombs, truncated files) and weights sidecar tampering.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.config import TrainConfig
from finetune.errors import WeightsError
from orchestrator.cli import main

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(SETTINGS, max_examples=10)

TRAIN = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--patch-size", "4",
         "--depth", "2", "--num-workers", "0", "--augment", "none", "--no-progress", "--epochs", "2", "--topk", "1",
         "--batch-size", "4", "--warmup-epochs", "0.5", "--max-train-batches", "2", "--max-val-batches", "1"]
SYNTH = "synthetic:classes=3,size=32,n=8,n_val=4"
SWEEP_FIXED = {"model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
               "patch_size": 4, "depth": 2, "data": SYNTH, "epochs": 1}


# ------------------------------------------------------------------------------------------ harness
@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        yield Path(d)


def snapshot(root: Path) -> dict:
    """Every path under `root` with the sha256 of its bytes (links by their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def refused(capsys, argv, *fragments, root: Path) -> str:
    """Run `vitsweep argv`; assert every property of a clean refusal; return the error line."""
    before = snapshot(root)
    had_ray = "ray" in sys.modules
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert lines, "no message"
    last = lines[-1]
    assert last.startswith("vitsweep: error: ") or ": error: " in last, err
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    assert snapshot(root) == before, f"{root} changed"
    if not had_ray and argv[0] == "train":  # the sweep commands may import Ray; they must not start it
        assert "ray" not in sys.modules, "Ray was imported"
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "Ray was started"
    return last


def train(root: Path, *args, data=SYNTH):
    return [*TRAIN, "--data", data, *args, "--out", root / "out"]


def sweep(root: Path, path: Path):
    return ["run", "--config", path, "--storage", root / "storage", "--num-cpus", "1"]


# ---------------------------------------------------------------------------- the keys, by class
HINTS = typing.get_type_hints(TrainConfig)
FLOAT_FLAGS = ["drop_path", "hflip", "color_jitter", "lr", "min_lr", "weight_decay", "warmup_epochs", "layer_decay",
               "label_smoothing", "mixup", "cutmix", "clip_grad"]
NON_FINITE = st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999"])


def _below(x):
    return st.floats(min_value=-1e9, max_value=x, exclude_max=True, allow_nan=False)


def _above(x):
    return st.floats(min_value=x, max_value=1e9, exclude_min=True, allow_nan=False)


# Values that make no sense for each key, stated here independently of TrainConfig's declarations.
OUT_OF_RANGE = {
    "drop_path": _below(0) | st.floats(1.0, 1e9),
    "hflip": _below(0) | _above(1),
    "color_jitter": _below(0) | _above(1),
    "label_smoothing": _below(0) | st.floats(1.0, 1e9),
    "mixup": _below(0) | _above(10),
    "cutmix": _below(0) | _above(10),
    "lr": st.floats(-1e9, 0.0) | _above(1),
    "min_lr": _below(0),
    "weight_decay": _below(0) | _above(1),
    "warmup_epochs": _below(0) | st.floats(2.0, 1e9),  # epochs=2
    "layer_decay": st.floats(-1e9, 0.0) | _above(1),
    "clip_grad": st.floats(-1e9, 0.0),
    "epochs": st.integers(-10**30, 0) | st.integers(100_001, 10**30),
    "batch_size": st.integers(-10**30, 0) | st.integers(65_537, 10**30),
    "num_workers": st.integers(-10**30, -1) | st.integers(257, 10**30),
    "seed": st.integers(-10**30, -1) | st.integers(2**32, 10**30),
    "log_interval": st.integers(-10**30, 0),
    "img_size": st.integers(-10**30, 0) | st.integers(4097, 10**30),
    "depth": st.integers(-10**30, 0) | st.integers(13, 10**6),  # vit_tiny has 12 blocks
    "topk": st.integers(-10**30, 0),
    "max_train_batches": st.integers(-10**30, 0),
}


def _flag(key):
    return "--" + key.replace("_", "-")


def _wrong_type(key):
    """Values of another type than key's, YAML-representable (bools and numbers are distinct types)."""
    kind = HINTS[key]
    if typing.get_origin(kind) is typing.Union:
        kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
    text = st.text(max_size=8)
    lists = st.lists(st.integers(), min_size=1, max_size=3)
    maps = st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
    if kind is bool:
        return st.sampled_from(["false", "true", "no", "yes", "off", "0", "1", "False"]) | st.integers() | lists | maps
    if kind is int:
        return (st.floats(allow_nan=False, allow_infinity=False) | text | st.booleans() | lists | maps)
    if kind is float:
        return text | st.booleans() | lists | maps
    if kind is str:
        return st.integers() | st.booleans() | st.floats(allow_nan=False) | lists | maps | st.text(" \t", max_size=3)
    if typing.get_origin(kind) is tuple:
        return text | st.booleans() | maps | st.lists(text, min_size=1, max_size=2) | (
            st.floats(allow_nan=False) if key == "scale" else st.lists(st.floats(allow_nan=False), min_size=1, max_size=2))
    return st.integers() | text | lists  # attn: a mapping is expected


TYPED_KEYS = [k for k in TrainConfig.field_names()]


@st.composite
def wrong_typed(draw):
    key = draw(st.sampled_from(TYPED_KEYS))
    return key, draw(_wrong_type(key))


def _yaml_file(root: Path, mapping) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


# ------------------------------------------------------------------------------- numbers on the CLI
@SETTINGS
@given(key=st.sampled_from(FLOAT_FLAGS + ["scale"]), value=NON_FINITE, position=st.integers(0, 1))
def test_non_finite_numbers_on_the_command_line(capsys, key, value, position):
    with scratch() as root:
        if key == "scale":  # two values: argparse itself refuses a value that looks like an option (-inf), naming --scale
            last = refused(capsys, train(root, "--scale", *(["0.5", value] if position else [value, "0.5"])), "scale",
                           root=root)
            assert "scale=" not in last or "nan" in last or "inf" in last
        else:
            last = refused(capsys, train(root, f"{_flag(key)}={value}"), f"{key}=", root=root)
            assert "nan" in last or "inf" in last


@SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(OUT_OF_RANGE)))
def test_out_of_range_values_on_the_command_line(capsys, data, key):
    value = data.draw(OUT_OF_RANGE[key])
    with scratch() as root:
        refused(capsys, train(root, f"{_flag(key)}={value!r}"), f"{key}=", root=root)


@SETTINGS
@given(lr=st.floats(1e-6, 1e-2), factor=st.floats(1.0001, 100.0))
def test_min_lr_above_lr(capsys, lr, factor):
    with scratch() as root:
        refused(capsys, train(root, f"--lr={lr!r}", f"--min-lr={min(lr * factor, 1.0)!r}"), "min_lr=", "lr=", root=root)


@SETTINGS
@given(lo=st.floats(0.01, 1.0), hi=st.floats(0.01, 1.0))
def test_reversed_scale(capsys, lo, hi):
    if lo <= hi:
        lo, hi = hi + 1e-3, lo
    with scratch() as root:
        refused(capsys, train(root, "--scale", repr(lo), repr(hi)), "scale=", root=root)


# ------------------------------------------------------------------------------- wrong YAML types
# A tiny run as a config file: flags would override the file's values, so only --out is a flag.
TINY_YAML = {**SWEEP_FIXED, "num_workers": 0, "augment": "none", "topk": [1], "batch_size": 4, "epochs": 2,
             "warmup_epochs": 0.5, "max_train_batches": 2, "max_val_batches": 1}


@SETTINGS
@given(case=wrong_typed())
def test_wrong_types_in_a_train_config_file(capsys, case):
    key, value = case
    with scratch() as root:
        path = _yaml_file(root, {**TINY_YAML, key: value})
        refused(capsys, ["train", "--no-progress", "--config", path, "--out", root / "out"], f"{key}=", root=root)


@FEW
@given(case=wrong_typed())
def test_wrong_types_in_a_sweeps_fixed_values(capsys, case):
    key, value = case
    if key in ("variant", "seed"):
        return  # a sweep sets these with variants: and seeds:, and refuses them in fixed: with its own message
    with scratch() as root:
        path = _yaml_file(root, {"fixed": {**SWEEP_FIXED, key: value}})
        refused(capsys, sweep(root, path), f"{key}=", root=root)


@FEW
@given(key=st.sampled_from(FLOAT_FLAGS), value=st.sampled_from([".nan", ".inf", "-.inf", ".NaN", "1e999"]))
def test_non_finite_numbers_in_a_sweeps_fixed_values(capsys, key, value):
    with scratch() as root:
        path = root / "sweep.yaml"
        path.write_text(yaml.safe_dump({"fixed": SWEEP_FIXED}).rstrip("\n") + f"\n  {key}: {value}\n")
        refused(capsys, sweep(root, path), f"{key}=", root=root)


@SETTINGS
@given(document=st.lists(st.integers(), max_size=3) | st.text(max_size=10) | st.integers() | st.floats(allow_nan=False))
def test_a_config_file_that_is_not_a_mapping(capsys, document):
    with scratch() as root:
        path = _yaml_file(root, document)
        refused(capsys, train(root, "--config", path), "config.yaml", "must hold a mapping", root=root)


# --------------------------------------------------------------------------------- hostile YAML
def _alias_bomb(levels: int, fanout: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


@st.composite
def hostile_yaml(draw):
    """(file bytes, fragment of the message) of one hostile YAML file."""
    kind = draw(st.sampled_from(["alias", "deep", "big", "binary", "nul"]))
    if kind == "alias":
        return _alias_bomb(draw(st.integers(2, 9)), draw(st.integers(2, 9))).encode(), "aliases (*a0) are not allowed"
    if kind == "deep":
        depth = draw(st.integers(33, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return (opener * depth + "1" + closer * depth).encode(), "nesting deeper than 32 levels"
    if kind == "big":
        extra = draw(st.integers(1, 4096))
        return ("# " + "x" * ((1 << 20) + extra) + "\nepochs: 1\n").encode(), "is larger than 1024 KiB"
    if kind == "binary":
        head = draw(st.binary(max_size=64))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\x80", b"\xfe\xfe"]))
        return head + bad + draw(st.binary(max_size=64)), "is not UTF-8 text"
    head = draw(st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=32))
    return (head + "\x00" + "epochs: 1\n").encode(), "NUL bytes"


@SETTINGS
@given(case=hostile_yaml(), command=st.sampled_from(["train", "run"]))
def test_hostile_yaml_files(capsys, case, command):
    content, fragment = case
    with scratch() as root:
        path = root / "hostile.yaml"
        path.write_bytes(content)
        argv = train(root, "--config", path) if command == "train" else sweep(root, path)
        refused(capsys, argv, str(path), fragment, root=root)


@FEW
@given(levels=st.integers(3, 9), fanout=st.integers(2, 9))
def test_an_alias_bomb_in_an_attn_value(capsys, levels, fanout):
    bomb = "{" + _alias_bomb(levels, fanout).replace("\n", ", ").rstrip(", ") + "}"
    with scratch() as root:
        refused(capsys, train(root, "--variant", "linformer", "--attn", f"rank={bomb}"), "--attn", "aliases", root=root)


# ----------------------------------------------------------------------------------------- devices
ALLOWED_DEVICE = r"auto|cpu|cuda(:\d{1,3})?"


@st.composite
def bad_device(draw):
    import re

    import torch

    kind = draw(st.sampled_from(["text", "index", "negative", "name"]))
    if kind == "text":
        value = draw(st.text(max_size=10))
    elif kind == "index":  # an index this machine does not have
        value = f"cuda:{draw(st.integers(torch.cuda.device_count(), 999))}"
    elif kind == "negative":
        value = f"cuda:-{draw(st.integers(0, 99))}"
    else:
        value = draw(st.sampled_from(["gpu", "GPU", "cuda:abc", "cuda:", "cuda:1.5", "CPU", "tpu", "cuda0", "mps:0", " cpu"]))
    if re.fullmatch(ALLOWED_DEVICE, value) and not kind == "index":
        value = "gpu"
    return value


@SETTINGS
@given(device=bad_device())
def test_device_strings(capsys, device):
    with scratch() as root:
        refused(capsys, train(root, f"--device={device}"), f"device={device!r}", root=root)


# ---------------------------------------------------------------------------------------- --out
@SETTINGS
@given(out=st.text(" \t\r\n\x0b\x0c", max_size=4))
def test_an_empty_or_blank_out(capsys, out):
    with scratch() as root:
        argv = [a for a in train(root) if a != root / "out"]
        argv[-1] = f"--out={out}"
        refused(capsys, argv, "--out", repr(out), root=root)


@SETTINGS
@given(content=st.binary(max_size=256), under=st.booleans())
def test_an_out_that_is_a_file_or_under_a_file(capsys, content, under):
    with scratch() as root:
        (root / "out").write_bytes(content)
        argv = train(root)
        if under:
            argv[-1] = root / "out" / "sub"
        refused(capsys, argv, str(root / "out"), "file", root=root)


file_trees = st.dictionaries(
    st.text(st.characters(codec="ascii", categories=["Ll", "Nd"]), min_size=1, max_size=8),
    st.binary(max_size=128), min_size=1, max_size=5,
)


@SETTINGS
@given(tree=file_trees, hidden=st.booleans())
def test_an_out_that_holds_files_is_left_byte_identical(capsys, tree, hidden):
    with scratch() as root:
        out = root / "out"
        out.mkdir()
        for name, content in tree.items():
            (out / (("." if hidden else "") + name)).write_bytes(content)
        refused(capsys, train(root), "already holds files", "--resume", "--overwrite", root=root)


# ---------------------------------------------------------------------- a finished run: resume, overwrite
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run (the template copied by each case)."""
    root = tmp_path_factory.mktemp("finished")
    argv = [str(a) for a in train(root)]
    argv[argv.index("--epochs") + 1] = "1"
    argv[argv.index("--warmup-epochs") + 1] = "0"
    assert main(argv) == 0
    return root / "out", argv


# Non-resumable keys with another valid value (as flags), and their values in the message.
CHANGES = {
    "lr": (["--lr", "0.002"], "0.001", "0.002"),
    "batch_size": (["--batch-size", "2"], "4", "2"),
    "data": (["--data", "synthetic:classes=4,size=32,n=8,n_val=4"], SYNTH, "classes=4"),
    "seed": (["--seed", "7"], "0", "7"),
    "weight_decay": (["--weight-decay", "0.1"], "0.05", "0.1"),
    "label_smoothing": (["--label-smoothing", "0.1"], "0.0", "0.1"),
    "augment": (["--augment", "timm"], "'none'", "'timm'"),
    "hflip": (["--hflip", "0.25"], "0.5", "0.25"),
    "drop_path": (["--drop-path", "0.1"], "0.0", "0.1"),
    "variant": (["--variant", "performer"], "'softmax'", "'performer'"),
    "min_lr": (["--min-lr", "0"], "1e-06", "0.0"),
    "skip_bad_images": (["--skip-bad-images"], "False", "True"),
}


def _replace_flags(argv, flags):
    argv = list(argv)
    i = 0
    while i < len(flags):
        flag = flags[i]
        value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
        if flag in argv:
            j = argv.index(flag)
            if value is not None:
                argv[j + 1] = value
        else:
            argv[-2:-2] = [flag] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    return argv


@SETTINGS
@given(keys=st.lists(st.sampled_from(sorted(CHANGES)), min_size=1, max_size=3, unique=True))
def test_resume_with_a_changed_config_names_every_change(capsys, finished_run, keys):
    template, argv = finished_run
    with scratch() as root:
        shutil.copytree(template, root / "out")
        flags = [f for k in keys for f in CHANGES[k][0]]
        run = _replace_flags(argv, flags)
        run[run.index("--out") + 1] = str(root / "out")
        last = refused(capsys, [*run, "--resume"], "--resume: the config differs", root=root)
        for key in keys:
            _, old, new = CHANGES[key]
            assert f"{key} (checkpoint " in last and old in last and new in last, (key, last)


def test_resume_accepts_the_resumable_keys_and_refuses_fewer_epochs(capsys, finished_run, tmp_path):
    template, argv = finished_run
    out = tmp_path / "out"
    shutil.copytree(template, out)
    run = _replace_flags(argv, ["--epochs", "2", "--log-interval", "3", "--max-val-batches", "2"])
    run[run.index("--out") + 1] = str(out)
    assert main([*run, "--resume"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["history"]) == 2 and result["config"]["epochs"] == 2
    capsys.readouterr()
    again = _replace_flags(run, ["--epochs", "1"])
    refused(capsys, [*again, "--resume"], "epochs=1 is fewer than the 2 epochs", root=tmp_path)


def test_overwrite_moves_the_previous_run_aside_and_says_where(capsys, finished_run, tmp_path):
    template, argv = finished_run
    out = tmp_path / "out"
    shutil.copytree(template, out)
    before = snapshot(out)
    run = list(argv)
    run[run.index("--out") + 1] = str(out)
    # a bad value with --overwrite: refused before anything moves
    refused(capsys, [*_replace_flags(run, ["--lr", "nan"]), "--overwrite"], "lr=nan", root=tmp_path)
    assert main([*run, "--overwrite"]) == 0
    err = capsys.readouterr().err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and str(moved[0]) in err
    assert snapshot(moved[0]) == before
    assert (out / "result.json").is_file()
    assert len(list((out / "tb").rglob("*"))) == len(list((moved[0] / "tb").rglob("*")))  # one run's events each
    refused(capsys, [*run, "--resume", "--overwrite"], "not allowed with argument", root=tmp_path)


def test_the_train_path_never_imports_ray(tmp_path):
    """In a fresh interpreter: refusals and --help of `vitsweep train` leave Ray unimported."""
    script = textwrap.dedent(f"""
        import sys
        from orchestrator.cli import main
        base = {[str(a) for a in train(tmp_path)]!r}
        for extra in (["--lr", "nan"], ["--device", "gpu"], ["--config", {str(tmp_path / 'none.yaml')!r}]):
            assert main(base + extra) == 2
        assert "ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("ray"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------- data
def _image_folder(root: Path, classes, per_class=1) -> Path:
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            (root / "imgs" / split / c).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (8, 8), (40 * i, 10 * j, 0)).save(root / "imgs" / split / c / f"{j}.png")
    return root / "imgs"


names = st.text(st.characters(codec="ascii", categories=["Ll", "Nd"]), min_size=1, max_size=8)


@FEW
@given(name=names, per_class=st.integers(1, 3))
def test_one_class_data(capsys, name, per_class):
    with scratch() as root:
        imgs = _image_folder(root, [name], per_class)
        refused(capsys, train(root, data=f"imagefolder:{imgs}"), "1 class(es)", "needs at least 2", root=root)


@SETTINGS
@given(data=st.data(), key=st.sampled_from(["classes", "size", "n", "n_val", "seed"]))
def test_synthetic_options_out_of_range(capsys, data, key):
    from finetune.data.spec import SYNTHETIC_OPTIONS

    _, low, high = SYNTHETIC_OPTIONS[key]
    value = data.draw(st.integers(high + 1, 10**40) | (st.integers(0, low - 1) if low > 0 else st.nothing())
                      | st.sampled_from(["-1", "1.5", "x", "", "1e3"]))
    with scratch() as root:
        refused(capsys, train(root, data=f"synthetic:{key}={value}"), f"synthetic option {key}=", root=root)


@FEW
@given(depth=st.integers(0, 3), target=st.sampled_from(["self", "ancestor", "split", "root"]))
def test_symlink_loops_in_an_image_folder(capsys, depth, target):
    with scratch() as root:
        imgs = _image_folder(root, ["cat", "dog"])
        d = imgs / "train" / "dog"
        for i in range(depth):
            d = d / f"sub{i}"
            d.mkdir()
        link = d / ("loop.png" if target == "self" else "loop")
        link.symlink_to({"self": link, "ancestor": imgs / "train" / "dog", "split": imgs / "train", "root": imgs}[target])
        refused(capsys, train(root, data=f"imagefolder:{imgs}"), str(link), "symbolic link loop", root=root)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from finetune.data import build_cache

    root = tmp_path_factory.mktemp("cache")
    build_cache(SYNTH, root / "cache", size=32, num_workers=0)
    return root / "cache"


@FEW
@given(data=st.data())
def test_cache_labels_out_of_range(capsys, small_cache, data):
    from finetune.io_utils import sha256_file

    with scratch() as root:
        cache = root / "cache"
        shutil.copytree(small_cache, cache)
        manifest = json.loads((cache / "manifest.json").read_text())
        n = manifest["splits"]["train"]["count"]
        label = data.draw(st.integers(-2**62, -1) | st.integers(3, 2**62))
        index = data.draw(st.integers(0, n - 1))
        labels = np.load(cache / "train_labels.npy")
        labels[index] = label
        np.save(cache / "train_labels.npy", labels)
        entry = manifest["splits"]["train"]["labels"]
        entry.update(bytes=(cache / "train_labels.npy").stat().st_size, sha256=sha256_file(cache / "train_labels.npy"))
        (cache / "manifest.json").write_text(json.dumps(manifest))
        refused(capsys, train(root, data=f"cache:{cache}"), "train_labels.npy", f"label {label} at index {index}",
                root=root)


# ----------------------------------------------------------------------------------- image decoding
@SETTINGS
@given(values=st.lists(st.integers(0, 65535), min_size=1, max_size=64))
def test_16_bit_images_scale_to_8_bits(values):
    from finetune.data.images import to_rgb

    img = Image.fromarray(np.array([values], dtype=np.uint16))
    rgb = np.asarray(to_rgb(img))
    expected = np.rint(np.array(values) / 257).astype(np.uint8)
    assert rgb.shape == (1, len(values), 3) and (rgb == expected[None, :, None]).all()


@SETTINGS
@given(palette=st.lists(st.integers(0, 255), min_size=3 * 256, max_size=3 * 256),
       pixels=st.lists(st.integers(0, 255), min_size=1, max_size=32), alpha=st.booleans())
def test_palette_images_map_through_their_palette(palette, pixels, alpha):
    from finetune.data.images import to_rgb

    img = Image.new("P", (len(pixels), 1))
    img.putpalette(palette)
    img.putdata(pixels)
    if alpha:
        img = img.convert("PA")
    expected = [[palette[3 * p: 3 * p + 3] for p in pixels]]
    assert np.asarray(to_rgb(img)).tolist() == expected


@FEW
@given(side=st.integers(101, 400), limit=st.integers(1000, 10_000))
def test_decompression_bombs_name_the_file(side, limit):
    from finetune.data.images import is_decodable, load_rgb
    from finetune.errors import DataError

    with scratch() as root:
        path = root / "bomb.png"
        Image.new("L", (side, side)).save(path)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit  # side * side > limit
        try:
            with pytest.raises(DataError, match=r"bomb\.png'.*too many pixels"):
                load_rgb(str(path))
            assert not is_decodable(str(path))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@FEW
@given(fraction=st.floats(0.05, 0.9), fmt=st.sampled_from(["JPEG", "PNG"]))
def test_truncated_images_are_skipped_with_skip_bad_images(fraction, fmt):
    from finetune.data import Preprocessing, build_data
    from finetune.errors import DataError

    prep = Preprocessing((3, 8, 8), "bilinear", 1.0, "center", (0.5,) * 3, (0.5,) * 3, augment="none")
    with scratch() as root:
        imgs = _image_folder(root, ["cat", "dog"])
        path = imgs / "train" / "cat" / ("t.jpg" if fmt == "JPEG" else "t.png")
        noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: max(64, int(len(data) * fraction))])
        bundle = build_data(f"imagefolder:{imgs}", prep)
        index = [p for p, _ in bundle.train.samples].index(str(path))
        with pytest.raises(DataError, match=path.name):
            bundle.train[index]
        bundle = build_data(f"imagefolder:{imgs}", prep, skip_bad_images=True)
        assert bundle.skipped_images == 1 and len(bundle.train) == 2


# ---------------------------------------------------------------------------------- weights sidecar
@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    import torch

    from finetune.models import build_vit
    from finetune.weights import save_weight_dict

    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", 3, img_size=32, patch_size=4, depth=1)
    arch = dict(model="vit_tiny_patch16_224", variant="softmax", attn_hparams={}, img_size=32, patch_size=4, depth=1,
                num_classes=3)
    root = tmp_path_factory.mktemp("weights")
    save_weight_dict(model, root / "w.safetensors", {**arch, "lr": 1e-3}, metrics={"val/acc1": 0.5},
                     class_names=["a", "b", "c"])
    return root


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


@SETTINGS
@given(data=st.data())
def test_any_edit_of_the_sidecar_is_refused(saved_weights, data):
    from finetune.weights import load_weight_dict

    sidecar = json.loads((saved_weights / "w.json").read_text())
    paths = sorted(_leaves(sidecar), key=str)
    path = data.draw(st.sampled_from(paths))
    with scratch() as root:
        shutil.copy(saved_weights / "w.safetensors", root / "w.safetensors")
        edited = json.loads(json.dumps(sidecar))
        parent = edited
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            new = data.draw((st.integers() | st.text(max_size=8) | st.booleans() | st.none()).filter(
                lambda v: v != old or type(v) is not type(old)))
            parent[path[-1]] = new
        (root / "w.json").write_text(json.dumps(edited))
        with pytest.raises(WeightsError) as err:
            load_weight_dict(root / "w.safetensors")
        assert "w.json" in str(err.value) or "w.safetensors" in str(err.value)


@SETTINGS
@given(data=st.data())
def test_any_changed_byte_of_the_weights_is_refused(saved_weights, data):
    from finetune.weights import load_weight_dict

    content = bytearray((saved_weights / "w.safetensors").read_bytes())
    position = data.draw(st.integers(0, len(content) - 1))
    content[position] ^= data.draw(st.integers(1, 255))
    with scratch() as root:
        (root / "w.safetensors").write_bytes(bytes(content))
        shutil.copy(saved_weights / "w.json", root / "w.json")
        with pytest.raises(WeightsError, match=r"w\.safetensors'"):
            load_weight_dict(root / "w.safetensors")
