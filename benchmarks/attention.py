"""Speed and memory of the attention variants against SDPA, at ViT-S width (`vitsweep bench attention`).

For every token count N (a CLS token plus a square patch grid; default 197, 577, 3137, i.e. 224 px at
patch 16, 384 px at patch 16 and 224 px at patch 4; 1025 and 2305 are available through --tokens) and
every variant, forward + backward runs on a random batch at two scopes (``--scope``):

- ``layer``: one attention layer (qkv projection, the variant's core, output projection: exactly what
  swapping `attn_layer` changes in a ViT block), from x: [B, N, C].
- ``core``: the attention alone, from q, k, v: [B, H, N, D] already projected (contiguous), backward
  through q, k and v. Ours: the variant's `attend`. References: performer-pytorch's own
  `FastAttention`; linformer's `LinformerSelfAttention` and nystrom-attention's `NystromAttention` with
  their input and output projections replaced by identities (linformer: its to_q / to_k / to_v return
  q, k, v as [B, N, H D]; nystrom: its to_qkv passes [q, k, v] as one [B, N, 3 H D] input through,
  which it first pads to a multiple of the landmarks), so their own code path runs on the same q, k,
  v, including their own head split and merge.

Repeats are interleaved across variants (variant A, B, C, A, B, C, ...) so that drift in machine load
hits all of them alike; the median is reported, and every variant is also given as a ratio to
`softmax` (SDPA) at the same N and scope (``x SDPA``), and each of ours that has a reference package as
the ratio to it (``x ref``: reference median / ours, > 1 means ours is faster).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during forward + backward minus the memory held
before it (peak). On CPU there is no allocator peak to read, so the column is the bytes autograd
saves for the backward pass (distinct storages seen by ``saved_tensors_hooks``, parameters and the
input excluded): the activation memory a training step keeps, deterministic and independent of the
process's RSS history.

Side-by-side with the reference PyPI implementations (`linformer`, `performer-pytorch`,
`nystrom-attention`, at the same width, heads and hyperparameters; ``--no-reference`` skips them) when
they are importable; they are never imported by product code. Our layers have ViT's qkv bias (and
performer-pytorch is given one too); linformer's and nystrom-attention's q, k, v projections have no
bias, so ``--no-qkv-bias`` is the like-for-like layer comparison with those two.

Example (one thread, as BENCHMARKS.md measures)::

    python -m benchmarks.attention --batch 2 --repeats 7 --threads 1 --tokens 197 577 3137 \
        --variants softmax linformer performer nystrom
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from finetune.errors import AttentionConfigError
from finetune.models.attention import attention_layer, builtin_variants, get_attention_class
from finetune.models.attention.cost import attention_flops
from finetune.models.attention.flags import add_hparam_arguments

from benchmarks.output import check_bench_out, write_bench_json

DEFAULT_TOKENS = (197, 577, 3137)
SCOPES = ("layer", "core")
OUR_VARIANTS = builtin_variants()
# reference name: (PyPI module, our variant it mirrors)
REFERENCES = {
    "ref_linformer": ("linformer", "linformer"),
    "ref_performer": ("performer_pytorch", "performer"),
    "ref_nystrom": ("nystrom_attention", "nystrom"),
}


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    flops: Optional[int]  # analytic core FLOPs per image (ours, where the variant declares a cost)
    hparams: Dict  # the variant's hyperparameters, defaults filled in (references: ours they mirror)
    reference_of: Optional[str] = None  # references: the variant of ours they mirror


@dataclass
class Runner:
    """One timed unit: ``fn(*inputs)`` forward, then backward into `inputs` and `module`'s parameters."""

    module: torch.nn.Module
    fn: Callable[..., torch.Tensor]
    inputs: List[torch.Tensor]

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        for t in self.inputs:
            t.grad = None


def grid_for(tokens: int) -> int:
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise SystemExit(f"--tokens {tokens}: need 1 + a square number of patches (197 = 1 + 14^2, ...)")
    return side


def variant_hparams_from_args(variant: str, args: argparse.Namespace) -> Dict:
    """The hyperparameters given as flags that `variant` declares (the rest stay its defaults)."""
    cls = get_attention_class(variant)
    return cls.check_hparams({k: getattr(args, k) for k in cls.hparams if hasattr(args, k)})


def _our_case(variant: str, args: argparse.Namespace, tokens: int) -> Case:
    side = grid_for(tokens)
    hp = variant_hparams_from_args(variant, args)
    layer = attention_layer(variant, grid_size=(side, side), num_prefix_tokens=1, **hp)
    head_dim = args.dim // args.heads
    return Case(
        variant,
        lambda: layer(args.dim, num_heads=args.heads, qkv_bias=args.qkv_bias),
        attention_flops(variant, tokens, head_dim, args.heads, **hp),
        get_attention_class(variant).resolve_hparams(hp),
    )


