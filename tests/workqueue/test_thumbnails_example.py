"""examples/thumbnails.yaml under `podkit up`: real pictures, real thumbnails, autoscaling."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from PIL import Image

from support import podkit_up

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


def test_every_picture_gets_a_thumbnail_and_the_pool_scales(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "thumbnails", tmp_path / "thumbnails")
    # each item takes at least 0.15 s (as a bigger picture would), so a backlog builds
    # whatever the speed of the machine, and the scaler has something to react to
    resize = tmp_path / "thumbnails" / "resize.py"
    resize.write_text(resize.read_text() + "\nimport time\n\ntime.sleep(0.15)\n")
    spec = tmp_path / "thumbnails.yaml"
    spec.write_text((EXAMPLES / "thumbnails.yaml").read_text().replace('"300"', '"120"'))
    log = tmp_path / "up.log"
    proc = podkit_up(spec, log, tmp_path / "run")
    out = tmp_path / "thumbnails" / "out"
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.jpg"))) < 120:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    names = sorted(p.stem for p in out.glob("*.jpg"))
    assert names == [f"picture-{i:04d}" for i in range(120)]
    with Image.open(out / "picture-0007.jpg") as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 256
    assert "autoscale worker: 1 -> " in text  # the pool grew under the backlog
