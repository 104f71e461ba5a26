"""One table of bad inputs across the CLI, sweep config files, search spaces, data sources, weights and
checkpoints, each driven through the real command line (`orchestrator.cli.main`).

Every row must: exit with code 2, print a message on stderr that names the bad value and what is
allowed (the fragments), start no Ray, and leave no partial output (the output path does not exist,
or the directory given is byte-for-byte unchanged). One row, an image file that is not an image, is
only found when training reads it: there the run fails naming the file and writes no result or weights.

Bad inputs tested elsewhere, not repeated here: `vitsweep train` flags (test_cli.py BAD), more sweep
ranges and presets (test_orchestrator_cli.py), the malicious pickle at the model level (test_models.py).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import write_sweep_yaml
from PIL import Image

from orchestrator.cli import main

TRAIN = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--patch-size", "4",
         "--depth", "2", "--num-workers", "0", "--augment", "none", "--no-progress", "--epochs", "1", "--topk", "1",
         "--batch-size", "2"]
SYNTH = ["--data", "synthetic:classes=4,size=32,n=16,n_val=8"]


class Case:
    """`build(tmp)` makes the inputs and returns (argv, the output path that must stay as it was)."""

    def __init__(self, name, build, *fragments, found_in_training=False):
        self.name, self.build, self.fragments, self.found_in_training = name, build, fragments, found_in_training


def _yaml(tmp: Path, body: str, **fixed) -> str:
    return write_sweep_yaml(tmp, body, **{"epochs": 1, **fixed})


def _not_a_mapping(tmp: Path) -> str:
    path = tmp / "sweep.yaml"
    path.write_text("- softmax\n")
    return str(path)


def _run(tmp: Path, *args: str):
    storage = tmp / "storage"
    return ["run", *args, "--storage", str(storage), "--num-cpus", "2"], storage


def _train(tmp: Path, *args: str, data=SYNTH):
    out = tmp / "out"
    return [*TRAIN, *data, *args, "--out", str(out)], out


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_weights(tmp: Path):
    path = tmp / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Evil(tmp / "pwned")}, fh)
    return _train(tmp, "--weights", str(path))


def _truncated_safetensors(tmp: Path):
    from safetensors.torch import save_file
    import torch

    path = tmp / "weights.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    return _train(tmp, "--weights", str(path))


def _pickle_named_safetensors(tmp: Path):
    path = tmp / "model.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    return _train(tmp, "--weights", str(path))


def _hf_labels_beyond_classes(tmp: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = [Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)) for i in range(4)]
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 5]}, features=features)
    # a ClassLabel cast does not range-check, so an out-of-range label can reach disk
    split = split.cast_column("label", datasets.ClassLabel(names=["apple", "pear"]))
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp / "ds"))
    return _train(tmp, data=["--data", f"hf:{tmp / 'ds'}"])


def _not_an_image(tmp: Path):
    for split in ("train", "val"):
        for i, cls in enumerate(("cat", "dog")):
            (tmp / "imgs" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp / "imgs" / split / cls / "ok.png")
    (tmp / "imgs" / "train" / "dog" / "ok.png").unlink()
    (tmp / "imgs" / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return _train(tmp, data=["--data", f"imagefolder:{tmp / 'imgs'}"])


def _checkpoint(tmp: Path, meta: str):
    (tmp / "out" / "checkpoint").mkdir(parents=True)
    (tmp / "out" / "checkpoint" / "meta.json").write_text(meta)
    return [*TRAIN, *SYNTH, "--out", str(tmp / "out"), "--resume"], tmp / "out"


def _experiment(tmp: Path, with_marker: bool):
    exp = tmp / "exp"
    exp.mkdir()
    (exp / "notes.txt").write_text("not a sweep")
    if with_marker:
        (exp / "vitsweep_experiment.json").write_text(json.dumps({"format": "vitsweep-experiment", "spec": {}}))
    return exp


CASES = [
    # --- command line
    Case("cli: gpus per trial beyond the machine",
         lambda t: _run(t, "--preset", "smoke", "--gpus-per-trial", "1", "--num-gpus", "0"),
         "gpus per trial=1", "cluster has 0 GPU", "lower --gpus-per-trial"),
    Case("cli: negative --max-failures", lambda t: _run(t, "--preset", "smoke", "--max-failures", "-2"),
         "max_failures=-2", "integer >= 0 (or -1: retry forever)"),
    Case("cli: data show --n 0", lambda t: (["data", "show", "--data", "synthetic", "--out", str(t / "g.png"),
                                             "--n", "0"], t / "g.png"), "--n=0", ">= 1"),
    # --- sweep config files
    Case("config: misspelt TrainConfig key", lambda t: _run(t, "--config", _yaml(t, "", epocs=2)),
         "'epocs'", "did you mean 'epochs'"),
    Case("config: misspelt sweep key", lambda t: _run(t, "--config", _yaml(t, "schedular: asha\n")),
         "'schedular'", "did you mean 'scheduler'", "allowed: name, fixed, search"),
    Case("config: not a mapping", lambda t: _run(t, "--config", _not_a_mapping(t)),
         "expected a mapping at the top level", "['softmax']"),
    Case("config: not YAML", lambda t: _run(t, "--config", _yaml(t, "search: {lr: [0.1\n")),
         "sweep.yaml' is not valid YAML", "expected ',' or ']'"),
    # --- search spaces
    Case("space: unknown domain kind", lambda t: _run(t, "--config", _yaml(t, "search: {lr: {gird: [0.1]}}\n")),
         "unknown domain 'gird'", "did you mean 'grid'", "allowed: grid, choice, uniform, loguniform, randint"),
    Case("space: topk beyond the class count", lambda t: _run(t, "--preset", "smoke", "--set", "topk=[1,11]"),
         "k=11", "10 classes", "allowed: 1..10"),
    Case("space: dilation that does not fit the grid",
         lambda t: _train(t, "--variant", "atrous_linear", "--dilation", "1", "4", "--window", "3"),
         "window=3 at dilation rate 4 spans 9 patches", "8x8 grid", "(window - 1) * rate + 1 <= 8"),
    # --- data sources
    Case("data: synthetic with 0 classes", lambda t: _train(t, data=["--data", "synthetic:classes=0"]),
         "classes=0", "must be >= 2"),
    Case("data: labels beyond the class count", _hf_labels_beyond_classes,
         "label 5 at row 3", "outside 0..1"),
    Case("data: cache into a non-empty directory",
         lambda t: ((t / "cache").mkdir() or (t / "cache" / "keep.txt").write_text("mine")) and
         (["data", "cache", "--data", "synthetic:classes=2,size=8,n=4,n_val=2", "--out", str(t / "cache")], t / "cache"),
         "cache'", "already exists and is not empty", "remove it or choose another"),
    Case("data: an image that is not an image", _not_an_image, "broken.jpg", found_in_training=True),
    # --- weights
    Case("weights: truncated safetensors", _truncated_safetensors,
         "weights.safetensors' is not a readable safetensors file"),
    Case("weights: a pickle passed as weights", _pickle_weights,
         "evil.pth", "refused to unpickle arbitrary objects with weights_only=True"),
    Case("weights: a pickle named .safetensors", _pickle_named_safetensors,
         "model.safetensors' is not a readable safetensors file"),
    # --- checkpoints and experiments
    Case("checkpoint: resume of a run that does not exist",
         lambda t: ([*TRAIN, *SYNTH, "--out", str(t / "out"), "--resume"], t / "out"),
         "--resume:", "out' does not exist; there is no run to continue"),
    Case("checkpoint: resume without a checkpoint",
         lambda t: ((t / "out" / "tb").mkdir(parents=True) or
                    ([*TRAIN, *SYNTH, "--out", str(t / "out"), "--resume"], t / "out")),
         "checkpoint' is not a vitsweep checkpoint: meta.json is missing"),
    Case("checkpoint: foreign checkpoint", lambda t: _checkpoint(t, '{"format": "other"}'),
         "is not a vitsweep checkpoint (format='other'"),
    Case("checkpoint: corrupt meta.json", lambda t: _checkpoint(t, '{"format": "vitsweep-chec'),
         "meta.json'", "corrupt", "Unterminated string"),
    Case("experiment: resume of a non-experiment dir", lambda t: (["resume", str(_experiment(t, False))], t / "exp"),
         "is not a vitsweep experiment", "vitsweep_experiment.json is missing"),
    Case("experiment: resume before any Tune state", lambda t: (["resume", str(_experiment(t, True))], t / "exp"),
         "has a vitsweep marker but no Tune state to resume"),
    Case("experiment: report of an empty experiment", lambda t: (["report", str(_experiment(t, True))], t / "exp"),
         "holds no trials"),
]


def _snapshot(path: Path):
    """Every file under `path` with its bytes (None when the path does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_naming_the_value_and_leaves_nothing(case, tmp_path, capsys):
    argv, output = case.build(tmp_path)
    before = _snapshot(output)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejections
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in case.fragments:
        assert fragment in err, (fragment, err)
    assert not ray.is_initialized(), "Ray was started before the input was refused"
    assert not (tmp_path / "pwned").exists(), "a pickle was executed"
    if case.found_in_training:
        # the run had started (its logs are there) but wrote no result and no weights
        assert not (output / "result.json").exists() and not (output / "weights.safetensors").exists()
        assert not list(output.glob("**/*.tmp"))
    else:
        assert _snapshot(output) == before, f"{output} was changed"


def test_the_table_is_broad():
    areas = {c.name.split(":")[0] for c in CASES}
    assert areas == {"cli", "config", "space", "data", "weights", "checkpoint", "experiment"}
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)
