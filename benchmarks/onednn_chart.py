#!/usr/bin/env python3
"""Draws the README's switchmoe-against-oneDNN chart and table from onednn_bench runs.

    OMP_WAIT_POLICY=passive build/benchmarks/onednn_bench --reps 11 \\
        --tokens 1,8,64,512,2048 --json run1.json            # repeat: run2.json, run3.json
    OMP_NUM_THREADS=1 build/benchmarks/onednn_bench --reps 11 --tokens 1,8,64 --json one.json
    python3 benchmarks/onednn_chart.py run1.json run2.json run3.json one.json \\
        --out benchmarks/results/onednn_ratio

writes onednn_ratio.md (the table: per precision and thread count, the range of the runs'
ratios at each token count) and onednn_ratio.png (the same ratios against tokens per call, one
line through the median of the runs per precision and thread count, bars from the lowest to the
highest run; below 1 switchmoe is faster). Each input file is one run of the program, whose
ratio per case is already the median over its interleaved repetitions (switchmoe time /
oneDNN time). Only the "onednn" variant is drawn (not the experts-per-thread one). Charts use
gnuplot (Debian's gnuplot-nox); without it only the table is written.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict


def load(paths):
    """{(precision, threads): {tokens: [ratio of each run]}} of the plain oneDNN variant."""
    ratios = defaultdict(lambda: defaultdict(list))
    runs = defaultdict(set)  # (precision, threads): the files that measured it
    shapes = set()
    for path in paths:
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            sys.exit("onednn_chart.py: %s is not an onednn_bench --json file" % path)
        for r in records:
            if r.get("variant") != "onednn":
                continue
            if "threads" not in r:
                sys.exit("onednn_chart.py: %s has no thread count (an older onednn_bench)" % path)
            shapes.add((r["experts"], r["d_model"], r["d_ff"]))
            key = (r["precision"], r["threads"])
            ratios[key][r["tokens"]].append(r["ratio"])
            runs[key].add(path)
    if len(shapes) > 1:
        sys.exit("onednn_chart.py: the runs have different shapes %s" % sorted(shapes))
    return ratios, {key: len(files) for key, files in runs.items()}, (
        shapes.pop() if shapes else None)


def series_order(key):
    precision, threads = key
    return (-threads, precision != "fp32", precision)


def label(key):
    precision, threads = key
    return "%s, %d thread%s" % (precision, threads, "s" if threads > 1 else "")


def table(ratios, run_counts, tokens):
    lines = ["| tokens per call | " + " | ".join(str(t) for t in tokens) + " |",
             "| --- |" + " --- |" * len(tokens)]
    for key in sorted(ratios, key=series_order):
        runs = run_counts[key]
        cells = []
        for t in tokens:
            values = ratios[key].get(t)
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append("%.2f" % values[0])
            else:
                cells.append("%.2f-%.2f" % (min(values), max(values)))
        lines.append("| %s (%d run%s) | %s |" % (label(key), runs, "s" if runs > 1 else "",
                                                 " | ".join(cells)))
    return lines


def plot(ratios, shape, out):
    data = out + ".dat"
    keys = sorted(ratios, key=series_order)
    with open(data, "w") as f:
        for key in keys:
            f.write("# %s\n" % label(key))
            for t in sorted(ratios[key]):
                v = ratios[key][t]
                f.write("%d %.4f %.4f %.4f\n" % (t, statistics.median(v), min(v), max(v)))
            f.write("\n\n")
    all_tokens = sorted({t for key in keys for t in ratios[key]})
    every = [x for key in keys for v in ratios[key].values() for x in v]
    lowest, highest = min(every), max(every)
    title = "switchmoe time / oneDNN time, MoE forward"
    if shape:
        title += " (%d experts, %d x %d, top-1)" % shape
    lines = [
        "set terminal png size 900,520",
        'set output "%s.png"' % out,
        'set title "%s"' % title,
        "set logscale x 2",
        "set xrange [%g:%g]" % (all_tokens[0] / 1.6, all_tokens[-1] * 1.6),
        "set xtics (" + ", ".join('"%d" %d' % (t, t) for t in all_tokens) + ")",
        'set xlabel "tokens per call (64 or fewer: weights flushed from the caches)"',
        'set ylabel "time ratio (below 1: switchmoe faster)"',
        "set yrange [%g:%g]" % (min(0.4, lowest - 0.05), max(1.4, highest + 0.05)),
        "set grid ytics",
        "set key top left",
        "set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 lw 2",
    ]
    plots = []
    for i, key in enumerate(keys):
        plots.append('"%s" index %d using 1:2:3:4 with yerrorlines lw 2 pt 7 title "%s"'
                     % (data, i, label(key)))
    lines.append("plot " + ", ".join(plots))
    subprocess.run(["gnuplot"], input="\n".join(lines).encode(), check=True)
    os.remove(data)
    return out + ".png"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="onednn_bench --json outputs, one per run")
    parser.add_argument("--out", default="onednn_ratio", help="output prefix")
    args = parser.parse_args()
    ratios, run_counts, shape = load(args.json)
    if not ratios:
        sys.exit("onednn_chart.py: no oneDNN results in the input")
    tokens = sorted({t for v in ratios.values() for t in v})
    lines = ["switchmoe time / oneDNN time (below 1 when switchmoe is faster), from %d run%s"
             % (len(args.json), "s" if len(args.json) > 1 else ""), ""] + table(ratios, run_counts, tokens)
    written = [args.out + ".md"]
    if shutil.which("gnuplot"):
        png = plot(ratios, shape, args.out)
        lines += ["", "![switchmoe / oneDNN](%s)" % os.path.basename(png)]
        written.append(png)
    else:
        print("onednn_chart.py: gnuplot not found; table only", file=sys.stderr)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", ", ".join(written))


if __name__ == "__main__":
    main()
