"""Plots as PNG images, drawn with pillow alone: a run's loss curves from its log.jsonl, and the any-step
curve from evaluate.py's eval.json (Overall and the diagnostics against the step count, one line per model).

    python plots.py runs/tiny/log.jsonl                                  # -> runs/tiny/log.png
    python plots.py runs/tiny/log.jsonl runs/tiny-fm/log.jsonl --out loss.png   # one line per run
    python plots.py runs/tiny/eval/eval.json                             # -> runs/tiny/eval/steps.png

evaluate.py draws steps.png itself. Each panel has its own y axis; loss panels are logarithmic when every
value is positive, step counts always (1, 2, 4, 8, 50 spread evenly). The log's fields: docs/formats.md §7.
"""
import argparse
import json
import math
import os

import cli
import data

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
PANEL = (300, 190)   # one panel's size in pixels
MARGIN = (46, 22, 10, 24)  # left, top, right, bottom: tick labels, title, space, x labels


def font(size=11):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def tick_values(lo, hi, log=False, n=4):
    """Round tick positions covering [lo, hi]: 1, 2, 5 times a power of ten apart (linear), or the powers of
    ten inside (log), with 2 and 5 times them where fewer than two powers fall inside."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
            ticks = [m * 10 ** d for d in decades for m in mantissas if lo <= m * 10 ** d <= hi]
            if len(ticks) >= 2:
                return ticks
        return [lo, hi]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def label(v):
    """A tick label: 0.05, 1.5, 750, 20k, 1.2M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def draw_panel(draw, box, title, series, xlog=False, ylog=False, xticks=None, yrange=None):
    """One panel in `box` (x0, y0, x1, y1): title, axes with ticks, and `series` [(colour, [(x, y)])] as lines
    (points where y is None are left out). -> the plot area's box, for tests and annotations."""
    x0, y0, x1, y1 = box
    area = (x0 + MARGIN[0], y0 + MARGIN[1], x1 - MARGIN[2], y1 - MARGIN[3])
    draw.text((x0 + MARGIN[0], y0 + 4), title, fill=(0, 0, 0), font=font(12))
    draw.rectangle(area, outline=(0, 0, 0))
    points = [(x, y) for _, pts in series for x, y in pts if y is not None and math.isfinite(y)]
    ylog = ylog and bool(points) and all(y > 0 for _, y in points)
    if not points:
        draw.text((area[0] + 8, area[1] + 8), "no data", fill=(120, 120, 120), font=font())
        return area
    xs, ys = [x for x, _ in points], [y for _, y in points]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = yrange or (min(ys), max(ys))
    if ylog:
        ylo, yhi = ylo / 1.15, yhi * 1.15
    else:
        pad = (yhi - ylo) * 0.06 or abs(yhi) * 0.1 or 1.0
        ylo, yhi = (ylo, yhi) if yrange else (ylo - pad, yhi + pad)
    if xhi == xlo:
        xlo, xhi = (xlo / 2, xlo * 2) if xlog else (xlo - 1, xhi + 1)
    f = (lambda v: math.log(v)) if xlog else (lambda v: v)
    g = (lambda v: math.log(v)) if ylog else (lambda v: v)
    px = lambda x: area[0] + 4 + (f(x) - f(xlo)) / (f(xhi) - f(xlo)) * (area[2] - area[0] - 8)
    py = lambda y: area[3] - 3 - (g(y) - g(ylo)) / (g(yhi) - g(ylo)) * (area[3] - area[1] - 6)
    for v in tick_values(ylo, yhi, ylog):
        y = py(v)
        draw.line((area[0] - 3, y, area[0], y), fill=(0, 0, 0))
        draw.line((area[0] + 1, y, area[2] - 1, y), fill=(232, 232, 232))
        text = label(v)
        draw.text((area[0] - 5 - draw.textlength(text, font=font()), y - 6), text, fill=(0, 0, 0),
                  font=font())
    for v in xticks or tick_values(xlo, xhi, xlog):
        x = px(v)
        draw.line((x, area[3], x, area[3] + 3), fill=(0, 0, 0))
        text = label(v)
        draw.text((x - draw.textlength(text, font=font()) / 2, area[3] + 5), text, fill=(0, 0, 0),
                  font=font())
    for colour, pts in series:
        pts = sorted((px(x), py(y)) for x, y in pts if y is not None and math.isfinite(y))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) < 40 else ():  # markers where there are few points
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    return area


