"""QAT benchmark: float vs PTQ vs QAT (frozen / learned binary points) vs K-hot on the digits models,
and the training step time of QAT against float training of the same graph.

    python benchmarks/bench_qat.py                 # everything, writes benchmarks/qat_results.md
    python benchmarks/bench_qat.py --models cnn --configs 4/4/8 --epochs 5 --seeds 0 1 --out /tmp/x.md
    python benchmarks/bench_qat.py --steps-only --out /tmp/steps.md   # the step-time table only (issue 12)

One intra-op thread throughout (the models are tiny: more threads only add synchronisation, and
the timings stay meaningful on a shared machine). Every accuracy is the exact float64 fixed-point
forward pass. PTQ calibrates on 512 training images with ``mse``; each QAT run starts from that
PTQ model and follows the tool's protocol: 10 % of the 1437 training images (stratified, drawn
from the run's seed) are set aside for validation, the epoch with the best validation accuracy is
kept, and the 360-image test split is evaluated once, on that model. Each setting runs with
several seeds (seed = split and batch order); the table gives mean +- sample std over seeds and
the learned - frozen difference paired by seed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qat_step import resnet20_fixed, resnet20_float, step_times  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "models" / "digits.npz"
CONFIGS = ["8/8/8", "8/8/6", "6/6/8", "6/6/6", "4/4/8", "4/4/6"]  # weight/act/elementwise bits


def ptq_model(name: str, x_calib: torch.Tensor, w: int, a: int, e: int):
    policy = Policy(weight_bits=w, act_bits=a, elementwise_bits=e)
    return quantize_graph(load_onnx(ROOT / "models" / f"{name}.onnx"), [x_calib], policy, method="mse")


def qat(model, train, test, epochs: int, learn: bool, lr: float, seed: int, val_fraction: float) -> dict:
    """One QAT run under the tool's protocol: select on validation, then test once."""
    t0 = time.perf_counter()
    cfg = FinetuneConfig(epochs=epochs, batch_size=64, lr=lr, learn_binary_points=learn, seed=seed,
                         val_fraction=val_fraction)
    result = finetune(copy.deepcopy(model), train, test, cfg)
    return {"test": result.final["accuracy"], "val": result.validation["accuracy"], "epoch": result.best_epoch,
            "moved": len(result.moved_binary_points()), "seconds": time.perf_counter() - t0}


def over_seeds(model, train, test, args, learn: bool, epochs: int) -> list[dict]:
    return [qat(model, train, test, epochs, learn, args.lr, seed, args.val_fraction) for seed in args.seeds]


STEP_MODES = ["float", "qat", "frozen", "float_compiled", "qat_compiled", "torch_float", "brevitas"]


def step_rows(models: list[str], batches: list[int], modes: list[str], device: str, steps: int, repeats: int,
              x_calib: torch.Tensor, train: ArrayDataset) -> list[dict]:
    """Step times (benchmarks/qat_step.py) of each model and batch size: one dict per row."""
    rows = []
    for name in models:
        gen = torch.Generator().manual_seed(0)
        if name == "resnet20":
            fixed, float_module = resnet20_fixed(torch.randn(64, 3, 32, 32, generator=gen)), resnet20_float()
            shape, classes = (3, 32, 32), 10
        else:
            fixed, float_module = ptq_model(name, x_calib, 8, 8, 8), None
            shape, classes = tuple(train.x.shape[1:]), 10
        fixed.to(device)
        for batch in batches:
            xs = [torch.randn((batch, *shape), generator=gen).to(device) for _ in range(steps)]
            ys = [torch.randint(0, classes, (batch,), generator=gen).to(device) for _ in range(steps)]
            if name != "resnet20":  # the real digits, as many batches as there are
                xs = [train.x[(i * batch) % 1024:][:batch].to(device) for i in range(steps)]
                ys = [train.y[(i * batch) % 1024:][:batch].to(device) for i in range(steps)]
            print(f"{name} batch {batch} on {device}:", flush=True)
            times = step_times(fixed, xs, ys, modes, repeats, float_module=float_module.to(device) if float_module else None)
            rows.append({"model": name, "batch": batch, "device": device, "casts": len(fixed.quantizers()), **times})
            print(f"  {_step_line(rows[-1])}", flush=True)
    return rows


def _step_line(row: dict) -> str:
    ratios = {k: v / row["float"] for k, v in row.items() if k in STEP_MODES and k != "float"}
    if "float_compiled" in row and "qat_compiled" in row:
        ratios["qat_compiled/float_compiled"] = row["qat_compiled"] / row["float_compiled"]
    if "torch_float" in row and "brevitas" in row:
        ratios["brevitas/torch_float"] = row["brevitas"] / row["torch_float"]
    return f"float {1e3 * row['float']:.1f} ms; " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())


STEP_TARGETS = {("resnet20", "qat"): 1.4, ("cnn", "qat"): 1.8, ("resnet20", "qat_compiled"): 1.15, ("cnn", "qat_compiled"): 1.3}


