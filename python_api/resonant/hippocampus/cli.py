"""`resonant serve hippocampus` and `resonant experiment recall`."""
from __future__ import annotations


def _set_threads(threads) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)  # torch's ops and the fused cpu kernels (one OpenMP runtime)


def serve(args) -> int:
    from ..extras import require

    uvicorn = require("uvicorn", "serve", "resonant serve hippocampus")
    from .server import create_app

    _set_threads(args.threads)
    app = create_app(backend=args.backend, max_models=args.max_models, max_train_passes=args.max_train_passes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def experiment(args) -> int:
    from .experiment import main

    _set_threads(args.threads)
    return main(args)


def add_subcommand(subparsers) -> None:
    from ..cli import subgroup

    p = subgroup(subparsers, "serve").add_parser(
        "hippocampus", help="pattern-completion memories over HTTP (OpenAPI docs at /docs)",
        description="Serve named PatternMemory models over a REST API (the seed's routes; docs at /docs).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=1323, help="port (default: %(default)s, the seed's)")
    p.add_argument("--backend", default="auto", help="resonant_kernels backend of every read (default: %(default)s)")
    p.add_argument("--max-models", type=int, default=64, help="most named models held at once (default: %(default)s)")
    p.add_argument("--max-train-passes", type=int, default=160_000,
                   help="most epochs × runs × copies one train request may ask for (default: %(default)s)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per operation (default: torch's, one per core); 1 suits many small concurrent "
                        "models")
    p.set_defaults(func=serve)

    p = subgroup(subparsers, "experiment").add_parser(
        "recall", help="recall vs corruption and number of patterns (the seed's tutorial experiment)",
        description="Recall of 144-unit patterns (36 active) as N = 2..20 patterns are stored and cues lose "
                    "r = 0..0.9 of their active units; writes results.json, results.npy and heatmap.png.")
    p.add_argument("--url", default=None, help="run against a `resonant serve hippocampus` server at URL "
                                               "(default: an in-process PatternMemory)")
    p.add_argument("--model", default="recall-experiment", help="the server model to use with --url "
                                                                "(default: %(default)s)")
    p.add_argument("--out", default="runs/recall-experiment", help="output folder (default: %(default)s)")
    p.add_argument("--max-n", type=int, default=20, help="N = 2, 4, …, MAX_N patterns (default: %(default)s)")
    p.add_argument("--trials", type=int, default=10, help="fresh pattern sets per N (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs per set (default: %(default)s, the seed's)")
    p.add_argument("--runs", type=int, default=1, help="training restarts per set (default: %(default)s)")
    p.add_argument("--copies", type=int, default=4,
                   help="corrupted copies of each pattern per epoch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="pattern and training seed (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="in-process backend (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per operation (default: %(default)s: the grid's reads are small, and fork/join "
                        "waits of more threads cost more than they save, badly so on a busy machine)")
    p.add_argument("--compare-untrained", action="store_true",
                   help="also test each set before training (a third table)")
    p.set_defaults(func=experiment)
