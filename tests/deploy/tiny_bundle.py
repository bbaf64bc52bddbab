"""A tiny trained bundle for the container test when models/ ships none (the image is then run
with it mounted on /models). Needs the dev install (torch) and ../shared/data.

    python -m tests.deploy.tiny_bundle OUT_DIR      # writes OUT_DIR/tiny/manifest.json ...
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def build(models: Path) -> Path:
    from app.cli import main
    from tests.tiny import SST2, sst2_subset, tiny_teacher
    from training.data import read_examples

    if not SST2.is_dir():
        sys.exit(f"no shared data at {SST2}: cannot train a tiny bundle")
    bundle = models / "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, dev = sst2_subset(work, train_rows=300, dev_rows=64)
        teacher = tiny_teacher(work / "teacher", [e.text for e in read_examples(train).examples])
        main(["train", "fastbert", "--teacher", str(teacher), "--train", str(train), "--dev", str(dev),
              "--out", str(bundle), "--checkpoint", str(work / "ckpt"), "--label-names", "negative,positive",
              "--epochs", "1", "--distill-epochs", "1", "--lr", "1e-3", "--distill-lr", "1e-3",
              "--batch-size", "16", "--threads", "2"])
    return bundle


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
