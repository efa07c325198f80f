"""A generated multi-modal preference set: coloured shapes on white, "What colour is the shape?".

``write_shapes(folder, n, seed)`` draws ``n`` small images with Pillow (a red, green or blue
square or circle of random size and place on white) and writes ``shapes.jsonl`` beside an
``images/`` folder: ShareGPT records (LLaMA-Factory's layout) whose human turn is
``<image>What colour is the shape?``, the chosen answer the shape's colour and the rejected one
another colour. ``blank=True`` writes the same records with every image plain white: the colour
cannot be seen, so no model can rank the answers better than chance on new images. Everything
is deterministic in ``seed``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "circle")
QUESTION = "<image>What colour is the shape?"


def draw(colour: str, shape: str, size: int, rng: random.Random, blank: bool = False):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    if blank:
        return img
    side = rng.randint(size // 3, size * 3 // 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    pen = ImageDraw.Draw(img)
    box = (x, y, x + side - 1, y + side - 1)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
    return img


def shape_records(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(colour, shape, wrong colour) for ``n`` examples, colours balanced, wrong colour uniform."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        wrong = rng.choice([c for c in COLOURS if c != colour])
        out.append((colour, rng.choice(SHAPES), wrong))
    rng.shuffle(out)
    return out


def write_shapes(folder: str | Path, n: int, seed: int = 0, *, size: int = 32, blank: bool = False,
                 name: str = "shapes.jsonl") -> Path:
    """Write ``n`` records and their images under ``folder``; returns the JSONL file."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    lines = []
    for i, (colour, shape, wrong) in enumerate(shape_records(n, seed)):
        file = images / f"{Path(name).stem}_{i:04d}.png"
        draw(colour, shape, size, rng, blank).save(file)
        lines.append(json.dumps({"conversations": [{"from": "human", "value": QUESTION}],
                                 "chosen": {"from": "gpt", "value": colour},
                                 "rejected": {"from": "gpt", "value": wrong},
                                 "images": [f"images/{file.name}"]}))
    out = folder / name
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":  # python -m prefopt.demo.shapes FOLDER [N] [SEED]
    import sys

    print(write_shapes(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200,
                       int(sys.argv[3]) if len(sys.argv) > 3 else 0))
