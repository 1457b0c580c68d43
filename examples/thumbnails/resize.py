"""The worker's real work: a 256-px JPEG thumbnail, sharpened, written atomically."""

import sys
from pathlib import Path

from PIL import Image, ImageFilter

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
out_dir.mkdir(parents=True, exist_ok=True)
with Image.open(src) as img:
    img.thumbnail((256, 256))
    thumb = img.convert("RGB").filter(ImageFilter.SHARPEN)
target = out_dir / (src.stem + ".jpg")
tmp = target.with_suffix(".tmp")
thumb.save(tmp, format="JPEG", quality=85)
tmp.rename(target)
print(target)
