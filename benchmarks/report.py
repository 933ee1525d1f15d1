#!/usr/bin/env python3
"""Turns Google Benchmark JSON output of peak_bench / gemm_bench / layer_bench into a markdown
table and PNG charts.

    gemm_bench --benchmark_format=json --benchmark_out=gemm.json ...
    python3 benchmarks/report.py gemm.json [layer.json ...] --out report

writes report.md, report_gemm.png and report_layer.png (matplotlib when it is installed, e.g.
Debian's python3-matplotlib; gnuplot otherwise; tables only when neither is there).

Two rates are shown for every benchmark:
  * "wall": GFLOP/s of wall-clock time (the counter GFLOPS);
  * "cpu": GFLOP per second of process CPU time summed over threads (counter GFLOP / cpu_time,
    the benchmarks use MeasureProcessCPUTime), i.e. per core-second: the efficiency of the
    cycles the benchmark got. On a shared machine the wall rate depends on the other load; the
    cpu rate much less (spin-waiting OpenMP threads count as busy: OMP_WAIT_POLICY=passive
    leaves them out).
Every rate is the median of all measurements of that benchmark in the given files (repetitions
and separate runs are pooled). Percentages are of the peaks measured in the same files
(peak_fp32_fma / peak_bf16_dot, threads:1): wall rate / (threads * wall peak per core), cpu rate / cpu peak per core.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict, defaultdict

TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def load(paths):
    """Benchmark entries by name. All measurements of one benchmark are pooled, whether they
    are repetitions of one run or come from several JSON files (runs at different times on a
    shared machine): the entry is the measured run with the median wall time. Google
    Benchmark's own aggregates are ignored, so that pooling does not weight files unevenly."""
    pooled = OrderedDict()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            if b.get("error_occurred") or b.get("run_type") == "aggregate":
                continue
            pooled.setdefault(b.get("run_name", b["name"]), []).append(b)
    return OrderedDict((name, median_run(runs)) for name, runs in pooled.items())


