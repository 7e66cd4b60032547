"""`resonant train ENV --episodes N --store torch|milvus-lite:PATH|milvus:URI`.

Writes NAME.json (config, every episode's return, summary) and NAME.png (learning curve) to
runs/NAME/ under the current directory, or to --out. A Milvus store outlives the run: running the
same command again resumes it (the engrams, the observation normaliser they were stored under,
epsilon and the episode count, kept in the collection's metadata), unless --fresh.

The agent's options (add_agent_options) and its construction (brain_options, build_brain) are
shared with `resonant train-async` (resonant/parallel/cli.py).
"""
from __future__ import annotations

import argparse
import os

from .extras import require
from .runs import add_out_argument, run_dir

ENVS = {"lunarlander": "LunarLander-v3", "cartpole": "CartPole-v1", "acrobot": "Acrobot-v1",
        "mountaincar": "MountainCar-v0", "subgrid": "resonant/SubGridWorld-v0"}


def parse_store(spec: str):
    """'torch' -> ('torch', None); 'milvus-lite:PATH' -> ('milvus', PATH); 'milvus:URI' -> ('milvus', URI)."""
    if spec == "torch":
        return "torch", None
    for prefix in ("milvus-lite:", "milvus:"):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return "milvus", spec[len(prefix):]
    raise argparse.ArgumentTypeError(f"--store must be torch, milvus-lite:PATH (a .db path) or milvus:URI; "
                                     f"got {spec!r}")


STATE_FORMAT = "resonant.train/1"
# Flags that shape the stored outcomes (discounted returns): a resumed memory must share them.
OUTCOME_FLAGS = ("gamma", "n_step", "action_repeat")


class ResumeError(ValueError):
    """A stored memory that this run cannot continue; the message says why and how to start over."""


def resume(store, args, env_id: str, brain) -> int:
    """Restores the normaliser and epsilon the stored engrams were written under; returns the
    number of episodes played before (0 for an empty store)."""
    from .trainer import Normaliser
    import torch

    if len(store) == 0:
        return 0
    where = f"collection {store.collection!r} at {store.uri} holds {len(store)} engrams"
    state = store.metadata().get("resonant.train")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{where} but no record of the observation normaliser they were stored under; "
                          f"pass --fresh to start over")
    if state["env"] != env_id:
        raise ResumeError(f"{where} from {state['env']}, not {env_id}; pass --fresh to start over")
    differing = [f"--{k.replace('_', '-')} {state['outcomes'][k]} (now {getattr(args, k)})" for k in OUTCOME_FLAGS
                 if state["outcomes"].get(k) != getattr(args, k)]
    if differing:
        raise ResumeError(f"{where} whose outcomes were computed with {', '.join(differing)}; rerun with the same "
                          f"values or pass --fresh")
    mean, std = (torch.tensor(state["normaliser"][k], dtype=torch.float32) for k in ("mean", "std"))
    if mean.shape != (brain.state_dim,) or std.shape != (brain.state_dim,) or not bool((std > 0).all()):
        raise ResumeError(f"{where} but its stored normaliser does not fit {brain.state_dim}-dim states; "
                          f"pass --fresh")
    brain.normalise = Normaliser(mean, std)
    brain.epsilon = float(state["epsilon"])
    return int(state["episodes"])


def save_state(store, args, env_id: str, brain, episodes: int) -> None:
    """Records, beside the engrams, what a later run needs to continue them (see `resume`)."""
    if brain.normalise is None:
        return  # nothing stored yet: the first episodes are random play that waits for the normaliser
    state = {"format": STATE_FORMAT, "env": env_id, "episodes": episodes, "epsilon": brain.epsilon,
             "normaliser": {"mean": brain.normalise.mean.tolist(), "std": brain.normalise.std.tolist()},
             "outcomes": {k: getattr(args, k) for k in OUTCOME_FLAGS}}
    store.set_metadata({**store.metadata(), "resonant.train": state})


