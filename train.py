"""Train a SOL policy with GRPO.

    python train.py --config official_configs/cpu_smollm2_joint.yml --total_updates 40
    torchrun --nproc_per_node=2 train.py --config official_configs/tiny.yml --total_updates 2
    python train.py --resume checkpoints/RUN          # continue a stopped run exactly

The recipe lives in utils/trainer.py; this script parses arguments and turns known errors into one line.
"""
from __future__ import annotations

import argparse
import sys

from utils.checkpoint import load_checkpoint
from utils.cli import TRUST_HELP, OneLineErrorParser, SOLError
from utils.config import ConfigError, config_from_dict, describe_fields, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config fields (set in the YAML or with --set key=value):\n" + describe_fields())
    p.add_argument("--config", help="YAML/JSON config file (official_configs/*.yml); defaults apply to missing keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, repeatable (e.g. --set lr=3e-4 --set keep_fracs=[0.1,1.0])")
    p.add_argument("--total_updates", type=int, help="stop after N optimizer updates, at the end of the rollout pool "
                   "that reaches N (a pool's ppo_epochs x minibatches / grad_accum_steps steps are taken together); "
                   "checkpoint every N/10")
    p.add_argument("--output_dir", help="run directory (default: {output_dir field}/{run_name}-{timestamp})")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from policy_latest.pt (weights, optimizer, "
                   "counters, RNG and data position); uses the run's saved config")
    p.add_argument("--checkpoint_path", help="warm start: load policy weights from an exported policy directory (or its "
                   "policy.safetensors), a run's policy_*.pt or a bare state dict .pt (a fresh run otherwise)")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--wandb_project", help="log to Weights & Biases under this project (WANDB_MODE=offline writes the "
                   "run under {run dir}/wandb without a network; `wandb sync` uploads it later)")
    p.add_argument("--wandb_entity", help="Weights & Biases entity")
    p.add_argument("--wandb_run_name", help="Weights & Biases run name (default: run_name)")
    return p.parse_args(argv)


def check_wandb() -> None:
    """--wandb_project needs the package: fail before the model loads or a run directory is made."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_project needs the wandb package, which is not installed (pip install -r "
                          "requirements.txt)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.total_updates is not None and args.total_updates < 1:
            raise ConfigError(f"--total_updates must be >= 1, got {args.total_updates}")
        if args.wandb_project:
            check_wandb()
        if args.resume:
            if args.config or args.set or args.checkpoint_path or args.output_dir:
                raise ConfigError("--resume continues a run with its saved config; drop --config/--set/--checkpoint_path/--output_dir")
            cfg = config_from_dict(load_checkpoint(args.resume, "latest", trust=args.trust_checkpoint)["cfg"])
        else:
            cfg = load_config(args.config, args.set)
        from utils.trainer import GRPOTrainer, TrainArgs  # heavy imports after the cheap checks

        trainer = GRPOTrainer(cfg, TrainArgs(args.total_updates, args.output_dir, args.resume, args.checkpoint_path,
                                             args.wandb_project, args.wandb_entity, args.wandb_run_name,
                                             args.trust_checkpoint))
        run_dir = trainer.train()
    except (SOLError, OSError) as e:  # bad input, missing files, a full disk, a diverged run: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run_dir is not None and trainer.dist.is_main:
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
