"""`resonant train ENV --episodes N --store torch|milvus-lite:PATH|milvus:URI`.

The agent's options (add_agent_options) and its construction (brain_options, build_brain) are
shared with `resonant train-async` (resonant/parallel/cli.py)."""
from __future__ import annotations

import argparse
import os

ENVS = {"lunarlander": "LunarLander-v3", "cartpole": "CartPole-v1", "acrobot": "Acrobot-v1",
        "mountaincar": "MountainCar-v0", "subgrid": "resonant/SubGridWorld-v0"}


def parse_store(spec: str):
    """'torch' -> ('torch', None); 'milvus-lite:PATH' -> ('milvus', PATH); 'milvus:URI' -> ('milvus', URI)."""
    if spec == "torch":
        return "torch", None
    for prefix in ("milvus-lite:", "milvus:"):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return "milvus", spec[len(prefix):]
    raise argparse.ArgumentTypeError(f"--store must be torch, milvus-lite:PATH or milvus:URI; got {spec!r}")


def add_agent_options(p) -> None:
    """The brain's and the store's options, shared by `resonant train` and `resonant train-async`."""
    # Defaults: the chosen LunarLander configuration in BENCHMARKS.md (tuned on seeds 0-3, checked on seeds 4-7).
    p.add_argument("env", help=f"one of {sorted(ENVS)} or any Gymnasium id with Discrete actions")
    p.add_argument("--store", type=parse_store, default=("torch", None),
                   help="torch (default), milvus-lite:PATH (embedded) or milvus:URI (server)")
    p.add_argument("--seed", type=int, default=0, help="seeds resets, exploration and eviction (default: %(default)s)")
    p.add_argument("--k", type=int, default=None,
                   help="score from the k nearest engrams (default: kernel-weighted over all; needs --store torch)")
    p.add_argument("--bandwidth", type=float, default=0.3,
                   help="kernel width in normalised-state units (default: %(default)s)")
    p.add_argument("--match-threshold", type=float, default=None,
                   help="kernel-weighted scoring ignores engrams farther than this (default: 3 bandwidths)")
    p.add_argument("--gamma", type=float, default=0.96,
                   help="discount per decision (default: %(default)s ≈ 0.99 per step with --action-repeat 4)")
    p.add_argument("--n-step", type=int, default=None,
                   help="bootstrap outcomes n steps ahead from the memory (default: Monte-Carlo returns)")
    p.add_argument("--credit", choices=("discount", "glow"), default="discount",
                   help="outcomes: discounted returns, or projective simulation's glow credit with glow rate "
                        "1 - gamma (cut where a state-action pair repeats) (default: %(default)s)")
    p.add_argument("--recency-halflife", type=float, default=None,
                   help="halve an engram's evidence for every this many engrams stored after it (default: no decay)")
    p.add_argument("--outcome-temperature", type=float, default=None,
                   help="score actions by their exp(outcome/T)-weighted mean outcome, between mean and max "
                        "(default: the mean)")
    p.add_argument("--estimator", choices=("mean", "local_linear"), default=None,
                   help="an action's score near a state: the intercept of a local linear fit of outcome on state "
                        "(corrects for where each action's engrams lie; over the whole memory, or over the k "
                        "nearest with --k; the default) or the weighted mean (the default with --outcome-temperature, "
                        "which the fit cannot use)")
    p.add_argument("--ridge", type=float, default=0.01,
                   help="local_linear: ridge on the slope, relative to bandwidth² times the evidence "
                        "(default: %(default)s)")
    p.add_argument("--policy", choices=("epsilon_greedy", "softmax"), default="epsilon_greedy",
                   help="action selection: epsilon-greedy, or softmax P(a) ∝ exp(beta·score) (default: %(default)s)")
    p.add_argument("--beta", type=float, default=1.0,
                   help="softmax inverse temperature, in 1/outcome units (default: %(default)s)")
    p.add_argument("--epsilon-decay", type=float, default=0.99,
                   help="epsilon factor per remembered episode (default: %(default)s)")
    p.add_argument("--epsilon-end", type=float, default=0.0,
                   help="floor of the exploration rate (0: fully greedy once epsilon has decayed)")
    p.add_argument("--capacity", type=int, default=200_000, help="engrams kept (default: %(default)s)")
    p.add_argument("--eviction", choices=("oldest", "random", "smallest"), default="oldest",
                   help="which engrams go when the memory is full (default: %(default)s)")
    p.add_argument("--index", choices=("FLAT", "IVF_FLAT", "HNSW"), default="FLAT", help="Milvus index type")
    p.add_argument("--action-repeat", type=int, default=4,
                   help="environment steps each decision is held for (default: %(default)s)")
    p.add_argument("--normalise-episodes", type=int, default=20,
                   help="random episodes whose states fix the observation normaliser (0: raw observations; "
                        "default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for NAME.json and NAME.png (default: %(default)s)")
    p.add_argument("--name", default=None, help="output file stem (default engram_ENV_seedS)")
    p.add_argument("--no-progress", action="store_true")


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an EngramBrain on a discrete-action Gymnasium env",
                              description="Train an EngramBrain; writes NAME.json and NAME.png to --out.")
    add_agent_options(p)
    p.add_argument("--episodes", type=int, default=1500, help="episodes to train (default: %(default)s)")
    p.add_argument("--num-envs", type=int, default=8,
                   help="environments stepped side by side, one batched decision for all (default: %(default)s)")
    p.set_defaults(func=run)


