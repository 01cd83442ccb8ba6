"""Model zoo costs: parameters, MFLOPs per image and the MB a client uploads per round.

The efficiency columns of FedCV (He et al. 2021), from XLA's cost analysis of the compiled
forward pass (a multiply-add counts as 2 FLOPs); nothing is executed, so every model at 224x224
takes seconds on a CPU.

    python benchmarks/models.py [--models=resnet18,vit_s16] [--image_size=224]
        [--num_classes=1000] [--norm=group] [--out=models.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fedjax_cv.models import get_model, model_names, model_report

# The zoo: every registered model but the small CNNs of the FL literature.
ZOO = tuple(n for n in model_names() if n not in ("logistic", "cnn_hsu", "cnn_emnist"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated model names")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--norm", default=None, help="override every model's norm field")
    parser.add_argument("--out", default=None, help="optional JSON file: a list, one per model")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in model_names()]
    if unknown:
        raise SystemExit(f"--models={unknown[0]!r} is unknown; known: {', '.join(model_names())}")
    shape = (args.image_size, args.image_size, 3)
    header = f"{'model':<20} {'params (M)':>11} {'MFLOPs/image':>13} {'MB/round':>10}"
    print(
        f"image {args.image_size}x{args.image_size}, {args.num_classes} classes, "
        f"norm {args.norm or 'of each model (group)'}; FLOPs from XLA, 2 per multiply-add"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        kwargs = {} if args.norm is None else {"norm": args.norm}
        report = model_report(get_model(name, args.num_classes, **kwargs), shape)
        row = {
            "model": name,
            "image_size": args.image_size,
            "num_classes": args.num_classes,
            **dataclasses.asdict(report),
            "params_m": report.num_params / 1e6,
            "mflops_per_image": report.flops_per_example / 1e6,
            "mb_per_round": report.bytes_per_round / 1e6,
        }
        rows.append(row)
        print(
            f"{name:<20} {row['params_m']:>11.2f} {row['mflops_per_image']:>13.0f} "
            f"{row['mb_per_round']:>10.1f}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