def median_run(runs):
    """The run with the median wall time (the lower middle one of an even count)."""
    def seconds(b):
        return b["real_time"] * TIME_UNIT_SECONDS[b.get("time_unit", "ns")]

    ordered = sorted(runs, key=seconds)
    entry = dict(ordered[(len(ordered) - 1) // 2])
    entry["samples"] = len(ordered)
    return entry


def fields(name):
    """'gemm/switchmoe/fp32/m:256/k:512/.../real_time' -> (['gemm','switchmoe','fp32'], {m:256})."""
    plain, args = [], {}
    for part in name.split("/"):
        if ":" in part:
            key, value = part.split(":", 1)
            args[key] = value
        elif part not in ("real_time", "process_time", "manual_time"):
            plain.append(part)
    return plain, args


def rates(b):
    """(wall GFLOP/s, cpu GFLOP/s) of one benchmark entry."""
    wall = b.get("GFLOPS")
    cpu = None
    gflop = b.get("GFLOP")
    if gflop is not None and b.get("cpu_time"):
        cpu = gflop / (b["cpu_time"] * TIME_UNIT_SECONDS[b.get("time_unit", "ns")])
    return wall, cpu


def peaks(runs):
    """{'fp32': (wall, cpu), 'bf16': (wall, cpu)} per core, from the threads:1 peak runs."""
    result = {}
    for name, b in runs.items():
        plain, args = fields(name)
        if plain and plain[0] in ("peak_fp32_fma", "peak_bf16_dot") and args.get("threads") == "1":
            result["fp32" if "fp32" in plain[0] else "bf16"] = rates(b)
    return result


def pct(rate, peak, threads):
    if rate is None or not peak:
        return "-"
    return "%.0f%%" % (100.0 * rate / (peak * threads))


def fmt(x):
    return "-" if x is None else "%.1f" % x


OPS = {"0": "fwd C=A*W", "1": "dA=dC*W^T", "2": "dW+=A^T*dC"}


def gemm_section(runs, peak):
    rows = defaultdict(dict)  # (op, m, k, n, threads, precision) -> impl -> entry
    batch = []
    for name, b in runs.items():
        plain, args = fields(name)
        if not plain:
            continue
        if plain[0] in ("gemm", "gemm_packed", "gemm_portable") and "m" in args:
            impl = plain[1] if plain[0] == "gemm" else plain[0].replace("gemm_", "")
            if plain[0] == "gemm_portable":
                impl, precision = "portable", plain[1]
            else:
                precision = plain[2]
            key = (args.get("op", "0"), int(args["m"]), int(args["k"]), int(args["n"]),
                   int(args["threads"]), precision)
            rows[key][impl] = b
        elif plain[0] == "gemm_batch":
            batch.append((plain[2], args, b))
    if not rows and not batch:
        return [], []
    lines = ["## GEMM (switchmoe::kernels vs Eigen fp32)", ""]
    if peak:
        lines.append("Measured peak per core: " + ", ".join(
            "%s %s GFLOP/s wall, %s per CPU-second" % (p, fmt(v[0]), fmt(v[1]))
            for p, v in sorted(peak.items())) + ".")
        lines.append("")
    lines += ["| op | m | k | n | thr | prec | impl | GFLOP/s wall | % peak wall | "
              "GFLOP/s cpu | % peak cpu |",
              "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    chart = []
    for key in sorted(rows):
        op, m, k, n, threads, precision = key
        for impl in ("switchmoe", "packed", "eigen", "portable"):
            b = rows[key].get(impl)
            if b is None:
                continue
            wall, cpu = rates(b)
            p = peak.get(precision, (None, None))
            lines.append("| %s | %d | %d | %d | %d | %s | %s | %s | %s | %s | %s |" % (
                OPS.get(op, op), m, k, n, threads, precision, impl, fmt(wall),
                pct(wall, p[0], threads), fmt(cpu), pct(cpu, p[1], 1)))
            if impl in ("switchmoe", "eigen"):
                chart.append(("%s %dx%dx%d" % (OPS.get(op, op).split()[0], m, k, n),
                              "%s %s %dthr" % (impl, precision, threads),
                              cpu if cpu is not None else wall,
                              # the cpu rate is already per core (per CPU-second)
                              (p[1] if cpu is not None else (p[0] or 0) * threads) or None))
    if batch:
        lines += ["", "gemm_batch over experts with skewed token counts (one parallel loop):", "",
                  "| prec | experts | tokens | k | n | thr | GFLOP/s wall | GFLOP/s cpu |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for precision, args, b in batch:
            wall, cpu = rates(b)
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                precision, args["experts"], args["tokens"], args["k"], args["n"],
                args["threads"], fmt(wall), fmt(cpu)))
    return lines + [""], chart


def layer_section(runs):
    table = defaultdict(dict)  # (precision, pass, d_model, d_ff, tokens, threads, experts) -> kind
    for name, b in runs.items():
        plain, args = fields(name)
        if len(plain) < 4 or plain[0] != "layer":
            continue
        kind, precision, pass_ = plain[1], plain[2], plain[3]
        base = (precision, pass_, int(args["d_model"]), int(args["d_ff"]), int(args["tokens"]),
                int(args["threads"]))
        if kind == "dense_same_flops":
            table[base]["dense_same_flops"] = b
        else:
            table[base + (int(args["experts"]),)][kind] = b
    if not table:
        return [], []
    lines = ["## SwitchLayer vs DenseFFN", "",
             "Useful GFLOP/s count the expert matmuls of kept token choices only. Dense same "
             "FLOPs: d_ff of one expert; same params: d_ff x experts.", "",
             "| prec | pass | d_model | d_ff | tokens | thr | experts | kept | switch tok/s | "
             "switch GFLOP/s wall | switch GFLOP/s cpu | dense same FLOPs tok/s | "
             "dense same params tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    chart = []
    for key in sorted(k for k in table if len(k) == 7):
        entry = table[key]
        switch = entry.get("switch")
        if switch is None:
            continue
        same_flops = table.get(key[:6], {}).get("dense_same_flops")
        same_params = entry.get("dense_same_params")
        wall, cpu = rates(switch)
        tok = lambda b: None if b is None else b.get("tokens_per_s")
        lines.append("| %s | %s | %d | %d | %d | %d | %d | %.3f | %s | %s | %s | %s | %s |" % (
            key + (switch.get("kept", 1.0),
                   "%.0f" % tok(switch), fmt(wall), fmt(cpu),
                   "-" if same_flops is None else "%.0f" % tok(same_flops),
                   "-" if same_params is None else "%.0f" % tok(same_params))))
        chart.append((key, tok(switch), tok(same_flops), tok(same_params)))
    return lines + [""], chart


def bandwidth(runs):
    """Memory read GB/s of all threads together, per thread count, from peak_mem_read."""
    result = {}
    for name, b in runs.items():
        plain, args = fields(name)
        if plain and plain[0] == "peak_mem_read" and "GBs" in b:
            threads = int(args.get("threads", 1))
            result[threads] = b["GBs"] * threads
    return result


def targets_section(runs, peak):
    """The speed targets of issue #4, computed from the layer benchmarks of the same run."""
    time = {}  # (kind, precision, pass, d_model, d_ff, tokens, threads, experts) -> seconds
    rate = {}
    for name, b in runs.items():
        plain, args = fields(name)
        if len(plain) < 4 or plain[0] != "layer":
            continue
        key = (plain[1], plain[2], plain[3], int(args["d_model"]), int(args["d_ff"]),
               int(args["tokens"]), int(args["threads"]), int(args.get("experts", 1)))
        time[key] = b["real_time"] * TIME_UNIT_SECONDS[b.get("time_unit", "ns")]
        rate[key] = b.get("GFLOPS")
    if not time:
        return []
    samples = sorted({b.get("samples", 1) for b in runs.values()})
    counts = "-".join(str(n) for n in (samples[:1] + samples[-1:] if len(samples) > 1 else samples))
    lines = ["## Issue #4 targets", "",
             "Wall-clock rates, each the median of %s measurements; percentages of the 2-core "
             "peak measured in the same runs." % counts, "",
             "| target | measured | goal |", "|---|---:|---:|"]

    def pct_of_peak(key):
        precision, threads = key[1], key[6]
        if key not in rate or precision not in peak or rate[key] is None:
            return None
        return 100.0 * rate[key] / (peak[precision][0] * threads)

    main = ("switch", "fp32", "fwd", 768, 3072, 2048, 2, 8)
    value = pct_of_peak(main)
    if value is not None:
        lines.append("| fp32 forward, 768x3072, 8 experts, 2048 tokens, 2 threads: %% of peak "
                     "| %.1f%% | >= 80%% |" % value)
    value = pct_of_peak(main[:2] + ("fwdbwd",) + main[3:])
    if value is not None:
        lines.append("| fp32 forward+backward, same problem: %% of peak | %.1f%% | >= 70%% |"
                     % value)
    for pass_ in ("fwd", "fwdbwd"):
        fp32 = main[:2] + (pass_,) + main[3:]
        bf16 = (main[0], "bf16", pass_) + main[3:]
        if fp32 in time and bf16 in time:
            lines.append("| bf16 / fp32 throughput, %s | %.2fx | >= 1.8x |"
                         % (pass_, time[fp32] / time[bf16]))
    for precision in ("fp32", "bf16"):
        switch = ("switch", precision, "fwd") + main[3:]
        dense = ("dense_same_flops", precision, "fwd") + main[3:7] + (1,)
        if switch in time and dense in time:
            lines.append("| %s forward time, Switch (8 experts) / DenseFFN same FLOPs | %.2fx "
                         "| <= 1.10x |" % (precision, time[switch] / time[dense]))
    gbs = bandwidth(runs)
    for key in sorted(k for k in time if k[0] == "switch" and k[2] == "fwd" and k[7] == 128):
        eight = key[:7] + (8,)
        if eight not in time:
            continue
        note = ""
        if key[6] in gbs:
            element_bytes = 4 if key[1] == "fp32" else 2
            weight_bytes = 128 * 2 * key[3] * key[4] * element_bytes
            floor = weight_bytes * 1e-9 / gbs[key[6]]
            note = " (streaming the %.2f GB of expert weights at %.1f GB/s alone: %.2fx)" % (
                weight_bytes * 1e-9, gbs[key[6]], floor / time[eight])
        lines.append("| %s forward time per token, 128 / 8 experts, %dx%d, %d tokens, %d "
                     "threads | %.2fx%s | <= 1.2x |"
                     % (key[1], key[3], key[4], key[5], key[6], time[key] / time[eight], note))
    return lines + [""]


def plot_matplotlib(gemm_chart, layer_chart, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    if gemm_chart:
        shapes = list(OrderedDict.fromkeys(c[0] for c in gemm_chart))
        series = list(OrderedDict.fromkeys(c[1] for c in gemm_chart))
        values = {(c[0], c[1]): (100.0 * c[2] / c[3] if c[3] else c[2]) for c in gemm_chart}
        fig, ax = plt.subplots(figsize=(min(24, max(8, 0.1 * len(shapes) * len(series))), 5.5))
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            ax.bar([x + i * width for x in range(len(shapes))],
                   [values.get((shape, s), 0.0) for shape in shapes], width, label=s)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("% of measured peak per core (per CPU-second)")
        ax.set_title("GEMM efficiency")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out + "_gemm.png", dpi=120)
        written.append(out + "_gemm.png")
    if layer_chart:
        groups = defaultdict(list)
        for key, switch, flops, params in layer_chart:
            precision, pass_, d_model, d_ff, tokens, threads, experts = key
            groups[(precision, pass_, d_model, d_ff, tokens, threads)].append(
                (experts, switch, flops, params))
        keys = sorted(groups)
        cols = min(4, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip([a for r in axes for a in r], keys):
            points = sorted(groups[key])
            xs = [p[0] for p in points]
            ax.plot(xs, [p[1] for p in points], "o-", label="switch")
            ax.plot(xs, [p[2] for p in points], "s--", label="dense same FLOPs")
            sp = [(p[0], p[3]) for p in points if p[3]]
            if sp:
                ax.plot([p[0] for p in sp], [p[1] for p in sp], "^:", label="dense same params")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title("%s %s %dx%d\n%d tok, %d thr" % key, fontsize=8)
            ax.set_xlabel("experts", fontsize=8)
            ax.set_ylabel("tokens/s", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in [a for r in axes for a in r][len(keys):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out + "_layer.png", dpi=110)
        written.append(out + "_layer.png")
    return written


def plot_gnuplot(gemm_chart, layer_chart, out):
    written = []
    if gemm_chart:
        shapes = list(OrderedDict.fromkeys(c[0] for c in gemm_chart))
        series = list(OrderedDict.fromkeys(c[1] for c in gemm_chart))
        values = {(c[0], c[1]): (100.0 * c[2] / c[3] if c[3] else c[2]) for c in gemm_chart}
        data = out + "_gemm.dat"
        with open(data, "w") as f:
            f.write("shape " + " ".join('"%s"' % s for s in series) + "\n")
            for shape in shapes:
                f.write('"%s" ' % shape + " ".join(
                    "%.2f" % values.get((shape, s), 0.0) for s in series) + "\n")
        script = "\n".join([
            "set terminal pngcairo size 1400,600" if "pngcairo" in _gnuplot_terminals()
            else "set terminal png size 1400,600",
            'set output "%s_gemm.png"' % out,
            "set style data histograms", "set style histogram clustered gap 1", "set yrange [0:*]",
            "set style fill solid border -1", "set key autotitle columnheader below",
            "set xtics rotate by -60 font ',7'",
            'set ylabel "% of measured peak per core (per CPU-second)"',
            'set title "GEMM efficiency"',
            "plot " + ", ".join('"%s" using %d:xtic(1)' % (data, i + 2)
                                for i in range(len(series)))])
        subprocess.run(["gnuplot"], input=script.encode(), check=True)
        os.remove(data)
        written.append(out + "_gemm.png")
    if layer_chart:
        data = out + "_layer.dat"
        blocks = defaultdict(list)
        for key, switch, flops, params in layer_chart:
            blocks[key[:6]].append((key[6], switch, flops, params))
        with open(data, "w") as f:
            for key in sorted(blocks):
                f.write("# %s\n" % (key,))
                for experts, *rates in sorted(blocks[key], key=lambda p: p[0]):
                    # A file holding only some series (e.g. only the Switch layer): gnuplot
                    # skips NaN points.
                    f.write("%d %s\n" % (experts, " ".join(
                        "NaN" if r is None else "%g" % r for r in rates)))
                f.write("\n\n")
        keys = sorted(blocks)
        cols = min(4, len(keys))
        rows = (len(keys) + cols - 1) // cols
        lines = ["set terminal png size %d,%d" % (350 * cols, 280 * rows),
                 'set output "%s_layer.png"' % out,
                 "set multiplot layout %d,%d" % (rows, cols),
                 "set logscale xy", "set key font ',7'", "set tics font ',7'"]
        for i, key in enumerate(keys):
            lines.append('set title "%s %s %dx%d, %d tok, %d thr" font ",8"' % key)
            lines.append('plot "%s" index %d using 1:2 with linespoints title "switch", '
                         '"" index %d using 1:3 with linespoints title "dense same FLOPs", '
                         '"" index %d using 1:($4>0?$4:1/0) with linespoints '
                         'title "dense same params"' % (data, i, i, i))
        lines.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(lines).encode(), check=True)
        os.remove(data)
        written.append(out + "_layer.png")
    return written


def _gnuplot_terminals():
    try:
        return subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True,
                              text=True).stderr
    except OSError:
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="--benchmark_format=json outputs")
    parser.add_argument("--out", default="report", help="output prefix (default: report)")
    parser.add_argument("--plotter", choices=("auto", "matplotlib", "gnuplot", "none"),
                        default="auto", help="chart backend (default: matplotlib, else gnuplot)")
    args = parser.parse_args()
    runs = load(args.json)
    peak = peaks(runs)
    gemm_lines, gemm_chart = gemm_section(runs, peak)
    layer_lines, layer_chart = layer_section(runs)
    lines = ["# switchmoe benchmarks", ""]
    context = None
    for path in args.json:
        with open(path) as f:
            context = json.load(f).get("context", context)
    if context:
        lines += ["%s, %s CPUs at %s MHz, host %s." % (
            context.get("date", "?"), context.get("num_cpus", "?"),
            context.get("mhz_per_cpu", "?"), context.get("host_name", "?")), ""]
    gbs = bandwidth(runs)
    if gbs:
        lines += ["Memory read bandwidth: " + ", ".join(
            "%.1f GB/s with %d thread%s" % (gbs[t], t, "s" if t > 1 else "")
            for t in sorted(gbs)) + ".", ""]
    lines += targets_section(runs, peak) + gemm_lines + layer_lines
    written = []
    plotter = args.plotter
    if plotter == "auto":
        try:
            import matplotlib  # noqa: F401
            plotter = "matplotlib"
        except ImportError:
            plotter = "gnuplot" if shutil.which("gnuplot") else "none"
            if plotter == "none":
                print("report.py: neither matplotlib nor gnuplot found; no charts",
                      file=sys.stderr)
    if plotter == "matplotlib":
        written = plot_matplotlib(gemm_chart, layer_chart, args.out)
    elif plotter == "gnuplot":
        written = plot_gnuplot(gemm_chart, layer_chart, args.out)
    for png in written:
        lines += ["![%s](%s)" % (os.path.basename(png), os.path.basename(png)), ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("wrote", ", ".join([args.out + ".md"] + written))


if __name__ == "__main__":
    main()
