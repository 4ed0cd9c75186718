"""`ucseg-fast prepare`: synthetic data sets and conversions of an SSL4MIS set."""
from __future__ import annotations

from ..errors import InputError


def add_parser(sub) -> None:
    q = sub.add_parser("prepare", help="data preparation helpers")
    q.add_argument("what", choices=("synthetic", "synthetic3d", "npy", "export"),
                   help="synthetic: write a cardiac-like SSL4MIS set; synthetic3d: an LA-like "
                        "3D set (UA-MT layout, --patients = train volumes); npy: SSL4MIS -> .npy "
                        "(DALI readers.numpy); export: SSL4MIS slices -> PNG/JPEG image+mask folder")
    q.add_argument("--out", required=True)
    q.add_argument("--src", help="SSL4MIS folder (npy, export)")
    q.add_argument("--format", choices=("png", "jpg"), default="png", help="export image format")
    q.add_argument("--labeled-patients", type=int, default=7, help="export: labeled/ = their slices")
    q.add_argument("--patients", type=int, default=14)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_prepare)


def cmd_prepare(args, extra) -> int:
    from ..data.synthetic import write_synthetic_acdc
    if args.what == "synthetic":
        root = write_synthetic_acdc(args.out, n_train_patients=args.patients, seed=args.seed)
        print(f"wrote a synthetic cardiac-like SSL4MIS dataset to {root or args.out}")
        return 0
    if args.what == "synthetic3d":
        from ..data.synthetic import write_synthetic_la
        root = write_synthetic_la(args.out, n_train=args.patients, seed=args.seed)
        print(f"wrote a synthetic left-atrium-like 3D set (UA-MT layout) to {root}")
        return 0
    if args.what in ("npy", "export"):
        from ..data.folders import export_folder, ssl4mis_to_npy
        if not args.src:
            raise InputError(f"prepare {args.what} needs --src <SSL4MIS folder>")
        if args.what == "npy":
            n = ssl4mis_to_npy(args.src, args.out)
            print(f"wrote {n} .npy pairs (image float32, label uint8) to {args.out}")
        else:
            counts = export_folder(args.src, args.out, fmt=args.format, labeled_patients=args.labeled_patients)
            print(f"wrote {args.format.upper()} folder {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    raise InputError(f"unknown prepare target {args.what!r}")

