"""Feature extraction or fine-tuning? Every approach on the same data, in one run.

    python benchmarks/compare.py ../shared/data/hymenoptera --backbone efficientnet_lite0
    python benchmarks/compare.py digits --image-size 64          # scikit-learn's digits

The library's `embedcache compare` (embedcache.comparison.compare) on DATA; the
table, JSON and plot are copied to benchmarks/results/compare_NAME.* with the
command and the machine. DATA "digits" writes scikit-learn's digits first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, save

from embedcache import compare
from embedcache.config import AUGMENTS
from embedcache.quickstart import DIGITS_AUGMENT, write_digits


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", help="an image folder, or 'digits'")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--unfreeze", action="append", default=None, help="repeat for several [default: 2]"
    )
    p.add_argument(
        "--augment",
        default=None,
        choices=AUGMENTS,
        help="finetune's augmentation [default: light; none for digits]",
    )
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument(
        "--views", type=int, default=4, help="views per image of the cached-views rows (0: none)"
    )
    p.add_argument(
        "--no-tutorial", action="store_true", help="leave out the tutorial recipe (the slow row)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--name", default=None, help="results stem [default: compare_DATA_BACKBONE_DEVICE]"
    )
    p.add_argument(
        "--note", default="", help="a sentence printed under the table (e.g. 'random-init weights')"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits") if args.data == "digits" else Path(args.data)
        r = compare(
            data,
            backbone=args.backbone,
            weights=args.weights,
            image_size=args.image_size,
            unfreeze=tuple(args.unfreeze or ["2"]),
            augment=args.augment or (DIGITS_AUGMENT if args.data == "digits" else "light"),
            finetune_epochs=args.finetune_epochs,
            views=args.views,
            tutorial=not args.no_tutorial,
            workdir=Path(tmp) / "work",
            device=args.device,
            title=f"{Path(args.data).name}",
            progress=False,
            log=lambda line: print(line, flush=True),
        )
        device = json.loads(r.files["json"].read_text())["meta"]["device"].split(":")[0]
        name = (
            args.name
            or f"compare_{Path(args.data).name}_{args.backbone.replace(':', '_')}_{device}"
        )
        payload = json.loads(r.files["json"].read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(r.files["plot"], RESULTS / f"{name}.png")
    md = (
        r.markdown
        + (f"\n\n{args.note}" if args.note else "")
        + f"\n\n![val accuracy against wall time]({name}.png)"
    )
    path = save(name, payload, md)
    print(path.read_text())


if __name__ == "__main__":
    main()