def add_agent_options(p) -> None:
    """The brain's and the store's options, shared by `resonant train` and `resonant train-async`."""
    # Defaults: the chosen LunarLander configuration in BENCHMARKS.md (tuned on seeds 0-3, checked on seeds 4-7).
    p.add_argument("env", help=f"one of {sorted(ENVS)} or any Gymnasium id with Discrete actions")
    p.add_argument("--store", type=parse_store, default=("torch", None),
                   help="torch (default, in memory), milvus-lite:PATH (an embedded Milvus Lite database at PATH, "
                        "ending in .db) or milvus:URI (a server, e.g. milvus:http://host:19530); a Milvus store "
                        "is resumed when it exists")
    p.add_argument("--fresh", action="store_true",
                   help="drop the Milvus collection this run would resume and start from an empty memory")
    p.add_argument("--milvus-token", default=os.environ.get("MILVUS_TOKEN", ""),
                   help="token for a Milvus server, 'user:password' or an API key (default: $MILVUS_TOKEN)")
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
    p.add_argument("--avoid-repeats", action="store_true",
                   help="within an episode, score the actions already taken at exactly the same observation below "
                        "the others until all have been taken there (breaks a greedy agent's loops in deterministic "
                        "environments)")
    p.add_argument("--relevance-every", type=int, default=None, metavar="EPISODES",
                   help="learn a per-dimension relevance of the kernel's distances from the memory (the leave-one-out "
                        "error of the stored outcomes) every this many remembered episodes (default: off; kernel-"
                        "weighted scoring with --store torch only)")
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
    add_out_argument(p, "NAME", "NAME.json and NAME.png")
    p.add_argument("--name", default=None,
                   help="output file stem (default engram_ENV_seedS, with _fromN when resuming after N episodes)")
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
    """What build_brain takes, from parsed arguments: the store's options and the brain's option
    groups (the estimator's default resolved; a Milvus store scores from the 50 nearest by default)."""
    from .engram import Exploration, LearnedRelevance, Outcomes, Scoring

    estimator = args.estimator or ("local_linear" if args.outcome_temperature is None else "mean")
    kind, uri = args.store
    scoring = Scoring(k=50 if kind == "milvus" and args.k is None else args.k,  # Milvus answers k-NN queries only
                      bandwidth=args.bandwidth, match_threshold=args.match_threshold,
                      recency_halflife=args.recency_halflife, estimator=estimator, ridge=args.ridge,
                      outcome_temperature=args.outcome_temperature)
    return {"store": kind, "uri": uri, "collection": f"engrams_{args.env}_seed{args.seed}", "index": args.index,
            "capacity": args.capacity, "eviction": args.eviction, "seed": args.seed,
            "fresh": getattr(args, "fresh", False), "token": getattr(args, "milvus_token", ""), "scoring": scoring,
            "outcomes": Outcomes(gamma=args.gamma, n_step=args.n_step, credit=args.credit),
            "exploration": Exploration(policy=args.policy, beta=args.beta, epsilon_decay=args.epsilon_decay,
                                       epsilon_end=args.epsilon_end, avoid_repeats=args.avoid_repeats),
            "relevance": None if args.relevance_every is None else LearnedRelevance(every=args.relevance_every)}


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
                                  capacity=o["capacity"], eviction=o["eviction"], drop_existing=o["fresh"],
                                  seed=o["seed"], token=o["token"])
    return EngramBrain(store, scoring=o["scoring"], outcomes=o["outcomes"], exploration=o["exploration"],
                       seed=o["seed"], relevance=o.get("relevance"))


def print_summary(name: str, summary: dict, out_dir) -> None:
    print(f"{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                                  if not isinstance(v, dict)))
    print(f"wrote {os.path.join(out_dir, name)}.json and .png")


def run(args) -> int:
    # everything a run needs, checked before the first episode rather than when the report is written
    require("gymnasium", "rl", "resonant train")
    require("matplotlib", "rl", "resonant train")
    import torch

    from .trainer import Trainer

    env_id = ENVS.get(args.env, args.env)
    state_dim, num_actions = env_spaces(env_id)
    options = brain_options(args)
    args.estimator, args.k = options["scoring"].estimator, options["scoring"].k
    torch.manual_seed(args.seed)
    brain = build_brain(options, state_dim, num_actions)
    store = brain.store
    milvus = options["store"] == "milvus"
    try:
        before = resume(store, args, env_id, brain) if milvus else 0
    except ResumeError:
        store.close()
        raise
    if before:
        print(f"resuming {len(store)} engrams after {before} episodes ({store.uri}); --fresh starts over")
    trainer = Trainer(brain, env_id, num_envs=args.num_envs, seed=args.seed, action_repeat=args.action_repeat,
                      normalise_episodes=args.normalise_episodes, first_episode=before)
    try:
        trainer.train(args.episodes, progress=not args.no_progress)
    finally:
        trainer.close()
        if milvus:
            save_state(store, args, env_id, brain, before + len(trainer.result.episode_returns))
        store.close()
    name = args.name or f"engram_{args.env}_seed{args.seed}" + (f"_from{before}" if before else "")
    out = run_dir(name, args.out)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("func", "milvus_token")}
    summary = trainer.write_report(out, name, extra={"config": config, "episodes_before": before})
    print_summary(name, summary, out)
    return 0
