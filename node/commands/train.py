"""`edgenode train`: train the mask-conditioned U-Net on healthy images (phantoms or a DICOM folder).

A run checkpoints every few minutes (beside the weights unless --checkpoint says where) and the same command
resumes it after any interruption, kill -9 included; it prints a progress line every 30 s and writes the loss
curve as <name>.loss.png beside the weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config import Settings

# inference.unet.PRESETS' names, written out so that parsing the command line does not import torch; a test keeps
# the two the same
PRESET_NAMES = ("tiny", "small", "medium", "base")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="where to write the EMA weights (.safetensors)")
    parser.add_argument("--name", default="chest-ct-small", help="model name stored in the weights")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint file, saved often and resumed from (default: <out>.ckpt; its training images are cached "
        "in <checkpoint>.pool.pt)",
    )
    parser.add_argument("--data", type=Path, default=None, help="folder of healthy DICOM series (default: phantoms)")
    parser.add_argument(
        "--modality",
        default="CT",
        help="what the model is for, written into its metadata (the node runs it on nothing else): CT, or CR,DX "
        "(phantom radiographs); a --data folder must hold only these",
    )
    parser.add_argument("--body-part", default="CHEST", help="body part it is trained for (metadata)")
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES, help="U-Net preset (inference.unet.PRESETS)")
    parser.add_argument("--image-size", type=int, default=None, help="model grid (overrides the preset)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--t-max", type=int, default=350, help="train on timesteps below this")
    parser.add_argument("--noise", choices=["simplex", "gaussian"], default="simplex")
    parser.add_argument("--noise-octaves", type=int, default=6, help="simplex octaves")
    parser.add_argument("--noise-base-frequency", type=float, default=2**-6, help="simplex cycles/pixel")
    parser.add_argument(
        "--noise-persistence", type=float, default=0.8, help="simplex weight ratio of each octave to the one below"
    )
    parser.add_argument("--unconditioned", action="store_true", help="zero condition channel (ablation)")
    parser.add_argument("--subjects", type=int, default=120, help="phantom subjects in the pool")
    parser.add_argument("--phantom-size", type=int, default=256)
    parser.add_argument("--phantom-slices", type=int, default=24)
    parser.add_argument("--rotate", type=float, default=0.0, help="augmentation: max rotation in degrees")
    parser.add_argument("--jitter", type=float, default=0.0, help="augmentation: intensity gain/offset jitter")
    parser.add_argument("--flip", action="store_true", help="augmentation: left-right flips (not anatomical)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest on a busy CPU)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop and save after this many seconds")
    parser.add_argument(
        "--fit-time",
        type=float,
        default=0.0,
        help="train as many steps as fit in this many seconds (at most --steps), timed over the warm-up and counted "
        "from the start, building the training images included",
    )
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints (whichever comes first)"
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these weights (fine-tune; same preset and grid)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from inference.train import TrainConfig, ship, train

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.steps < 1 or args.batch_size < 1:
        print("edgenode train: --steps and --batch-size must be >= 1")
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"edgenode train: --data {args.data} is not a folder")
        return 2
    cfg = TrainConfig(
        preset=args.preset,
        image_size=args.image_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        t_max=args.t_max,
        noise=args.noise,
        noise_octaves=args.noise_octaves,
        noise_base_frequency=args.noise_base_frequency,
        noise_persistence=args.noise_persistence,
        conditioned=not args.unconditioned,
        seed=args.seed,
        subjects=args.subjects,
        phantom_size=args.phantom_size,
        phantom_slices=args.phantom_slices,
        data_dir=str(args.data or ""),
        modalities=tuple(m.strip().upper() for m in args.modality.split(",") if m.strip()),
        body_part=args.body_part,
        rotate_degrees=args.rotate,
        intensity_jitter=args.jitter,
        flip=args.flip,
        device=args.device,
        time_limit_s=args.time_limit,
        fit_time_s=args.fit_time,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        init_from=str(args.init or ""),
    )
    if args.init is not None and not args.init.is_file():
        print(f"edgenode train: --init {args.init} is not a file")
        return 2
    try:
        cfg.unet_config()
    except ValueError as exc:
        print(f"edgenode train: {exc}")
        return 2
    checkpoint = args.checkpoint or args.out.with_name(args.out.name.removesuffix(".safetensors") + ".ckpt")
    if args.checkpoint_every < 1 or args.checkpoint_minutes < 0:
        print("edgenode train: --checkpoint-every must be >= 1 and --checkpoint-minutes >= 0")
        return 2
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint: {checkpoint} (the same command resumes from it)", flush=True)
    try:
        result = train(cfg, checkpoint)
    except ValueError as exc:
        print(f"edgenode train: {exc}")
        return 2
    curve = ship(result, result.config, args.out, args.name)
    final = f"final loss {result.losses[-1]:.4f}" if result.losses else "no steps"
    print(
        f"{args.out}: {result.steps_done} steps in {result.wall_s:.0f} s ({result.precision}), {final}; "
        f"loss curve {curve}"
    )
    return 0
