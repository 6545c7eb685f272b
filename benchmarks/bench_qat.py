"""QAT benchmark: float vs PTQ vs QAT (frozen / learned binary points) vs K-hot on the digits models,
and the training step time of QAT against float training of the same graph.

    python benchmarks/bench_qat.py                 # everything, writes benchmarks/qat_results.md
    python benchmarks/bench_qat.py --models cnn --configs 4/4/8 --epochs 5 --out /tmp/x.md

One intra-op thread throughout (the models are tiny: more threads only add synchronisation, and
the timings stay meaningful on a shared machine). Every accuracy is the exact float64 fixed-point
forward pass on the 360-image test split. PTQ calibrates on 512 training images with ``mse``;
each QAT run starts from that PTQ model. ``best`` is the epoch selected on the test split (what
``qfx-onnx finetune`` does by default, so optimistic), ``last`` the final epoch (unbiased).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qfx_onnx.data import ArrayDataset, load_arrays
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx.train import FinetuneConfig, evaluate, finetune
from qfx_onnx.train.prepare import to_khot

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "models" / "digits.npz"
CONFIGS = ["8/8/8", "8/8/6", "6/6/8", "6/6/6", "4/4/8", "4/4/6"]  # weight/act/elementwise bits


def ptq_model(name: str, x_calib: torch.Tensor, w: int, a: int, e: int):
    policy = Policy(weight_bits=w, act_bits=a, elementwise_bits=e)
    return quantize_graph(load_onnx(ROOT / "models" / f"{name}.onnx"), [x_calib], policy, method="mse")


def qat(model, train, test, epochs: int, learn: bool, lr: float, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    cfg = FinetuneConfig(epochs=epochs, batch_size=64, lr=lr, learn_binary_points=learn, seed=seed)
    result = finetune(copy.deepcopy(model), train, test, cfg)
    return {"best": result.final["accuracy"], "last": result.history[-1]["eval_accuracy"],
            "moved": len(result.moved_binary_points()), "seconds": time.perf_counter() - t0}


def step_times(name: str, x_calib, train: ArrayDataset, batch: int = 64, steps: int = 30, repeats: int = 5) -> dict:
    """Median seconds per training step (forward, backward, Adam): casts off (``float``), casts on
    with frozen binary points (``frozen``) and casts on with learned binary points (``qat``)."""
    model = ptq_model(name, x_calib, 8, 8, 8)
    out = {}
    for dtype in (torch.float32, torch.float64):
        net = copy.deepcopy(model).to(dtype).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        xs = [train.x[i * batch:(i + 1) * batch] for i in range(steps)]
        ys = [train.y[i * batch:(i + 1) * batch] for i in range(steps)]

        def run() -> float:
            t = time.perf_counter()
            for xb, yb in zip(xs, ys):
                loss = F.cross_entropy(net(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return (time.perf_counter() - t) / steps

        samples: dict[str, list[float]] = {"qat": [], "frozen": [], "float": []}
        for _ in range(repeats):  # interleaved, so that machine load hits every mode alike
            for mode in samples:
                net.set_casts_enabled(mode != "float")
                for quant in net.quantizers().values():
                    quant.frac.requires_grad_(mode == "qat")  # frozen: no frac gradient, Adam skips it
                run()  # warm-up of this mode
                samples[mode].append(run())
        key = str(dtype).removeprefix("torch.")
        out[key] = {mode: statistics.median(v) for mode, v in samples.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--khot-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--khot", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--khot-bits", type=int, default=8)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "qat_results.md")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw results here.")
    parser.add_argument("--render", type=Path, default=None, help="Only re-render --out from a --json file.")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        args.out.write_text(render(results, argparse.Namespace(**{**vars(args), **results["args"], "out": args.out})))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()

    x, y = load_arrays(DATA, "train")
    xt, yt = load_arrays(DATA, "test")
    train, test = ArrayDataset(x, y, "train"), ArrayDataset(xt, yt, "test")
    x_calib = x[:512]
    results: dict = {"models": {}, "timing": {}}
    for name in args.models:
        rows = results["models"][name] = {}
        float_model = ptq_model(name, x_calib, 8, 8, 8)
        float_model.set_casts_enabled(False)
        rows["float"] = evaluate(float_model, test)["accuracy"]
        print(f"{name}: float {rows['float']:.4f}", flush=True)
        for spec in args.configs:
            w, a, e = (int(v) for v in spec.split("/"))
            model = ptq_model(name, x_calib, w, a, e)
            row = {"ptq": evaluate(model, test)["accuracy"]}
            row["frozen"] = qat(model, train, test, args.epochs, learn=False, lr=args.lr)
            row["learned"] = qat(model, train, test, args.epochs, learn=True, lr=args.lr)
            rows[spec] = row
            print(f"{name} {spec}: ptq {row['ptq']:.4f} frozen {row['frozen']} learned {row['learned']}", flush=True)
        for k in args.khot:
            b = args.khot_bits
            model = ptq_model(name, x_calib, b, b, b)
            to_khot(model, k)
            row = {"ptq": evaluate(model, test)["accuracy"],
                   "learned": qat(model, train, test, args.khot_epochs, learn=True, lr=args.lr)}
            rows[f"khot{k}"] = row
            print(f"{name} K={k}: projection {row['ptq']:.4f} learned {row['learned']}", flush=True)
        if not args.no_timing:
            results["timing"][name] = step_times(name, x_calib, train)
            print(f"{name} step times {results['timing'][name]}", flush=True)
    results["seconds"] = time.perf_counter() - start
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    args.out.write_text(render(results, args))
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def targets(results: dict, args) -> list[str]:
    """Each target with the measured numbers and whether it is met."""
    out = []
    for name, rows in results["models"].items():
        for spec in [c for c in args.configs if c.startswith("4/4/") and c in rows]:
            le = rows[spec]["learned"]
            gap_best, gap_last = 100 * (rows["float"] - le["best"]), 100 * (rows["float"] - le["last"])
            out.append(f"{name} {spec} learned-BP QAT within 1 point of float (float - QAT): best epoch {gap_best:+.2f} "
                       f"({'met' if gap_best <= 1 else 'NOT met'}), last epoch {gap_last:+.2f} "
                       f"({'met' if gap_last <= 1 else 'NOT met'})")
        if "khot2" in rows:
            le = rows["khot2"]["learned"]
            gap_best, gap_last = 100 * (rows["float"] - le["best"]), 100 * (rows["float"] - le["last"])
            out.append(f"{name} K=2 within 1.5 points of float (float - QAT): best epoch {gap_best:+.2f} "
                       f"({'met' if gap_best <= 1.5 else 'NOT met'}), last epoch {gap_last:+.2f} ({'met' if gap_last <= 1.5 else 'NOT met'})")
    for name, t in results["timing"].items():
        ratio = t["float32"]["qat"] / t["float32"]["float"]
        out.append(f"{name} QAT step <= 1.5x float step (float32 training): {ratio:.2f}x ({'met' if ratio <= 1.5 else 'NOT met'})")
    return out


def render(results: dict, args) -> str:
    lines = ["# QAT results (digits test split, 360 images)", "",
             f"`python benchmarks/bench_qat.py` on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"1 thread, {results['seconds'] / 60:.1f} min in all. Accuracy in %, exact float64 fixed-point pass. "
             f"QAT: {args.epochs} epochs, Adam lr {args.lr} (binary points 30x), cosine, global batch 64, seed 0. "
             "W/A/E = weight / activation / element-wise (BatchNorm, residual add, pooling, constants) bits; "
             "biases 16 bits (aligned to the product LSB). `best` = epoch chosen on the test split (the tool's "
             "default, optimistic), `last` = final epoch. `moved` = tensors whose binary point changed.", ""]
    lines += ["| model | W/A/E | float | PTQ | QAT frozen BP best / last | QAT learned BP best / last | moved | learned - float (best) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for spec in args.configs:
            if spec not in rows:
                continue
            r = rows[spec]
            fr, le = r["frozen"], r["learned"]
            lines.append(f"| {name} | {spec} | {_pct(rows['float'])} | {_pct(r['ptq'])} | {_pct(fr['best'])} / {_pct(fr['last'])} | "
                         f"{_pct(le['best'])} / {_pct(le['last'])} | {le['moved']} | {100 * (le['best'] - rows['float']):+.2f} |")
    if args.khot:
        b = args.khot_bits
        lines += ["", f"K-hot weights at {b}/{b}/{b} bits, per-tensor binary points (weights only; BatchNorm scales "
                      f"stay plain {b}-bit), {args.khot_epochs} epochs of learned-BP QAT:", "",
                  "| model | K | float | K-hot projection of PTQ | K-hot QAT best / last | QAT - float (best) |", "|---|---|---|---|---|---|"]
        for name, rows in results["models"].items():
            for k in args.khot:
                r = rows.get(f"khot{k}")
                if r:
                    le = r["learned"]
                    lines.append(f"| {name} | {k} | {_pct(rows['float'])} | {_pct(r['ptq'])} | {_pct(le['best'])} / {_pct(le['last'])} | "
                                 f"{100 * (le['best'] - rows['float']):+.2f} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(results, args)]
    if results["timing"]:
        lines += ["", "Training step time (forward + backward + Adam, batch 64, median of 5 interleaved runs of 30 steps), "
                      "QAT with every cast against float training of the same graph with casts off (the same process; "
                      "the machine was shared, so absolute times are noisy, the interleaving keeps ratios fair); "
                      "`frozen BP` casts every tensor but learns no binary point. See `benchmarks/README.md` for "
                      "where the remaining time goes.", "",
                  "| model | dtype | float step (ms) | QAT frozen BP step (ms) | QAT step (ms) | frozen BP ratio | QAT ratio |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in results["timing"].items():
            for dtype, v in t.items():
                frozen = v.get("frozen")
                cells = (f"{1e3 * frozen:.1f} | ", f"{frozen / v['float']:.2f}x | ") if frozen else ("- | ", "- | ")
                lines.append(f"| {name} | {dtype} | {1e3 * v['float']:.1f} | {cells[0]}{1e3 * v['qat']:.1f} | "
                             f"{cells[1]}{v['qat'] / v['float']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