def env_spaces(env_id: str) -> tuple[int, int]:
    """(state_dim, num_actions) of a Gymnasium environment (the resonant/ ones registered first)."""
    from .parallel.worker import make_env

    probe = make_env(env_id)
    try:
        return int(probe.observation_space.shape[0]), int(probe.action_space.n)
    finally:
        probe.close()


def brain_options(args) -> dict:
    """The options build_brain takes, from parsed arguments (the estimator's default resolved)."""
    estimator = args.estimator or ("local_linear" if args.outcome_temperature is None else "mean")
    kind, uri = args.store
    return {"store": kind, "uri": uri, "collection": f"engrams_{args.env}_seed{args.seed}", "index": args.index,
            "capacity": args.capacity, "eviction": args.eviction, "seed": args.seed,
            "k": 50 if kind == "milvus" and args.k is None else args.k,  # Milvus answers k-NN queries only
            "bandwidth": args.bandwidth, "match_threshold": args.match_threshold, "gamma": args.gamma,
            "n_step": args.n_step, "credit": args.credit, "recency_halflife": args.recency_halflife,
            "outcome_temperature": args.outcome_temperature, "estimator": estimator, "ridge": args.ridge,
            "policy": args.policy, "beta": args.beta, "epsilon_decay": args.epsilon_decay,
            "epsilon_end": args.epsilon_end}


def build_brain(options: dict, state_dim: int, num_actions: int):
    """An EngramBrain over a new store from brain_options(...) (module-level: picklable with
    functools.partial for the asynchronous trainer's memory actor)."""
    from .engram import EngramBrain, TorchEngramStore

    o = options
    if o["store"] == "torch":
        store = TorchEngramStore(state_dim, num_actions, capacity=o["capacity"], eviction=o["eviction"],
                                 seed=o["seed"])
    else:
        from .engram.milvus_store import MilvusEngramStore

        store = MilvusEngramStore(state_dim, num_actions, o["uri"], collection=o["collection"], index_type=o["index"],
                                  capacity=o["capacity"], eviction=o["eviction"], drop_existing=True, seed=o["seed"])
    return EngramBrain(state_dim, num_actions, store, k=o["k"], bandwidth=o["bandwidth"],
                       match_threshold=o["match_threshold"], gamma=o["gamma"], epsilon_decay=o["epsilon_decay"],
                       epsilon_end=o["epsilon_end"], seed=o["seed"], n_step=o["n_step"],
                       recency_halflife=o["recency_halflife"], outcome_temperature=o["outcome_temperature"],
                       estimator=o["estimator"], ridge=o["ridge"], policy=o["policy"], beta=o["beta"],
                       credit=o["credit"])


def print_summary(name: str, summary: dict, out_dir) -> None:
    print(f"{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                                  if not isinstance(v, dict)))
    print(f"wrote {os.path.join(out_dir, name)}.json and .png")


def run(args) -> int:
    import torch

    from .trainer import Trainer

    env_id = ENVS.get(args.env, args.env)
    state_dim, num_actions = env_spaces(env_id)
    options = brain_options(args)
    args.estimator, args.k = options["estimator"], options["k"]
    torch.manual_seed(args.seed)
    brain = build_brain(options, state_dim, num_actions)
    trainer = Trainer(brain, env_id, num_envs=args.num_envs, seed=args.seed, action_repeat=args.action_repeat,
                      normalise_episodes=args.normalise_episodes)
    try:
        trainer.train(args.episodes, progress=not args.no_progress)
    finally:
        trainer.close()
        brain.store.close()
    name = args.name or f"engram_{args.env}_seed{args.seed}"
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"}
    summary = trainer.write_report(args.out, name, extra={"config": config})
    print_summary(name, summary, args.out)
    return 0
