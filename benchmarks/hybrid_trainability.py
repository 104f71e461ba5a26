"""Trainability of atrous_linear from scratch and fine-tuned from a softmax model, on CPU, seeded.

A 2-block vit_tiny at 32 px (patch 4) on 320 synthetic-shape training images (200 for validation):
softmax trained 3 epochs (lr 1e-3), atrous_linear trained 3 epochs from scratch (same recipe), and
atrous_linear given the softmax weights and fine-tuned 2 epochs (lr 3e-4). Prints the validation
acc@1 after each epoch and at the swap. Run the same file against an older checkout to compare
designs on identical seeds (BENCHMARKS.md, "The hybrid in every regime")::

    python benchmarks/hybrid_trainability.py new
    git archive 946ca54 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/hybrid_trainability.py old
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from finetune.data.synthetic import SyntheticShapes
from finetune.models import build_vit


def _tensors(split: str, n: int):
    ds = SyntheticShapes(n, 10, 32, seed=0, split=split)
    xs = torch.stack([torch.from_numpy(np.asarray(ds[i][0], dtype=np.float32)).permute(2, 0, 1) / 255.0 for i in range(n)])
    ys = torch.tensor([int(ds[i][1]) for i in range(n)])
    return (xs - 0.5) / 0.25, ys  # (n, 3, 32, 32), (n,)


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _train(model, data, epochs: int, lr: float):
    (xtr, ytr), (xva, yva) = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    accs, loss = [], None
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 32):
            idx = perm[i : i + 32]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs.append(_accuracy(model, xva, yva))
    return accs, float(loss.detach())


def main(tag: str = "") -> None:
    torch.set_num_threads(1)
    data = (_tensors("train", 320), _tensors("val", 200))
    kw = dict(img_size=32, patch_size=4, depth=2)
    torch.manual_seed(0)
    softmax = build_vit("vit_tiny_patch16_224", 10, variant="softmax", **kw)
    sm_accs, _ = _train(softmax, data, 3, 1e-3)
    torch.manual_seed(0)
    scratch = build_vit("vit_tiny_patch16_224", 10, variant="atrous_linear", **kw)
    sc_accs, sc_loss = _train(scratch, data, 3, 1e-3)
    torch.manual_seed(1)
    tuned = build_vit("vit_tiny_patch16_224", 10, variant="atrous_linear", **kw)
    tuned.load_state_dict(softmax.state_dict(), strict=False)  # the random-feature buffer stays fresh
    swap = _accuracy(tuned, *data[1])
    ft_accs, ft_loss = _train(tuned, data, 2, 3e-4)
    print(f"{tag} softmax {sm_accs} | atrous scratch {sc_accs} last loss {sc_loss:.5f} | "
          f"swap {swap} fine-tuned {ft_accs} last loss {ft_loss:.5f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
