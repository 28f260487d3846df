"""``layerprune fed``: FedLP federated training on Flower (simulation engine); see docs/federated.md."""
from __future__ import annotations

import json

from layerprune.cli.common import _positive, _examples, DATA_DIR_HELP
from layerprune.errors import UserError
from layerprune.outputs import prepare_file


def add_parser(sub) -> None:
    s = sub.add_parser("fed", help="FedLP federated training on Flower (simulation engine); see docs/federated.md",
                       epilog=_examples("layerprune fed --scheme homo --keep-prob 0.5 --num-blocks 4 --rounds 4",
                                        "layerprune fed --scheme hetero --depth-flag 3 --partition dirichlet"))
    s.add_argument("--scheme", choices=["fedavg", "homo", "hetero"], default="homo",
                   help="fedavg (every layer every round), homo (each layer kept with --keep-prob), "
                        "hetero (clients of different depths)")
    s.add_argument("--keep-prob", type=float, default=0.5, help="homo: layer-preserving probability p in (0, 1]")
    s.add_argument("--clients", type=_positive, default=8, help="number of simulated clients")
    s.add_argument("--rounds", type=_positive, default=10, help="federated rounds")
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--num-blocks", type=_positive, default=None, help="keep only the first N blocks (small CPU runs)")
    s.add_argument("--depth-flag", default="u",
                   help="hetero depth law: u (uniform over the levels) or a level F in 1..5 (P(depth=F)=0.6)")
    s.add_argument("--partition", choices=["iid", "dirichlet"], default="iid",
                   help="client data: iid shards of the C4 pool, or a Dirichlet mix of C4 / WikiText-2 / PTB")
    s.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (non-IID)")
    s.add_argument("--local-steps", type=_positive, default=4, help="optimizer steps per client per round")
    s.add_argument("--seqlen", type=int, default=128, help="training window length")
    s.add_argument("--lr", type=float, default=1e-4, help="client learning rate")
    s.add_argument("--unweighted", action="store_true", help="the paper's plain mean instead of example-weighted")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--out", default="runs/fed", help="folder for the result JSON and plot")
    s.add_argument("--force", action="store_true", help="replace an earlier result of the same scheme in --out")
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.federated import FedConfig, run_federated

    if not 0.0 < args.keep_prob <= 1.0:
        raise UserError(f"--keep-prob {args.keep_prob} must be in (0, 1]")
    flag = args.depth_flag.strip().lower()
    if flag != "u" and not flag.isdigit():
        raise UserError(f"--depth-flag {args.depth_flag!r}: use u (uniform depths) or a level number such as 3")
    cfg = FedConfig(model=args.model, scheme=args.scheme, keep_prob=args.keep_prob, clients=args.clients,
                    rounds=args.rounds, num_blocks=args.num_blocks, depth_flag=None if flag == "u" else int(flag),
                    partition=args.partition, alpha=args.alpha, local_steps=args.local_steps, seqlen=args.seqlen,
                    lr=args.lr, weighted=not args.unweighted, data_dir=args.data_dir, out_dir=args.out,
                    verbose=args.verbose)
    resolve_data_dir(args.data_dir)  # a bad --data-dir fails before the model loads
    for f in cfg.output_files():
        prepare_file(f, args.force, inputs=[args.model])
    res = run_federated(cfg)
    print(json.dumps(res["summary"], indent=1))
    return 0