def render_steps(rows: list[dict]) -> str:
    """Markdown: ms per step of each mode and the ratios to the float step (compiled QAT also to
    the compiled float step), with the issue-12 targets."""
    lines = ["| model | casts | batch | device | float ms | QAT eager | frozen BP | float compiled | QAT compiled | "
             "QAT compiled / float compiled | native float / our float | QAT / our float | Brevitas / native float |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(mode: str, base: str = "float") -> str:
            if mode not in r or base not in r:
                return "-"
            ratio = r[mode] / r[base]
            goal = STEP_TARGETS.get((r["model"], mode))
            mark = "" if goal is None else (f" (<= {goal}: met)" if ratio <= goal else f" (<= {goal}: NOT met)")
            return f"{ratio:.2f}x{mark}"
        comp = cell("qat_compiled", "float_compiled")
        lines.append(f"| {r['model']} | {r['casts']} | {r['batch']} | {r['device']} | {1e3 * r['float']:.1f} | {cell('qat')} | "
                     f"{cell('frozen')} | {cell('float_compiled')} | {cell('qat_compiled')} | {comp} | "
                     f"{cell('torch_float')} | {cell('qat')} | {cell('brevitas', 'torch_float')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--khot-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--khot", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--khot-bits", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--steps-only", action="store_true", help="Only the step-time table (no accuracy runs).")
    parser.add_argument("--step-models", nargs="+", default=["cnn", "resnet20"])
    parser.add_argument("--step-batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--step-modes", nargs="+", default=STEP_MODES, choices=STEP_MODES)
    parser.add_argument("--step-device", default="cpu")
    parser.add_argument("--step-count", type=int, default=10, help="Steps per timed run.")
    parser.add_argument("--step-repeats", type=int, default=5, help="Interleaved timed runs per mode (median).")
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
    if args.steps_only:
        rows = step_rows(args.step_models, args.step_batches, args.step_modes, args.step_device, args.step_count,
                         args.step_repeats, x_calib, train)
        text = render_steps(rows)
        print(text)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        args.out.write_text(text)
        return
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
            row["frozen"] = over_seeds(model, train, test, args, learn=False, epochs=args.epochs)
            row["learned"] = over_seeds(model, train, test, args, learn=True, epochs=args.epochs)
            rows[spec] = row
            print(f"{name} {spec}: ptq {row['ptq']:.4f} frozen {_tests(row['frozen'])} learned {_tests(row['learned'])} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        for k in args.khot:
            b = args.khot_bits
            model = ptq_model(name, x_calib, b, b, b)
            to_khot(model, k)
            row = {"ptq": evaluate(model, test)["accuracy"],
                   "learned": over_seeds(model, train, test, args, learn=True, epochs=args.khot_epochs)}
            rows[f"khot{k}"] = row
            print(f"{name} K={k}: projection {row['ptq']:.4f} learned {_tests(row['learned'])}", flush=True)
        if args.json:  # partial results survive an interrupted run
            args.json.write_text(json.dumps({**results, "seconds": time.perf_counter() - start,
                                             "args": _plain(vars(args))}, indent=1))
        if not args.no_timing:
            row = step_rows([name], [64], ["float", "frozen", "qat"], "cpu", 30, 5, x_calib, train)[0]
            results["timing"][name] = {"float32": {k: row[k] for k in ("float", "frozen", "qat")}}
    results["seconds"] = time.perf_counter() - start
    results["args"] = _plain(vars(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    args.out.write_text(render(results, args))
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


def _plain(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def _tests(runs: list[dict]) -> str:
    return " ".join(f"{r['test']:.4f}" for r in runs)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float]) -> str:
    """Mean +- sample std of fractions, in percent."""
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def compare(frozen: list[dict], learned: list[dict]) -> dict:
    """Learned - frozen test accuracy, paired by seed: mean, std, wins/ties/losses and a verdict.
    "yes" only when learned beats frozen with every seed; "no" when it is not better on average;
    otherwise "mixed"."""
    diffs = [le["test"] - fr["test"] for fr, le in zip(frozen, learned)]
    mean, std = _mean_std(diffs)
    wins, ties = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
    verdict = "yes" if wins == len(diffs) else ("no" if mean <= 0 else "mixed")
    return {"mean": mean, "std": std, "wins": wins, "ties": ties, "losses": len(diffs) - wins - ties, "verdict": verdict}


def targets(results: dict, args) -> list[str]:
    """Each target with the measured numbers (mean over seeds of the test accuracy of the epoch
    selected on validation) and whether it is met."""
    out = []
    for name, rows in results["models"].items():
        for spec in [c for c in args.configs if c.startswith("4/4/") and c in rows]:
            gap = 100 * (rows["float"] - _mean_std([r["test"] for r in rows[spec]["learned"]])[0])
            out.append(f"{name} {spec} learned-BP QAT within 1 point of float (float - QAT, mean over seeds): {gap:+.2f} "
                       f"({'met' if gap <= 1 else 'NOT met'})")
        if "khot2" in rows:
            gap = 100 * (rows["float"] - _mean_std([r["test"] for r in rows["khot2"]["learned"]])[0])
            out.append(f"{name} K=2 within 1.5 points of float (float - QAT, mean over seeds): {gap:+.2f} "
                       f"({'met' if gap <= 1.5 else 'NOT met'})")
    for name, t in results["timing"].items():
        ratio = t["float32"]["qat"] / t["float32"]["float"]
        out.append(f"{name} QAT step <= 1.5x float step (float32 training): {ratio:.2f}x ({'met' if ratio <= 1.5 else 'NOT met'})")
    return out


def render(results: dict, args) -> str:
    seeds = ", ".join(map(str, args.seeds))
    n_seeds = len(args.seeds)
    lines = ["# QAT results (digits, 360-image test split)", "",
             f"`python benchmarks/bench_qat.py` on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"1 thread, {results['seconds'] / 60:.1f} min in all. Accuracy in %, exact float64 fixed-point pass. "
             f"QAT: {args.epochs} epochs, Adam lr {args.lr} (binary points 30x), cosine, global batch 64, "
             f"seeds {seeds} ({n_seeds} runs per cell; the seed draws the validation split and the batch order). "
             f"Protocol: {100 * args.val_fraction:g} % of the 1437 training images (stratified by class) are held out "
             "for validation; the epoch with the best validation accuracy is kept, ties going to the lower validation "
             "loss (epoch 0 = the PTQ model; validation accuracy is 100 % for most runs, so the loss decides); the "
             "test split is evaluated once, on that model, and is never used for selection. Cells: test accuracy, "
             "mean ± sample std over seeds. One test image is 0.28 points. "
             "W/A/E = weight / activation / element-wise (BatchNorm, residual add, pooling, constants) bits; "
             "biases 16 bits (aligned to the product LSB). `learned - frozen`: difference paired by seed, "
             "mean ± std, and seeds won / tied / lost by learned binary points; `better?` is yes only when "
             "learned wins with every seed, no when it is not better on average, mixed otherwise. "
             "`moved` = tensors whose binary point changed (mean over seeds).", ""]
    for name, rows in results["models"].items():
        skipped = [c for c in args.configs if c not in rows] + [f"K={k}" for k in args.khot if f"khot{k}" not in rows]
        if skipped:
            lines += [f"Not run for {name} (to keep the run within the time at hand): {', '.join(skipped)}.", ""]
    if not results["timing"]:
        lines += ["Step times were not measured in this run (`--no-timing`); see `benchmarks/README.md`.", ""]
    lines += ["| model | W/A/E | float | PTQ | QAT frozen BP | QAT learned BP | learned - frozen | W/T/L | better? | moved |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for spec in args.configs:
            if spec not in rows:
                continue
            r = rows[spec]
            fr, le = r["frozen"], r["learned"]
            c = compare(fr, le)
            moved = statistics.fmean(x["moved"] for x in le)
            lines.append(f"| {name} | {spec} | {_pct(rows['float'])} | {_pct(r['ptq'])} | {_pm([x['test'] for x in fr])} | "
                         f"{_pm([x['test'] for x in le])} | {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} | "
                         f"{c['wins']}/{c['ties']}/{c['losses']} | {c['verdict']} | {moved:.1f} |")
    if args.khot:
        b = args.khot_bits
        lines += ["", f"K-hot weights at {b}/{b}/{b} bits, per-tensor binary points (weights only; BatchNorm scales "
                      f"stay plain {b}-bit), {args.khot_epochs} epochs of learned-BP QAT, same protocol and seeds:", "",
                  "| model | K | float | K-hot projection of PTQ | K-hot QAT (test) | QAT - float |", "|---|---|---|---|---|---|"]
        for name, rows in results["models"].items():
            for k in args.khot:
                r = rows.get(f"khot{k}")
                if r:
                    tests = [x["test"] for x in r["learned"]]
                    lines.append(f"| {name} | {k} | {_pct(rows['float'])} | {_pct(r['ptq'])} | {_pm(tests)} | "
                                 f"{100 * (_mean_std(tests)[0] - rows['float']):+.2f} |")
    lines += ["", "Validation accuracy of the selected epoch and the epoch selected (mean over seeds; validation "
                  "is 144 images, one image = 0.69 points):", "",
              "| model | setting | frozen BP val | frozen BP epoch | learned BP val | learned BP epoch |", "|---|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for key, r in rows.items():
            if not isinstance(r, dict):
                continue
            label = f"K={key[4:]}" if key.startswith("khot") else key
            fr = r.get("frozen")
            cells = (f"{_pm([x['val'] for x in fr])} | {statistics.fmean(x['epoch'] for x in fr):.1f}" if fr else "- | -")
            le = r["learned"]
            lines.append(f"| {name} | {label} | {cells} | {_pm([x['val'] for x in le])} | "
                         f"{statistics.fmean(x['epoch'] for x in le):.1f} |")
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
