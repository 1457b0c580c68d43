"""Draws N test pictures (shapes and gradients, 1200x900 PNG) into a directory, a few at a
time, the way a camera upload or a batch export would fill an inbox."""

import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(42)
for i in range(count):
    img = Image.new("RGB", (1200, 900), (rng.randrange(256), rng.randrange(256), 255))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = rng.randrange(1200), rng.randrange(900)
        r = rng.randrange(20, 200)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    tmp = out / f".picture-{i:04d}.png.tmp"
    img.save(tmp, format="PNG")
    tmp.rename(out / f"picture-{i:04d}.png")  # appears whole
    if i % 20 == 19:
        time.sleep(0.2)
print(f"made {count} pictures in {out}", flush=True)
