"""``layerprune fed``: FedLP federated training on Flower (simulation engine); see docs/federated.md."""
from __future__ import annotations

import argparse
import json

from layerprune.cli.common import _positive, _examples, DATA_DIR_HELP
from layerprune.errors import UserError
from layerprune.outputs import prepare_file


def add_parser(sub) -> None:
    s = sub.add_parser("fed", help="FedLP federated training on Flower (simulation engine); see docs/federated.md",
                       epilog=_examples("layerprune fed --scheme homo --keep-prob 0.5 --num-blocks 4 --rounds 4",
                                        "layerprune fed --scheme hetero --depth-flag 3 --partition dirichlet",
                                        "layerprune fed --lora-rank 8 --scheme homo --keep-prob 0.7 --clients 10 "
                                        "--fraction 0.3 --partition dirichlet",
                                        "layerprune fed --lora-rank 8 --model runs/wanda60 --save runs/wanda60-fed"))
    s.add_argument("--scheme", choices=["fedavg", "homo", "hetero"], default="homo",
                   help="fedavg (every layer every round), homo (each layer kept with --keep-prob), "
                        "hetero (clients of different depths)")
    s.add_argument("--keep-prob", type=float, default=0.5, help="homo: layer-preserving probability p in (0, 1]")
    s.add_argument("--clients", type=_positive, default=8, help="number of simulated clients")
    s.add_argument("--fraction", type=float, default=1.0, help="fraction of the clients sampled each round")
    s.add_argument("--rounds", type=_positive, default=10, help="federated rounds")
    s.add_argument("--model", default="smollm2-135m",
                   help="built-in name, .gguf file, model directory, layerprune run directory or hub id")
    s.add_argument("--lora-rank", type=int, default=0,
                   help="> 0: exchange only LoRA adapters of this rank on every block linear (base frozen, never "
                        "sent; a pruned base keeps its zeros); 0: full weights (default)")
    s.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x --lora-rank)")
    s.add_argument("--save", default=None,
                   help="with --lora-rank: save the merged global model (mask kept) as a run directory here")
    s.add_argument("--num-blocks", type=_positive, default=None, help="keep only the first N blocks (small CPU runs)")
    s.add_argument("--depth-flag", default="u",
                   help="hetero depth law: u (uniform over the levels) or a level F in 1..5 (P(depth=F)=0.6)")
    s.add_argument("--personal-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="hetero: every shallow client trains and keeps its own exit, never sent or aggregated (LoRA: "
                        "a translator of its last hidden state + its own final norm; full weights: its final norm and "
                        "untied head); on by default for hetero, as in the paper")
    s.add_argument("--personal-head", choices=["translator", "head-lora"], default="translator",
                   help="LoRA personal heads: translator (a d x d map of the last hidden state, the default) or "
                        "head-lora (a rank --lora-rank LoRA on the output head); both with their own final norm")
    s.add_argument("--head-steps", type=int, default=None,
                   help="LoRA personal heads: steps fitting a new personal head alone before its first round's "
                        "training (default: --local-steps)")
    s.add_argument("--partition", choices=["iid", "dirichlet"], default="iid",
                   help="client data: iid shards of the C4 pool, or a Dirichlet mix of C4 / WikiText-2 / PTB")
    s.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (non-IID)")
    s.add_argument("--local-steps", type=_positive, default=4, help="optimizer steps per client per round")
    s.add_argument("--seqlen", type=int, default=128, help="training window length")
    s.add_argument("--batch-size", type=_positive, default=2, help="windows per optimizer step")
    s.add_argument("--docs-per-client", type=_positive, default=50, help="non-IID: documents drawn per client")
    s.add_argument("--max-client-tokens", type=_positive, default=20_000, help="tokens kept per client shard")
    s.add_argument("--eval-windows", type=_positive, default=8, help="server evaluation windows per data set")
    s.add_argument("--eval-seqlen", type=_positive, default=256, help="server evaluation window length")
    s.add_argument("--fail-clients", default="", help="comma list of partitions that raise (robustness demo)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the shards, the hetero depths, LoRA init, local steps and client sampling (by "
                        "partition ID and round: the same partitions every round in every scheme)")
    s.add_argument("--lr", type=float, default=1e-4, help="client learning rate")
    s.add_argument("--unweighted", action="store_true", help="the paper's plain mean instead of example-weighted")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--out", default="runs/fed", help="folder for the result JSON and plot")
    s.add_argument("--force", action="store_true",
                   help="replace an earlier result of the same scheme in --out (and a layerprune run at --save)")
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.federated import FedConfig, run_federated
    from layerprune.federated.run import check_outputs

    if not 0.0 < args.keep_prob <= 1.0:
        raise UserError(f"--keep-prob {args.keep_prob} must be in (0, 1]")
    flag = args.depth_flag.strip().lower()
    if flag != "u" and not flag.isdigit():
        raise UserError(f"--depth-flag {args.depth_flag!r}: use u (uniform depths) or a level number such as 3")
    try:
        fail = tuple(int(x) for x in args.fail_clients.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--fail-clients {args.fail_clients!r}: give partition numbers such as 0,3") from None
    cfg = FedConfig(model=args.model, scheme=args.scheme, keep_prob=args.keep_prob, clients=args.clients,
                    fraction=args.fraction, rounds=args.rounds, num_blocks=args.num_blocks,
                    depth_flag=None if flag == "u" else int(flag), partition=args.partition, alpha=args.alpha,
                    personal_heads=args.personal_heads, head_steps=args.head_steps, personal_head=args.personal_head,
                    local_steps=args.local_steps, seqlen=args.seqlen, batch_size=args.batch_size, lr=args.lr,
                    lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, weighted=not args.unweighted,
                    docs_per_client=args.docs_per_client, max_client_tokens=args.max_client_tokens,
                    eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, fail_clients=fail, seed=args.seed,
                    data_dir=args.data_dir, out_dir=args.out, save_dir=args.save, force=args.force,
                    verbose=args.verbose)
    resolve_data_dir(args.data_dir)  # a bad --data-dir fails before the model loads
    for f in cfg.output_files():
        prepare_file(f, args.force, inputs=[args.model])
    check_outputs(cfg)
    res = run_federated(cfg)
    print(json.dumps(res["summary"] | ({"saved": res["saved"]} if "saved" in res else {}), indent=1, default=str))
    return 0