def _reference_case(name: str, args: argparse.Namespace, tokens: int) -> Case:
    head_dim = args.dim // args.heads
    ours = REFERENCES[name][1]
    hp = get_attention_class(ours).resolve_hparams(variant_hparams_from_args(ours, args))
    if name == "ref_linformer":
        from linformer import LinformerSelfAttention

        build = lambda: LinformerSelfAttention(  # noqa: E731
            dim=args.dim, seq_len=tokens, k=hp["rank"], heads=args.heads, dim_head=head_dim
        )
    elif name == "ref_performer":
        from performer_pytorch import SelfAttention

        build = lambda: SelfAttention(  # noqa: E731
            dim=args.dim, heads=args.heads, dim_head=head_dim, nb_features=hp["features"], causal=False,
            qkv_bias=args.qkv_bias,  # as ours; linformer's and nystrom-attention's q, k, v have no bias at all
        )
    elif name == "ref_nystrom":
        from nystrom_attention import NystromAttention

        build = lambda: NystromAttention(  # noqa: E731
            dim=args.dim, dim_head=head_dim, heads=args.heads, num_landmarks=hp["landmarks"],
            pinv_iterations=hp["pinv_iterations"], residual=False,
        )
    else:
        raise KeyError(name)
    return Case(name, build, None, hp, reference_of=ours)


class _Given(torch.nn.Module):
    """Stands in for a reference's input projection in the core scope: returns the given tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tensor


def _runner(case: Case, module: torch.nn.Module, scope: str, x: torch.Tensor, qkv: List[torch.Tensor]) -> Runner:
    """The timed unit of `case` at `scope`: the whole layer on x, or its core on q, k, v."""
    if scope == "layer":
        return Runner(module, module, [x])
    q, k, v = qkv  # (B, H, N, D) each, contiguous leaves
    if case.reference_of is None:
        return Runner(module, module.attend, [q, k, v])
    if case.name == "ref_performer":
        return Runner(module, module.fast_attention, [q, k, v])  # performer-pytorch's own core
    # linformer / nystrom: no separable core; their module with the projections replaced (their own
    # split into heads, attention and merge run), fed the same q, k, v as [B, N, H D] tensors.
    B, H, N, D = q.shape
    flat = [t.detach().transpose(1, 2).reshape(B, N, H * D).requires_grad_(True) for t in (q, k, v)]
    module.to_out = torch.nn.Identity()
    if case.name == "ref_linformer":  # to_q, to_k, to_v (all of x) return q, k, v
        module.to_q, module.to_k, module.to_v = (_Given(t) for t in flat)
        x_shape = torch.empty(B, N, H * D, device=q.device)  # only its shape is read
        return Runner(module, lambda *_: module(x_shape), flat)
    # nystrom: to_qkv passes [q, k, v] through; it pads that input to a multiple of the landmarks
    packed = torch.cat([t.detach() for t in flat], dim=-1).requires_grad_(True)  # (B, N, 3 H D)
    module.to_qkv = torch.nn.Identity()
    return Runner(module, module, [packed])


def saved_bytes(runner: Runner) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters and inputs excluded)."""
    excluded = {p.untyped_storage().data_ptr() for p in runner.module.parameters()}
    excluded |= {t.untyped_storage().data_ptr() for t in runner.inputs}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.fn(*runner.inputs)
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(runner: Runner, autocast_dtype: Optional[torch.dtype]) -> None:
    device_type = runner.inputs[0].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = runner.fn(*runner.inputs)
    out.float().square().mean().backward()


