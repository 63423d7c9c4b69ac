"""Everything that turns files (or nothing at all) into tensors.

- The shapes world (docs/evaluation.md): a procedurally rendered text-to-image world whose prompts follow
  GenEval's six task templates, so that the paper's evaluation (Table 1) can be answered exactly from
  pixels. Every scene is a `spec` (GenEval-style metadata: include clauses with class, count, colour,
  position) laid out and rendered anti-aliased; sample i of a stream is seeded by (seed, i) alone, so
  streams are unlimited and reproducible.
- The world's words (`WORDS`), which the tiny preset's stand-in text encoders read (encoders.WordTokenizer).
- Real data: the TSV manifest (image path <TAB> prompt), aspect-ratio buckets, the deterministic global batch
  order that train.py shards across ranks, and the latent/text caches with their builder
  (docs/method.md §9, A 13).
"""
import codecs
import concurrent.futures
import functools
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist

import encoders

# ------------------------------------------------------------------------------------------------------------
# Seeds and pixels, as every file uses them

def stream_seed(seed, index, stride=1_000_003):
    """The seed of item `index` of random stream `seed`: seed * stride + index. Every random draw of training,
    sampling and evaluation comes from a generator seeded by one of these keys, so a number depends on its
    place alone, never on batch size, process count or order:
        shapes sample i, the shuffle of epoch e (sample_rng)    (seed, i), (seed, e)
        step k's caption dropout, t and s (train.py)            (seed, k)
        eps and eps' of batch position i at step k (train.py)   (seed, (k << 20) + i, stride=1 << 40)
        image j of evaluation prompt i (evaluate.noise_seed)    (seed, 1000 i + j)
        image j of prompt i of sample.py --outdir               (seed, 1000 i + j)
        image i of sample.py                                    (seed, i, stride=1000)
    cli.MAX_SEED keeps every key within the 64 bits a torch.Generator takes."""
    return seed * stride + index


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU, rounded as a saved PNG holds them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()


# ------------------------------------------------------------------------------------------------------------
# The shapes world

PALETTE = {  # sRGB; every pair at least 38 CIE76 delta-E apart (docs/evaluation.md §2)
    "red": (225, 25, 35), "orange": (250, 140, 0), "yellow": (250, 230, 40), "green": (20, 170, 60),
    "blue": (20, 90, 240), "purple": (150, 30, 190), "pink": (255, 120, 200), "brown": (125, 70, 25),
    "black": (10, 10, 10), "white": (250, 250, 250),
}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "star": "stars", "cross": "crosses"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single", "two", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class World:
    """One shapes world. Box sides are fractions of the image side, per task (docs/evaluation.md §2)."""
    name: str
    resolution: int
    shapes: tuple
    colors: tuple
    heldout: tuple  # (color, shape) pairs that training never shows, in captions nor in images
    size_single: tuple = (0.30, 0.50)
    size_two: tuple = (0.22, 0.38)
    size_position: tuple = (0.22, 0.36)
    size_counting: tuple = (0.20, 0.30)
    max_free_objects: int = 4

    def pairs(self, seen=True):
        """The (color, shape) pairs training may show (seen=True) or never shows (seen=False)."""
        return [(c, s) for c in self.colors for s in self.shapes if ((c, s) in self.heldout) != seen]


WORLDS = {
    # The CPU demo: 32 px, three shapes that stay distinct at that size, six colours, larger objects.
    "small": World("small", 32, ("circle", "square", "triangle"),
                   ("red", "green", "blue", "yellow", "purple", "white"),
                   heldout=(("green", "square"), ("yellow", "triangle")),
                   size_single=(0.45, 0.56), size_two=(0.36, 0.44), size_position=(0.34, 0.42),
                   size_counting=(0.28, 0.33), max_free_objects=3),
    # The reference world for GPU runs: 64 px, five shapes, ten colours.
    "full": World("full", 64, ("circle", "square", "triangle", "star", "cross"), tuple(PALETTE),
                  heldout=(("green", "square"), ("yellow", "triangle"), ("purple", "star"),
                           ("orange", "cross"), ("pink", "circle"))),
}


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def phrase(color, shape):
    """'a red circle', 'an orange star', 'a circle'."""
    words = f"{color} {shape}" if color else shape
    return f"{article(words)} {words}"


def caption(spec):
    """GenEval's prompt templates (all start 'a photo of'); free scenes read 'a red
    circle to the left of ...'."""
    inc, task = spec["include"], spec["tag"]
    if task == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {PLURAL[inc[0]['class']]}"
    if task == "position":  # GenEval: include[1] is `relation` of include[0]
        a, b = inc[1], inc[0]
        subject, reference = phrase(a.get("color"), a["class"]), phrase(b.get("color"), b["class"])
        return f"a photo of {subject} {a['position'][0]} {reference}"
    names = [phrase(o.get("color"), o["class"]) for o in inc]
    if task == "free":
        if len(inc) == 2 and "position" in inc[1]:
            rel = inc[1]["position"][0]
            rel = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
            return f"{names[1]} {rel} {names[0]}"
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return "a photo of " + " and ".join(names)


CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def typed_caption(spec, rng, max_words=None):
    """The scene `spec` describes, worded as a person might type it: the same facts, with what real captions
    vary varied (docs/evaluation.md §2): the opening ('a photo of', 'an image of', 'a picture of' or none),
    'one' for 'a', the order of the objects named, a relation said from the other side ('a square right of a
    circle' for 'a circle left of a square'), 'left of' or 'to the left of', casing and end punctuation.
    Training shows a share of its captions so (train.py --typed), since a stand-in encoder reads words it was
    never shown as unrelated tokens; evaluate.py --phrasing typed asks in such words. With `max_words` (what
    the text encoders keep) the opening, then the end punctuation, are left out of a caption that would be
    longer, so that no fact is cut off."""
    inc, task = spec["include"], spec["tag"]
    one = lambda color, shape: (f"one {color + ' ' if color else ''}{shape}" if rng.random() < 0.25
                                else phrase(color, shape))
    if task == "counting":
        body = f"{NUMBERS[inc[0]['count']]} {PLURAL[inc[0]['class']]}"
    elif len(inc) == 2 and "position" in inc[1]:
        (a, b), rel = (inc[1], inc[0]), inc[1]["position"][0]
        if rng.random() < 0.5:                                   # the same relation, said from the other side
            a, b, rel = b, a, CONVERSE[rel]
        if rel in ("left of", "right of") and rng.random() < 0.5:
            rel = "to the " + rel
        body = f"{one(a.get('color'), a['class'])} {rel} {one(b.get('color'), b['class'])}"
    else:
        names = [one(o.get("color"), o["class"]) for o in inc]
        rng.shuffle(names)
        body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    opening = rng.choice(("a photo of ", "a photo of ", "an image of ", "a picture of ", ""))
    case = rng.choice((str.lower, str.lower, str.capitalize, str.upper, str.title))
    end = rng.choice(("", "", ".", "!", "!!", "?", " ."))
    for text in (opening + body + end, body + end, body):
        if max_words is None or len(encoders.WordTokenizer.words(text)) <= max_words:
            break
    return case(text)