def figure(panels, names, cols=3, heading=""):
    """panels: [(title, {name: [(x, y)]}, options for draw_panel)]; names: the lines, each its own colour, in
    a legend on top. -> (PIL image, {title: plot-area box})."""
    from PIL import Image, ImageDraw
    rows = math.ceil(len(panels) / cols)
    legend = [(COLOURS[k % len(COLOURS)], name) for k, name in enumerate(names)]
    top = 10 + 18 * (len(legend) + bool(heading))
    image = Image.new("RGB", (cols * PANEL[0] + 10, top + rows * PANEL[1] + 6), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    y = 6
    if heading:
        draw.text((10, y), heading, fill=(0, 0, 0), font=font(12))
        y += 18
    for colour, name in legend:
        draw.line((10, y + 7, 34, y + 7), fill=colour, width=3)
        draw.text((40, y), name, fill=(0, 0, 0), font=font(12))
        y += 18
    boxes = {}
    for k, (title, lines, options) in enumerate(panels):
        x0, y0 = 5 + (k % cols) * PANEL[0], top + (k // cols) * PANEL[1]
        series = [(colour, lines.get(name, [])) for colour, name in legend]
        boxes[title] = draw_panel(draw, (x0, y0, x0 + PANEL[0], y0 + PANEL[1]), title, series, **options)
    return image, boxes


# ------------------------------------------------------------------------------------------------------------
# log.jsonl: one record per logged window (train.log)

LOG_PANELS = [("loss", "loss (Eq. 21)", True), ("data", "data term (Eq. 7)", True),
              ("self", "self-evaluation term", True), ("fake", "L_fake (s.8)", True),
              ("loss_by_t:0", "loss, t < 0.25", True), ("loss_by_t:1", "loss, 0.25 <= t < 0.5", True),
              ("loss_by_t:2", "loss, 0.5 <= t < 0.75", True), ("loss_by_t:3", "loss, t >= 0.75", True),
              ("grad_norm", "gradient norm", True), ("lr", "learning rate", False),
              ("lam", "mean lambda (s < t)", False), ("samples_per_s", "samples / s", False)]


def read_log(path):
    """log.jsonl -> {field: [(step, value)]}. A step logged twice (a run restarted from an earlier checkpoint
    logs the steps after it again) keeps its last record."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError) as e:
                raise data.ManifestError(f"{path}:{n}: not a log record ({type(e).__name__}: {e})") from None
    fields = {}
    for step in sorted(by_step):
        rec = by_step[step]
        for key, value in rec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fields.setdefault(key, []).append((step, value))
        for b, value in enumerate(rec.get("loss_by_t") or ()):
            fields.setdefault(f"loss_by_t:{b}", []).append((step, value))
    return fields


def log_figure(paths, names=None):
    """Loss curves of one or more runs, one line per run. -> (image, boxes)."""
    names = names or paths
    runs = {name: read_log(path) for name, path in zip(names, paths)}
    panels = [(title, {name: fields.get(key, []) for name, fields in runs.items()}, {"ylog": ylog})
              for key, title, ylog in LOG_PANELS if any(key in fields for fields in runs.values())]
    return figure(panels, names, cols=4, heading="training log (window means against the step)")


# ------------------------------------------------------------------------------------------------------------
# eval.json: evaluate.py's report

def eval_curves(report):
    """evaluate.py's report -> {model: {panel: [(steps, value)]}}: the one place that knows eval.json's
    keys."""
    curves = {}
    for m in report["models"]:
        panels = {}
        for steps, r in sorted(m["results"].items(), key=lambda kv: int(kv[0])):
            seen = r["seen"]
            values = {"Overall (seen)": seen["overall"], "colours* (seen)": seen["colours_match"],
                      "contrast": r["contrast"], **{f"{task} (seen)": v for task, v in seen["tasks"].items()}}
            for name, v in values.items():
                panels.setdefault(name, []).append((int(steps), v))
        curves[f"{m['tag']}: {m['ckpt']} ({m.get('objective')}, step {m.get('step')})"] = panels
    return curves


def eval_figure(report):
    """The any-step curve: Overall and each diagnostic against the step count, one line per model."""
    curves = eval_curves(report)
    titles = list(dict.fromkeys(t for panels in curves.values() for t in panels))
    steps = sorted({s for panels in curves.values() for pts in panels.values() for s, _ in pts})
    panels = [(t, {model: panels.get(t, []) for model, panels in curves.items()},
               {"xlog": True, "xticks": steps, "yrange": None if t == "contrast" else (0.0, 1.0)})
              for t in titles]
    return figure(panels, list(curves), cols=3, heading="score against sampling steps")


def save(image, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def plot_eval(report, path):
    """evaluate.py: the any-step curve of its report as `path`."""
    return save(eval_figure(report)[0], path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="log.jsonl files (a line each) or one eval.json")
    p.add_argument("--out", type=cli.image_file, default=None,
                   help="image path (default: log.png or steps.png beside the first file)")
    args = p.parse_args(argv)
    evals = [f for f in args.files if f.endswith(".json")]
    if evals and len(args.files) > 1:
        p.error("give one eval.json (it holds every model it compared), or log.jsonl files")
    for f in args.files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: no such file")
    folder = os.path.dirname(os.path.abspath(args.files[0]))
    if evals:
        with open(evals[0], encoding="utf-8") as f:
            try:
                report = json.load(f)
                image = eval_figure(report)[0]
            except (ValueError, KeyError, TypeError) as e:
                raise data.ManifestError(f"{evals[0]}: not evaluate.py's report ({type(e).__name__}: {e})") \
                    from None
        out = save(image, args.out or os.path.join(folder, "steps.png"))
    else:
        out = save(log_figure(args.files)[0], args.out or os.path.join(folder, "log.png"))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