def measure(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    references = [r for r in REFERENCES if args.reference and importlib.util.find_spec(REFERENCES[r][0]) is not None]
    scopes = list(SCOPES) if args.scope == "both" else [args.scope]
    head_dim = args.dim // args.heads
    results: List[Dict] = []
    for tokens in args.tokens:
        for scope in scopes:
            torch.manual_seed(0)
            cases = [_our_case(v, args, tokens) for v in args.variants]
            cases += [_reference_case(r, args, tokens) for r in references]
            x = torch.randn(args.batch, tokens, args.dim, device=device)  # layer: no grad into x (as before)
            qkv = [torch.randn(args.batch, args.heads, tokens, head_dim, device=device, requires_grad=True) for _ in range(3)]
            runners = {c.name: _runner(c, c.build().to(device), scope, x, qkv) for c in cases}
            times: Dict[str, List[float]] = {c.name: [] for c in cases}
            memory: Dict[str, int] = {}
            for name, runner in runners.items():  # warm-up (allocator, kernels) and memory, one variant at a time
                for _ in range(args.warmup):
                    step(runner, autocast_dtype)
                    runner.zero_grad()
                if device.type == "cuda":
                    _sync(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    step(runner, autocast_dtype)
                    _sync(device)
                    memory[name] = torch.cuda.max_memory_allocated(device) - base
                    runner.zero_grad()
                else:
                    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                        memory[name] = saved_bytes(runner)
            for _ in range(args.repeats):  # interleaved: every repeat visits every variant once
                for name, runner in runners.items():
                    _sync(device)
                    start = time.perf_counter()
                    step(runner, autocast_dtype)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
                    runner.zero_grad()
            medians = {name: statistics.median(ts) for name, ts in times.items()}
            base_name = "softmax" if "softmax" in times else next(iter(times))
            ref_of = {c.reference_of: c.name for c in cases if c.reference_of is not None}
            for case in cases:
                median = medians[case.name]
                ref = ref_of.get(case.name)
                results.append(
                    {
                        "tokens": tokens,
                        "scope": scope,
                        "variant": case.name,
                        "median_ms": 1e3 * median,
                        "min_ms": 1e3 * min(times[case.name]),
                        "times_ms": [1e3 * t for t in times[case.name]],
                        "speedup_vs_sdpa": medians[base_name] / median,
                        "reference": ref,
                        "speedup_vs_ref": None if ref is None else medians[ref] / median,
                        "memory_mb": memory[case.name] / 2**20,
                        "memory_ratio_vs_sdpa": memory[case.name] / max(memory[base_name], 1),
                        "core_gflops_per_image": None if case.flops is None else case.flops / 1e9,
                        "hparams": {k: list(v) if isinstance(v, tuple) else v for k, v in case.hparams.items()},
                    }
                )
            print(f"  N={tokens} {scope}: done", file=sys.stderr, flush=True)
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_kind": "cuda peak allocated" if device.type == "cuda" else "autograd-saved bytes (CPU)",
        "results": results,
    }


def format_table(report: Dict) -> str:
    """Markdown: one row per scope and variant; for each N the median, the speed-up over SDPA, the
    speed-up over the reference package (ours only, where one ran) and the memory (MB)."""
    rows = report["results"]
    tokens = sorted({r["tokens"] for r in rows})
    keys = list(dict.fromkeys((r.get("scope", "layer"), r["variant"]) for r in rows))
    by = {(r.get("scope", "layer"), r["variant"], r["tokens"]): r for r in rows}
    mem = "peak MB" if report["device"].startswith("cuda") else "saved MB"
    lines = [
        "| scope | variant | " + " | ".join(f"N={n}: ms (x SDPA, x ref) / {mem}" for n in tokens) + " |",
        "|---|---|" + "---|" * len(tokens),
    ]
    for scope, v in keys:
        cells = []
        for n in tokens:
            r = by.get((scope, v, n))
            if r is None:
                cells.append("-")
                continue
            ref = r.get("speedup_vs_ref")
            ratios = f"{r['speedup_vs_sdpa']:.2f}x" + ("" if ref is None else f", {ref:.2f}x ref")
            cells.append(f"{r['median_ms']:.1f} ({ratios}) / {r['memory_mb']:.0f}")
        lines.append(f"| {scope} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vitsweep bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                   help="sequence lengths, each 1 + a square (default 197 577 3137; 1025, 2305, ... also work)")
    p.add_argument("--scope", choices=("layer", "core", "both"), default="both",
                   help="layer: qkv + core + proj from x [B, N, C]; core: the attention alone from q, k, v "
                        "[B, H, N, D], references on their own code path (default: both)")
    p.add_argument("--variants", nargs="+", default=list(OUR_VARIANTS), metavar="VARIANT",
                   help=f"built-in ({', '.join(OUR_VARIANTS)}) or plug-in import paths 'package.module:ClassName'")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=384, help="embedding width (ViT-S: 384)")
    p.add_argument("--heads", type=int, default=6, help="heads (ViT-S: 6, head width 64)")
    p.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="bias in our qkv projection (ViT's, the default) and in performer-pytorch's; the linformer "
                        "and nystrom-attention references have none: --no-qkv-bias compares their layers bias-free")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed, interleaved repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_hparam_arguments(p.add_argument_group("variant hyperparameters (unset: each variant's default)"))
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the PyPI reference packages")
    p.add_argument("--out", help="write the full report (all timings) as JSON here")
    args = p.parse_args(argv)
    if args.out:
        args.out = str(check_bench_out(args.out))
    for n in args.tokens:
        grid_for(n)
    for variant in args.variants:
        try:
            variant_hparams_from_args(variant, args)
        except AttentionConfigError as err:
            p.error(str(err))
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report = measure(args)
    print(f"device: {report['device_name']} ({report['device']}, {report['threads']} threads), torch {report['torch']}, "
          f"batch {args.batch}, dim {args.dim}, heads {args.heads}, {args.precision}; memory: {report['memory_kind']}")
    print(format_table(report))
    if args.out:
        write_bench_json(args.out, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