def sample_spec(world, rng, task=None, seen=True):
    """Draw a scene description (GenEval metadata plus 'prompt'). Training draws seen=True: no held-out
    pair, not even through a colour the caption leaves open. seen=False draws a prompt that names at
    least one held-out pair."""
    pairs = world.pairs(seen=True)
    named_pairs = pairs if seen else world.pairs(seen=False)
    # about three quarters in the evaluation templates, a quarter free scenes (docs/evaluation.md §2)
    if task is None:
        task = rng.choice(TASKS) if rng.random() < 0.75 else "free"
    shape = lambda: rng.choice(world.shapes)
    if task == "single":
        inc = [{"class": shape(), "count": 1}]
    elif task == "two":
        a, b = rng.sample(world.shapes, 2)
        inc = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif task == "counting":
        inc = [{"class": shape(), "count": rng.randint(2, 4)}]
    elif task == "colors":
        c, s = rng.choice(named_pairs)
        inc = [{"class": s, "count": 1, "color": c}]
    elif task == "position":
        a, b = rng.sample(world.shapes, 2)
        inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rng.choice(RELATIONS), 0]}]
    elif task in ("color_attr", "free"):
        n = 2 if task == "color_attr" else rng.choice((1, 2, 2, 3, 4)[:world.max_free_objects + 1])
        while True:
            objs = [rng.choice(pairs) for _ in range(n)]
            if not seen:
                objs[rng.randrange(n)] = rng.choice(named_pairs)
            if task == "free" or objs[0][1] != objs[1][1]:  # color_attr: two different classes, as in GenEval
                break
        inc = [{"class": s, "count": 1, "color": c} for c, s in objs]
        if task == "free" and n == 2 and rng.random() < 0.5:
            inc[1]["position"] = [rng.choice(RELATIONS), 0]
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS + ('free',)}")
    spec = {"tag": task, "include": inc, "exclude": []}
    if task == "counting":
        spec["exclude"] = [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
    spec["prompt"] = caption(spec)
    return spec


def relations(box_a, box_b, threshold=0.1):
    """GenEval's rule: the set of relations of box A to box B; boxes are [x1, y1, x2, y2], y down."""
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dim_a = np.array([box_a[2] - box_a[0], box_a[3] - box_a[1]])
    dim_b = np.array([box_b[2] - box_b[0], box_b[3] - box_b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def layout(spec, world, rng, max_tries=500):
    """Place the objects a spec asks for: a list of (shape, color, [x1, y1, x2, y2]) in pixels. Boxes
    never touch (gap max(2 px, 0.05 R)); a stated relation is never borderline: it holds under
    GenEval's rule with the stricter margin 0.15, and no other relation appears even with the looser
    margin 0.05 (GenEval uses 0.1)."""
    R = world.resolution
    sizes = {"single": world.size_single, "colors": world.size_single, "counting": world.size_counting,
             "position": world.size_position}.get(spec["tag"], world.size_two)
    allowed = world.pairs(seen=True)
    objects = []  # (shape, color) with open colours filled from the seen pairs of that shape
    for clause in spec["include"]:
        for _ in range(clause["count"]):
            color = clause.get("color") or rng.choice([c for c, s in allowed if s == clause["class"]])
            objects.append((clause["class"], color))
    n = len(objects)
    margin, gap = max(1.0, 0.03 * R), max(2.0, 0.05 * R)
    for attempt in range(max_tries):
        shrink = 1.0 - 0.3 * attempt / max_tries  # crowded scenes fall back to smaller objects
        boxes = []
        for _ in range(n):
            side = rng.uniform(*sizes) * R * shrink
            for _ in range(50):
                x, y = rng.uniform(margin, R - margin - side), rng.uniform(margin, R - margin - side)
                box = [x, y, x + side, y + side]
                if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap
                       or b[1] >= box[3] + gap for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < n:
            continue
        ok = True
        for i, clause in enumerate(spec["include"]):
            # clause i is `rel` of clause j; one object each (GenEval position prompts)
            if "position" in clause:
                rel, j = clause["position"]
                strict, loose = relations(boxes[i], boxes[j], 0.15), relations(boxes[i], boxes[j], 0.05)
                ok = ok and rel in strict and loose == {rel}
        if ok:
            return [(s, c, b) for (s, c), b in zip(objects, boxes)]
    raise RuntimeError(f"could not lay out {spec['prompt']!r} at {R} px in {max_tries} tries")


def _star_triangles():
    """The 5-point star (inner radius 0.5 of outer, apex up) as 10 triangles around its centre, rescaled so
    that its tight box is the unit square [-1, 1]^2 (u right, v down)."""
    ang = [math.pi / 2 + k * math.pi / 5 for k in range(10)]
    pts = [((1.0 if k % 2 == 0 else 0.5) * math.cos(a), -(1.0 if k % 2 == 0 else 0.5) * math.sin(a))
           for k, a in enumerate(ang)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    hx, hy = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    pts = [((x - cx) / hx, (y - cy) / hy) for x, y in pts]
    centre = (-cx / hx, -cy / hy)
    return [(centre, pts[k], pts[(k + 1) % 10]) for k in range(10)]


_STAR = _star_triangles()


def _in_triangle(u, v, a, b, c):
    def side(p, q):
        return (u - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (v - q[1])
    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def inside(shape, u, v):
    """Inside test in box coordinates: the shape's tight box is [-1, 1]^2, u right, v down
    (docs/evaluation.md §2)."""
    box = (u.abs() <= 1) & (v.abs() <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return box
    if shape == "triangle":  # apex up
        return box & (u.abs() <= (v + 1) / 2)
    if shape == "cross":  # plus sign, arm width 1/3 of the box side
        return box & ((u.abs() <= 1 / 3) | (v.abs() <= 1 / 3))
    if shape == "star":
        hit = torch.zeros_like(u, dtype=torch.bool)
        for tri in _STAR:
            hit |= _in_triangle(u, v, *tri)
        return box & hit
    raise ValueError(f"unknown shape {shape!r}")


def shape_alpha(shape, box, R, supersample=4):
    """Anti-aliased coverage (R, R) in [0, 1] of one shape in its box, from supersample^2
    inside-tests per pixel."""
    x1, y1, x2, y2 = box
    # sub-pixel centres, in pixels
    sub = (torch.arange(R * supersample, dtype=torch.float32) + 0.5) / supersample
    u = (sub[None, :] - (x1 + x2) / 2) / ((x2 - x1) / 2)
    v = (sub[:, None] - (y1 + y2) / 2) / ((y2 - y1) / 2)
    hit = inside(shape, u.expand(len(sub), -1), v.expand(-1, len(sub))).float()
    return hit.view(R, supersample, R, supersample).mean(dim=(1, 3))


def render(objects, R, rng):
    """One scene -> (3, R, R) float image in [-1, 1]: flat neutral gray with an optional mild vertical
    gradient, shapes composited over it."""
    level = rng.uniform(108, 136)
    grad = rng.uniform(-6, 6) if rng.random() < 0.5 else 0.0
    ramp = torch.linspace(-1, 1, R) * grad
    img = (level + ramp)[None, :, None].expand(3, R, R).clone()
    for shape, color, box in objects:
        a = shape_alpha(shape, box, R)
        img = img * (1 - a) + torch.tensor(PALETTE[color], dtype=torch.float32)[:, None, None] * a
    return img / 127.5 - 1


def sample_rng(seed, index):
    """Sample `index` of stream `seed` has its own generator: independent of batch size, workers and order."""
    return random.Random(stream_seed(seed, index))


def shapes_batch(world, indices, seed=0, typed=0.0, max_words=None):
    """Training batch of the shapes world: (images (B, 3, R, R) in [-1, 1], captions). A share `typed` of the
    captions is worded as a person might type it (typed_caption, at most `max_words` words) instead of in the
    evaluation templates."""
    images, captions = [], []
    for i in indices:
        rng = sample_rng(seed, int(i))
        spec = sample_spec(world, rng)
        images.append(render(layout(spec, world, rng), world.resolution, rng))
        captions.append(typed_caption(spec, rng, max_words) if typed and rng.random() < typed
                        else spec["prompt"])
    return torch.stack(images), captions


# ------------------------------------------------------------------------------------------------------------
# The words of the shapes world, as the tiny preset's stand-in encoders read them (encoders.WordTokenizer)

# Every word of every shapes world's captions, in a fixed order: a word's id is part of the tiny preset, so
# this tuple only ever grows at its end. A caption of the world is then one token per word, not one per byte.
WORDS = ("a", "an", "photo", "of", "and", ",", "to", "the", "left", "right", "above", "below", "two", "three",
         "four", *PALETTE, *PLURAL, *PLURAL.values(), "one", "image", "picture", ".", "!", "?")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# Real data: a TSV manifest of (image path, prompt)

class ManifestError(ValueError):
    pass


def read_manifest(path, base_dir=None, skip_bad=False):
    """Lines 'image_path<TAB>prompt' in UTF-8 (a byte-order mark is allowed); relative paths resolve against
    base_dir (default: the manifest's folder). A malformed line, one that is not UTF-8, or a missing image
    stops with file and line, or is skipped with a warning if skip_bad."""
    if os.path.isdir(path):
        raise ManifestError(f"{path}: a folder but not a finished cache (no index.json); --data takes a "
                            "manifest (image path<TAB>prompt lines) or a cache folder made by --build-cache")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()  # \n, \r\n or \r, as text mode reads them
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e.strerror})") from e
    # an editor's byte-order mark is not part of the first path
    if lines and lines[0].startswith(codecs.BOM_UTF8):
        lines[0] = lines[0][len(codecs.BOM_UTF8):]
    base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    entries = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = (f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the manifest as "
                       f"UTF-8")
        else:
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            problem = None
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                problem = f"expected 'image_path<TAB>prompt', got {len(parts)} field(s)"
            else:
                img = parts[0] if os.path.isabs(parts[0]) else os.path.join(base_dir, parts[0])
                if not os.path.isfile(img):
                    problem = f"image not found: {img}"
        if problem:
            if not skip_bad:
                raise ManifestError(f"{path}:{n}: {problem} (pass --skip-bad to skip such lines)")
            warn(f"{path}:{n}: {problem}; skipped")
            continue
        entries.append((img, parts[1].strip(), n))
    if not entries:
        raise ManifestError(f"{path}: no usable lines")
    return entries


def buckets(area, step, max_ratio=2.0):
    """Aspect-ratio buckets (A 13): (H, W) of at most area^2 pixels and close to it, sides multiples of `step`
    (patch x autoencoder downsampling, or more), aspect ratios within [1/max_ratio, max_ratio];
    max_ratio 1 gives the square alone."""
    out = []
    for h in range(step, int(area * math.sqrt(max_ratio)) + 1, step):
        w = area * area // h // step * step
        if w >= step and 1 / max_ratio <= w / h <= max_ratio:
            out.append((h, w))
    return out


def nearest_bucket(size, options):
    """(W, H) of an image -> the (H, W) bucket of the nearest aspect ratio (in log space)."""
    w, h = size
    return min(options, key=lambda b: (abs(math.log(b[1] / b[0]) - math.log(w / h)), b))


def image_size(path):
    """(W, H) of an image file whose data has been read to the end, so that a file cut short or damaged fails
    at start-up, not at the step that draws it. Cheaper than decoding: a PNG has each chunk's checksum
    verified, a JPEG is decoded at 1/8 scale (PIL's draft mode); other formats are decoded."""
    from PIL import Image
    with Image.open(path) as im:
        size = im.size
        if im.format == "PNG":
            im.verify()
        else:
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    return size


def load_image(path, size, where=""):
    """Image file -> (3, H, W) in [-1, 1]: scaled to cover (H, W) (an int is a square), centre-cropped."""
    from PIL import Image
    H, W = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = max(W / w, H / h)
            im = im.resize((max(W, round(w * scale)), max(H, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - W) // 2, (h - H) // 2
            im = im.crop((left, top, left + W, top + H))
            arr = np.asarray(im, dtype=np.float32)
    except Exception as e:
        raise ManifestError(f"{where}cannot read image {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class Batches:
    """The global batch of every step, identical on every rank and a function of (seed, step) alone, so a
    resumed run continues exactly where it stopped. Epoch e shuffles each bucket's items with the epoch's
    seed, cuts them into batches of `batch` (a bucket's remainder waits for the next epoch's shuffle), and
    shuffles the batches: every batch holds one bucket. train.py gives rank r the r-th slice of each global
    batch, so ranks see disjoint items."""

    def __init__(self, item_buckets, batch, seed=0, where="data"):
        self.batch, self.seed = batch, seed
        self.groups = {}
        for i, b in enumerate(item_buckets):
            self.groups.setdefault(b, []).append(i)
        self.per_epoch = sum(len(g) // batch for g in self.groups.values())
        if self.per_epoch == 0:
            sizes = ", ".join(f"{b}: {len(g)}" for b, g in sorted(self.groups.items()))
            raise ManifestError(f"{where}: no bucket holds a whole global batch of {batch} items ({sizes})")

    @functools.lru_cache(maxsize=2)
    def epoch(self, e):
        rng = sample_rng(self.seed, e)
        out = []
        for b in sorted(self.groups):
            items = self.groups[b][:]
            rng.shuffle(items)
            out += [items[k:k + self.batch] for k in range(0, len(items) - self.batch + 1, self.batch)]
        rng.shuffle(out)
        return out

    def __call__(self, step):
        e, j = divmod(step, self.per_epoch)
        return self.epoch(e)[j]


class ManifestData:
    """A TSV manifest as training items: every (image, area) pair goes to the bucket of its aspect ratio at
    each area of `areas` (one area: that phase; 256 and 512: docs/method.md §9's 1:1 mix). Every image is read
    at start (`image_size`); one that cannot be read, or is smaller than its bucket, is an error naming its
    line (or, with skip_bad, left out). A batch's images are decoded by `workers` threads
    (PIL releases the GIL while it decodes and resizes)."""

    def __init__(self, path, areas, step, batch, seed=0, base_dir=None, skip_bad=False,
                 max_ratio=2.0, workers=1):
        self.path, self.skip_bad = path, skip_bad
        self.decode = concurrent.futures.ThreadPoolExecutor(workers).map if workers > 1 else map
        self.entries = read_manifest(path, base_dir, skip_bad)
        self.items = []  # (entry index, (H, W))
        self.unreadable = set()  # items whose image failed after start-up (skip_bad): replaced in every batch
        for e, (img, _, line) in enumerate(self.entries):
            try:
                size = image_size(img)
            except Exception as err:
                if not skip_bad:
                    raise ManifestError(f"{path}:{line}: cannot read image {img}: {err}") from err
                warn(f"{path}:{line}: cannot read image {img}: {err}; skipped")
                continue
            for area in areas:
                H, W = nearest_bucket(size, buckets(area, step, max_ratio))
                if size[0] < W or size[1] < H:
                    problem = (f"{path}:{line}: image {img} is {size[0]}x{size[1]}, smaller than its {W}x{H} "
                               f"bucket")
                    if not skip_bad:
                        raise ManifestError(problem + " (pass --skip-bad to leave it out of that bucket)")
                    warn(problem + "; left out")
                    continue
                self.items.append((e, (H, W)))
        if not self.items:
            raise ManifestError(f"{path}: no usable images")
        self.order = Batches([b for _, b in self.items], batch, seed, path)

    def __len__(self):
        return len(self.items)

    def indices(self, step):
        return self.order(step)

    def batch(self, indices):
        """-> (images (B, 3, H, W) of one bucket, captions)."""
        pairs = list(self.decode(self.load, [int(i) for i in indices]))
        return torch.stack([image for image, _ in pairs]), [prompt for _, prompt in pairs]

    def load(self, i):
        """Item i -> (image, prompt). An image that passed the start-up check can still fail here
        (changed or removed since): an error naming its line, or with skip_bad a warning and the next readable
        item of its bucket in its place. That choice depends on the items alone, so every rank and a resumed
        run make the same one."""
        def candidates():  # i, then the rest of its bucket in order, wrapping around (listed only if i fails)
            yield i
            group = self.order.groups[self.items[i][1]]
            k = group.index(i)
            yield from group[k + 1:] + group[:k]
        for j in candidates():
            if j in self.unreadable:
                continue
            e, size = self.items[j]
            img, prompt, line = self.entries[e]
            try:
                return load_image(img, size, where=f"{self.path}:{line}: "), prompt
            except ManifestError as err:
                if not self.skip_bad:
                    hint = "pass --skip-bad to draw another image of its bucket instead"
                    raise ManifestError(f"{err} ({hint})") from err
                warn(f"{err}; drawing the next image of its bucket instead")
                self.unreadable.add(j)
        H, W = self.items[i][1]
        raise ManifestError(f"{self.path}: no image of the {W}x{H} bucket can be read")


class ShapesData:
    """The shapes world as an unending stream: step k's global batch is samples k B ... (k + 1) B - 1."""

    def __init__(self, world, batch, seed=0, typed=0.0, max_words=None):
        self.world, self.batch_size, self.seed = world, batch, seed
        self.typed, self.max_words = typed, max_words

    def indices(self, step):
        return list(range(step * self.batch_size, (step + 1) * self.batch_size))

    def batch(self, indices):
        return shapes_batch(self.world, indices, self.seed, self.typed, self.max_words)


# ------------------------------------------------------------------------------------------------------------
# Latent and text caches (docs/formats.md §2): the frozen encoders run once over a manifest; training then
# reads shards instead.
#   <dir>/shard-RRRRR-NNNNN.safetensors  items of one bucket: item (n,), latent (n, C, h, w), CLIP pooled
#                                        vec (n, d_vec) and fake_vec for c_fake (s.8); the T5 states packed
#                                        row after row, each caption's txt_len of them: txt (sum, d_txt),
#                                        txt_len (n,), and fake_txt, fake_txt_len for c_fake
#   <dir>/null.safetensors               the empty prompt phi and c_fake of it (txt, vec, fake_txt,
#                                        fake_vec), batch 1, all t5_max_len positions
#   <dir>/index.json                     what the cache was built with; written last: present means complete
#   <dir>/previews.safetensors           the preview prompts' encodings (write_previews), for the preview
#                                        grids of a run that loads no text encoder
# Items are numbered as ManifestData numbers them, so a cached run draws exactly the batches an online run
# draws. Size: a T5-XXL state is 4096 values per token (8 KiB in bf16). With the T5 mask (train.py
# --t5-mask, A 26) the states past a caption's tokens are zero and are not stored; without it (FLUX's way)
# padding attends, its states depend on the prompt, and all t5_max_len of them are stored. The text is stored
# in the encoders' precision (bf16 on GPU), as training would see it online.
# Opening a cache checks every file (headers, shapes, item numbers, lengths) before training starts: one that
# is damaged, missing, of another build or of another format is an error naming it and what to do.

CACHE_FORMAT = 2       # format 1 stored txt as (n, t5_max_len, d_txt)
CACHE_FIELDS = ("latent", "txt", "vec", "fake_txt", "fake_vec")
PACKED = ("txt", "fake_txt")  # (sum of <name>_len, d_txt)
CACHE_SHARD = re.compile(r"shard-\d{5}-\d{5}\.safetensors")
REBUILD = "rebuild the cache with train.py --build-cache"


def cache_meta(cfg, seed, resolution, max_ratio, fake_prefix, t5_mask=False):
    """What a cache depends on (its index.json, less the item count): its format, the frozen parts of preset
    `cfg` and whether T5 masks padding, the stand-ins' seed (tiny), the bucket areas and ratio, the c_fake
    prefix. CachedData refuses a cache whose values differ."""
    c = cfg.to_dict()
    return {"format": CACHE_FORMAT,
            # the widths of the states the denoiser reads (context_in_dim, vec_in_dim): what the loaded
            # encoders give, whatever the preset's nominal T5 and CLIP shapes
            "encoders": {**{k: c[k] for k in ("t5", "clip", "t5_max_len", "tokenizer", "latent")},
                         "t5_mask": t5_mask, "widths": [cfg.context_in_dim, cfg.vec_in_dim]},
            "stand_in_seed": seed if cfg.tokenizer == "words" else None,
            "resolution": resolution, "max_ratio": max_ratio, "fake_prefix": fake_prefix}


def _save_shard(tensors, file, metadata=None):
    """safetensors -> `file` through `file`.tmp, so a file under its final name is always whole. A write that
    fails (a full disk) leaves nothing and says what it needed."""
    tmp = file + ".tmp"
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, file)
    except Exception as e:  # an OSError, or the safetensors writer's own error for the same causes
        if os.path.exists(tmp):
            os.remove(tmp)
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(file))).free
        raise OSError(f"{file}: cannot write ({' '.join(str(e).split())}); it needs "
                      f"{need / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free there") from e


def write_cache(out, source, encode_latents, encode_text, *, fake_prefix, meta, batch, rank=0, world=1,
                shard_items=256):
    """Encode `source` (a ManifestData) into the cache folder `out`: rank r writes items r, r + world, ...
    into shards of one bucket each, `batch` images per encoder call; `encode_text(captions)` -> (txt (B, Lt,
    d_txt), vec (B, d_vec), lengths (B,)), of which each caption's first `lengths` T5 states are kept. Once
    every rank is done, rank 0 writes the null encodings and then index.json (`meta` and the item count),
    whose presence marks the cache complete. A folder that already holds cache files is refused (two builds
    would mix). Collective under torchrun."""
    found = sorted(n for n in os.listdir(out) if n in ("index.json", "null.safetensors")
                   or CACHE_SHARD.fullmatch(n)) if os.path.isdir(out) else []
    if found:
        raise ManifestError(f"{out} already holds cache files ({', '.join(found[:2])}"
                            f"{', ...' if len(found) > 2 else ''}): choose another folder, or delete them "
                            "to build it afresh")
    if world > 1:
        dist.barrier()  # every rank has looked before any writes
    os.makedirs(out, exist_ok=True)
    mine = {}
    for i in range(rank, len(source), world):
        mine.setdefault(source.items[i][1], []).append(i)
    n_shard = 0
    for bucket in sorted(mine):
        items = mine[bucket]
        for k in range(0, len(items), shard_items):
            part = {f: [] for f in (*CACHE_FIELDS, "txt_len", "fake_txt_len")}
            for j in range(k, min(k + shard_items, len(items)), batch):
                idx = items[j:min(j + batch, k + shard_items, len(items))]
                images, captions = source.batch(idx)
                txt, vec, n_txt = encode_text(captions)
                fake_txt, fake_vec, n_fake = encode_text([fake_prefix + c for c in captions])
                part["latent"].append(encode_latents(images).cpu())
                for f, states, n in (("txt", txt, n_txt), ("fake_txt", fake_txt, n_fake)):
                    n = n.cpu()
                    part[f] += [s[:m] for s, m in zip(states.cpu(), n.tolist())]  # (m, d_txt) each
                    part[f + "_len"].append(n)
                part["vec"].append(vec.cpu())
                part["fake_vec"].append(fake_vec.cpu())
            tensors = {f: torch.cat(v).contiguous() for f, v in part.items()}
            tensors["item"] = torch.tensor(items[k:k + shard_items])
            _save_shard(tensors, os.path.join(out, f"shard-{rank:05d}-{n_shard:05d}.safetensors"),
                        metadata={"bucket": json.dumps(bucket)})
            n_shard += 1
            print(f"cache: rank {rank} shard {n_shard}: {len(tensors['item'])} items of "
                  f"{bucket[0]}x{bucket[1]}", flush=True)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    txt, vec, _ = encode_text([""])
    fake_txt, fake_vec, _ = encode_text([fake_prefix])
    _save_shard({"txt": txt.cpu().contiguous(), "vec": vec.cpu().contiguous(),
                 "fake_txt": fake_txt.cpu().contiguous(), "fake_vec": fake_vec.cpu().contiguous()},
                os.path.join(out, "null.safetensors"))
    with open(os.path.join(out, "index.json.tmp"), "w") as f:
        json.dump({**meta, "items": len(source)}, f, indent=1)
    os.replace(os.path.join(out, "index.json.tmp"), os.path.join(out, "index.json"))
    print(f"cache: {len(source)} items in {out}", flush=True)


def is_cache(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "index.json"))


def _read_index(path, expect):
    """index.json -> its object, checked: the format this reader reads, an item count, and every key of
    `expect` (what this run would build) equal to it."""
    file = os.path.join(path, "index.json")
    try:
        meta = encoders.read_json(file)
    except encoders.CheckpointError as e:
        raise ManifestError(f"{e}; {REBUILD}") from e
    if meta.get("format") != CACHE_FORMAT:
        raise ManifestError(f"{file}: a cache of format {meta.get('format', 1)!r} (an earlier selfe's, or "
                            f"damaged); this selfe reads format {CACHE_FORMAT}: {REBUILD}")
    items = meta.get("items")
    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise ManifestError(f"{file}: damaged: items = {items!r}, expected a count >= 1; {REBUILD}")
    for key, want in expect.items():
        if key not in meta:
            raise ManifestError(f"{file}: damaged: no {key!r} key; {REBUILD}")
        if meta[key] != want:
            raise ManifestError(f"{file}: the cache was built with {key} = {meta[key]!r}, this run needs "
                                f"{want!r}; rebuild it with this run's settings")
    return meta


def _check_header(file, want):
    """A shard's (or null.safetensors') header against `want` {field: (dtypes, shape with None for any)}:
    every field there, of those dtypes and shapes, its bytes inside the file. -> {field: shape}."""
    try:
        header = encoders.read_header(file)
    except encoders.CheckpointError as e:
        raise ManifestError(f"{e}; {REBUILD}") from e
    shapes = {}
    for field, (dtypes, shape) in want.items():
        e = header.get(field)
        if e is None:
            raise ManifestError(f"{file}: no {field!r} tensor (damaged, or written by another selfe); "
                                f"{REBUILD}")
        size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}.get(e.dtype)
        fits = len(e.shape) == len(shape) and all(w is None or w == s for w, s in zip(shape, e.shape))
        if e.dtype not in dtypes or not fits or e.nbytes != math.prod(e.shape) * size:
            want_shape = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise ManifestError(f"{file}: tensor {field!r} is {e.dtype} {e.shape} in {e.nbytes} bytes, "
                                f"expected {'/'.join(dtypes)} {want_shape}; {REBUILD}")
        shapes[field] = e.shape
    return shapes


class CachedData:
    """Training items read from a cache. `expect` is what this run would have built it with; any difference
    (another preset's encoders, resolution, c_fake prefix, stand-in seed, T5 mask, format) is an error naming
    the key. Every shard is checked on opening (see _check_shard), so a damaged or stale cache stops before
    training, naming the file."""

    def __init__(self, path, expect, batch, seed=0):
        if not is_cache(path):
            raise ManifestError(f"{path}: not a finished cache (no index.json); build one with "
                                "train.py --build-cache")
        self.path = path
        self.meta = _read_index(path, expect)
        enc = self.meta["encoders"]
        self.t5_len, (d_txt, d_vec) = enc["t5_max_len"], enc["widths"]
        # pixels per latent cell, as the builder's autoencoder gave them (FLUX's: 8)
        self.channels = 16 if enc["latent"] == "flux-vae" else 3
        self.down = self.meta.get("downsample", 8 if enc["latent"] == "flux-vae" else 1)
        floats = ("F32", "BF16", "F16")
        self.want = {"item": (("I64",), (None,)), "latent": (floats, (None, self.channels, None, None)),
                     "vec": (floats, (None, d_vec)), "fake_vec": (floats, (None, d_vec)),
                     **{f: (floats, (None, d_txt)) for f in PACKED},
                     **{f + "_len": (("I64",), (None,)) for f in PACKED}}
        self.where = {}    # item -> (file, row)
        self.offsets = {}  # file -> {packed field: (n + 1,) first state of each row}
        item_buckets = [None] * self.meta["items"]
        for name in sorted(os.listdir(path)):
            if not CACHE_SHARD.fullmatch(name):
                continue
            file = os.path.join(path, name)
            bucket, items = self._check_shard(file)
            for row, i in enumerate(items):
                if item_buckets[i] is not None:
                    raise ManifestError(f"{file}: item {i} is also in {self.where[i][0]}: shards of two "
                                        f"builds in one folder; {REBUILD} in an empty folder")
                self.where[i] = (file, row)
                item_buckets[i] = bucket
        missing = [i for i, b in enumerate(item_buckets) if b is None]
        if missing:
            raise ManifestError(f"{path}: {len(missing)} of {len(item_buckets)} items are in no shard "
                                f"(first: item {missing[0]}); a shard file is missing")
        null = os.path.join(path, "null.safetensors")
        _check_header(null, {"txt": (floats, (1, self.t5_len, d_txt)), "vec": (floats, (1, d_vec)),
                             "fake_txt": (floats, (1, self.t5_len, d_txt)), "fake_vec": (floats, (1, d_vec))})
        self.null = self._read(null, lambda f: {k: f.get_tensor(k) for k in ("txt", "vec", "fake_txt",
                                                                              "fake_vec")})
        self.order = Batches(item_buckets, batch, seed, path)

    @staticmethod
    def _read(file, fn):
        """fn(safe_open(file)), with the reader's own errors (a file changed since it was checked) named."""
        try:
            with safetensors.safe_open(file, "pt") as f:
                return fn(f)
        except (safetensors.SafetensorError, OSError, RuntimeError) as e:
            raise ManifestError(f"{file}: cannot read ({' '.join(str(e).split())}); {REBUILD}") from e

    def _check_shard(self, file):
        """One shard against the index: the header (fields, dtypes, shapes: every field n rows of this
        preset's sizes, the latents of its bucket's size), then the small tensors: item numbers within the
        index's count and distinct, each caption's length within [1, t5_max_len] and the lengths filling
        the packed states exactly. -> (bucket, item numbers)."""
        shapes = _check_header(file, self.want)
        n = shapes["item"][0]
        rows = {f: s[0] for f, s in shapes.items() if f not in PACKED}
        if n == 0 or any(r != n for r in rows.values()):
            raise ManifestError(f"{file}: damaged: rows per tensor {rows}, expected {n} each; {REBUILD}")
        meta = self._read(file, lambda f: f.metadata()) or {}
        try:
            bucket = tuple(json.loads(meta["bucket"]))
            ok = len(bucket) == 2 and all(isinstance(x, int) and x > 0 and x % self.down == 0 for x in bucket)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ManifestError(f"{file}: damaged: metadata 'bucket' is {meta.get('bucket')!r}, expected "
                                f"[H, W] in pixels; {REBUILD}")
        if shapes["latent"][2:] != (bucket[0] // self.down, bucket[1] // self.down):
            raise ManifestError(f"{file}: latents are {shapes['latent'][2:]}, its {bucket[0]}x{bucket[1]} "
                                f"bucket needs {(bucket[0] // self.down, bucket[1] // self.down)}; {REBUILD}")
        small = self._read(file, lambda f: {k: f.get_tensor(k) for k in ("item", "txt_len", "fake_txt_len")})
        items = small["item"].tolist()
        count = self.meta["items"]
        bad = next((i for i in items if not 0 <= i < count), None)
        if bad is not None or len(set(items)) != n:
            what = f"item {bad}" if bad is not None else "an item twice"
            raise ManifestError(f"{file}: holds {what}, but index.json counts items 0 to {count - 1}: a "
                                f"shard of another build; {REBUILD} in an empty folder")
        self.offsets[file] = {}
        for f in PACKED:
            lengths = small[f + "_len"]
            lo, hi, total = lengths.min().item(), lengths.max().item(), lengths.sum().item()
            if lo < 1 or hi > self.t5_len or total != shapes[f][0]:
                raise ManifestError(f"{file}: damaged: {f}_len holds lengths {lo}..{hi} summing to {total}, "
                                    f"expected 1..{self.t5_len} summing to the {shapes[f][0]} rows of {f!r}; "
                                    f"{REBUILD}")
            self.offsets[file][f] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return bucket, items

    def __len__(self):
        return len(self.where)

    def indices(self, step):
        return self.order(step)

    def batch(self, indices):
        """-> dict of CACHE_FIELDS, each (B, ...), for the items `indices` (one bucket); reads only those
        rows, and gives the T5 states back at t5_max_len positions, zero past each caption's own."""
        by_file = {}  # each shard opened once per batch
        for k, i in enumerate(indices):
            file, row = self.where[int(i)]
            by_file.setdefault(file, []).append((k, row))
        rows = [None] * len(indices)

        def read(f, file, wanted):
            slices = {fld: f.get_slice(fld) for fld in CACHE_FIELDS}
            for k, row in wanted:
                rows[k] = {fld: slices[fld][row:row + 1] for fld in CACHE_FIELDS if fld not in PACKED}
                for fld in PACKED:
                    a, b = self.offsets[file][fld][row:row + 2].tolist()
                    states = slices[fld][a:b]                                  # (length, d_txt)
                    rows[k][fld] = torch.zeros(1, self.t5_len, states.shape[1], dtype=states.dtype)
                    rows[k][fld][0, :b - a] = states
        for file, wanted in by_file.items():
            self._read(file, lambda f: read(f, file, wanted))
        return {fld: torch.cat([r[fld] for r in rows]) for fld in CACHE_FIELDS}


def write_previews(folder, prompts, encode_text):
    """<cache>/previews.safetensors: the encodings of train.py's preview prompts, txt (P, Lt, d_txt) and vec
    (P, d_vec), in the encoders' precision, with the prompts in its metadata. Written by --build-cache, so
    that a run training from the cache draws its previews without loading T5 and CLIP."""
    txt, vec = encode_text(prompts)
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file({"txt": txt.cpu().contiguous(), "vec": vec.cpu().contiguous()},
                                os.path.join(folder, "previews.safetensors"),
                                metadata={"prompts": json.dumps(prompts)})


def read_previews(folder):
    """-> (prompts, (txt, vec)) from <cache>/previews.safetensors, or None where the cache has none."""
    file = os.path.join(folder, "previews.safetensors")
    if not os.path.isfile(file):
        return None
    try:
        with safetensors.safe_open(file, "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            txt, vec = f.get_tensor("txt"), f.get_tensor("vec")
    except Exception as e:  # a damaged file: whatever safetensors or json raises
        raise ManifestError(f"{file}: damaged ({type(e).__name__}: {e}); build the cache again") from e
    if len(prompts) != len(txt) or len(txt) != len(vec):
        raise ManifestError(f"{file}: {len(prompts)} prompts but {len(txt)} encodings; build the cache "
                            "again")
    return prompts, (txt, vec)
