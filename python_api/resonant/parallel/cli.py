"""`resonant train-async ENV --workers N --episodes-per-worker E [--memory isolated] [--engine ray]`.

The agent options are `resonant train`'s (train_cli.add_agent_options). Writes NAME.json (config,
summary with decisions/s, predictor batch sizes, latencies, per-worker returns) and NAME.png.
Exit status: 0 finished, 1 a worker failed (its traceback is printed), 130 interrupted (Ctrl-C);
the report is written in every case.
"""
from __future__ import annotations

import functools
import sys


def add_subcommand(subparsers) -> None:
    from ..train_cli import add_agent_options

    p = subparsers.add_parser(
        "train-async", help="train EngramBrain agents asynchronously on one shared (or isolated) memory",
        description="N workers step their own environments; one predictor answers their decisions in batches with "
                    "one fused read of the memory; one writer stores their finished episodes. Writes NAME.json and "
                    "NAME.png to --out.")
    add_agent_options(p)
    p.add_argument("--workers", type=int, default=8, help="workers (agents), each with its own environment "
                   "(default: %(default)s)")
    p.add_argument("--workers-per-process", type=int, default=1,
                   help="local engine: workers one process hosts, stepped in lock step with one decision message per "
                        "step; e.g. 4 on 2 cores for 8 workers (default: %(default)s: a process per worker)")
    p.add_argument("--predictor-workers", type=int, default=0,
                   help="local engine: workers the predictor's own process steps between its reads, while the worker "
                        "processes step theirs; e.g. 4 (and --workers-per-process 4) on 2 cores for 8 workers "
                        "(default: %(default)s: every worker in a worker process)")
    p.add_argument("--spin-wait-ms", type=float, default=None,
                   help="local engine: how long a waiting side (a worker process for its scores, the predictor for "
                        "the decisions of its batch) polls its pipe before it blocks; 0: never (default: 5 ms where "
                        "the worker processes and the predictor's own fit the cores, else 0)")
    p.add_argument("--episodes-per-worker", type=int, default=200,
                   help="episodes each worker plays (default: %(default)s)")
    p.add_argument("--memory", choices=("shared", "isolated"), default="shared",
                   help="one memory for all workers, or one per worker (default: %(default)s)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="worker processes on this machine, or Ray actors (the `ray` extra) (default: %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or ray://HEAD:10001); default: start a local instance")
    p.add_argument("--batch-size", type=int, default=64,
                   help="most decisions the predictor answers with one read (default: %(default)s)")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="how long the predictor waits for every playing worker's decision (default: %(default)s)")
    p.add_argument("--on-worker-error", choices=("stop", "restart"), default="stop",
                   help="a failed worker stops the run, or is restarted on its remaining episodes (default: %(default)s)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts allowed in all (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop the run cleanly after this long")
    p.add_argument("--predictor-threads", type=int, default=1,
                   help="torch threads of the predictor's reads (default: %(default)s: leaves the other cores to "
                        "the workers)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..runs import run_dir
    from ..train_cli import ENVS, brain_options, build_brain, env_spaces, print_summary
    from .control import WorkerFailed
    from .trainer import AsyncTrainer

    env_id = ENVS.get(args.env, args.env)
    state_dim, num_actions = env_spaces(env_id)
    options = brain_options(args)
    if args.memory == "isolated" and options["store"] != "torch":
        print("resonant train-async: --memory isolated needs --store torch (one in-process memory per worker)",
              file=sys.stderr)
        return 2
    args.estimator, args.k = options["scoring"].estimator, options["scoring"].k
    options["fresh"] = True  # no resume here (resonant train resumes a Milvus memory): start from an empty one
    torch.manual_seed(args.seed)
    trainer = AsyncTrainer(functools.partial(build_brain, options, state_dim, num_actions), env_id,
                           num_workers=args.workers, episodes_per_worker=args.episodes_per_worker, memory=args.memory,
                           engine=args.engine, seed=args.seed, action_repeat=args.action_repeat,
                           normalise_episodes=args.normalise_episodes, batch_size=args.batch_size,
                           batch_timeout=args.batch_timeout_ms / 1e3, on_worker_error=args.on_worker_error,
                           max_restarts=args.max_restarts, max_seconds=args.max_seconds,
                           ray_address=args.ray_address, predictor_threads=args.predictor_threads,
                           workers_per_process=args.workers_per_process, predictor_workers=args.predictor_workers,
                           spin_wait=None if args.spin_wait_ms is None else args.spin_wait_ms / 1e3)
    status = 0
    try:
        trainer.train(progress=not args.no_progress)
    except WorkerFailed as exc:
        print(f"resonant train-async: stopped: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("resonant train-async: interrupted; every finished episode was stored", file=sys.stderr)
        status = 130
    name = args.name or f"async_{args.env}_{args.memory}_w{args.workers}_seed{args.seed}"
    out = run_dir(name, args.out)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("func", "milvus_token")}
    extra = {"cli": config}
    if trainer.server is not None:  # the local engine: the memories' learnt relevance (--relevance-every)
        extra["relevance"] = [None if b.scoring.relevance is None else list(b.scoring.relevance)
                              for b in trainer.server.brains]
    summary = trainer.write_report(out, name, extra=extra)
    print_summary(name, {k: v for k, v in summary.items() if k != "per_worker"}, out)
    return status
