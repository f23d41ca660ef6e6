"""The `sa2crq` command: every subcommand calls the same step functions as DVC and Prefect."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

from components.runtime.console import lines_when_redirected
from components.runtime.errors import guarded
from components.runtime.runtime_env import set_offline_defaults

EPILOG = """examples:
  sa2crq run                             whole pipeline on the default dataset (dvc repro), prints the report path
  sa2crq run --dataset climate-fever     the same pipeline on the search dataset
  sa2crq stage prepare                   one step, as DVC runs it
  sa2crq stage train_head -s tokenizer.sarq.tau=9   one step with a param override
  sa2crq compare                         every variant of eval.variants x eval.seeds, mean and std in one table
  sa2crq compare --variants TIGER,SA2CRQ -s dataset=climate-fever -s out_dir=outputs-cf
  sa2crq retrain --new-items new.jsonl   give new items SIDs, fine-tune, check, promote
  sa2crq candidates --a outputs/ab/A --b outputs --queries q.parquet
  sa2crq sweep --grid tokenizer.sarq.tau=[7,9] --grid seed=[0,1]
  sa2crq serve --port 8000               the live retriever over HTTP (README "Online service")
  sa2crq recover                         finish or roll back a promotion that was killed half-way
  sa2crq promote VERSION                 make a kept version live and prod (rollback: an earlier one)
  sa2crq versions                        the live version and the registry (GTO: versions, prod)
  sa2crq synth --items 1000000 --users 100000   a synthetic catalog in the generic format (--stats: vs amazon)

A bad param, input file or option stops with one line and exit status 2; --debug (or
SA2CRQ_DEBUG=1) shows the traceback instead.
"""


def _params(args: argparse.Namespace) -> dict:
    from components.runtime.config import load_params

    return load_params(args.params, args.set)


def cmd_stage(args: argparse.Namespace) -> int:
    from components.pipeline.stages import get_step
    from components.runtime.locks import launched_rank

    params = _params(args)
    summary = get_step(args.name)(params)
    if launched_rank() == 0:   # a worker rank of a multi-process run trains beside rank 0 and reports nothing
        print(json.dumps(summary or {}, indent=2, default=str))
    return 0


def cmd_resolve_params(args: argparse.Namespace) -> int:
    from components.runtime.resolved_params import run_resolve_params

    print(json.dumps(run_resolve_params(_params(args)), indent=2))
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    from components.pipeline.steps import STEPS
    from components.runtime.resolved_params import run_resolve_params

    first = (run_resolve_params.__doc__ or "").strip().splitlines()[0]
    print(f"{'resolve_params':16s} {run_resolve_params.__module__}.{run_resolve_params.__name__} "
          f"(sa2crq resolve-params, dvc.yaml's first stage): {first}")
    for name, step in STEPS.items():
        print(f"{name:16s} {step.__doc__}")
    return 0


def cmd_deps(args: argparse.Namespace) -> int:
    """Rewrite the code deps of dvc.yaml's and experiments/'s stages from the imports; --check: only check."""
    from components.runtime.errors import Sa2crqError
    from components.runtime.stage_deps import sync_dvc_file
    from flows.compare_dvc import sync_code_deps

    off = {**sync_dvc_file("dvc.yaml", check=args.check), **sync_code_deps(check=args.check)}
    if args.check and off:
        stage, diff = next(iter(off.items()))
        raise Sa2crqError(f"{stage}: code deps differ from what it imports (missing {diff['missing'] or 'none'}, "
                          f"not imported {diff['extra'] or 'none'}), {len(off)} stage(s) in all; run `sa2crq deps`")
    print(json.dumps({"rewritten": list(off)} if off else {"up_to_date": True}, indent=2))
    return 0


def cmd_fusion_objectives(args: argparse.Namespace) -> int:
    """What each fusion objective would choose from the trained retriever's validation grid, and its cost."""
    from components.retrieval.fusion_report import objectives_table

    print(objectives_table(_params(args)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the DVC pipeline; --dataset / --profile / -s are passed as dvc exp params (checked first).

    The out_dir lock is taken before DVC writes params.yaml and held across the run (its stages
    re-enter it, locks.lock_for_children): a second `sa2crq run` is refused and changes nothing."""
    sets = list(args.set)
    if args.dataset:
        sets.append(f"dataset={args.dataset}")
    if args.profile:
        sets.append(f"profile={args.profile}")
    from pathlib import Path

    from components.runtime.config import DEFAULT_PARAMS, dvc_set_params, load_params
    from components.runtime.errors import Sa2crqError
    from components.runtime.locks import lock_for_children
    from flows.step_io import require_dvc_out_dir

    if Path(args.params).resolve() != DEFAULT_PARAMS.resolve():
        raise Sa2crqError(f"{args.params}: `sa2crq run` runs dvc.yaml, whose stages read {DEFAULT_PARAMS} "
                          f"of this folder; copy the file there, or use `sa2crq stage <name> --params {args.params}`")
    params = load_params(args.params, sets)   # a bad value stops here, not inside the first DVC stage
    require_dvc_out_dir(params)
    dvc_sets = dvc_set_params(args.params, sets)   # -s beats the active profile in the stages too
    if dvc_sets:
        cmd = ["dvc", "exp", "run"] + [x for s in dvc_sets for x in ("-S", s)]
    else:
        cmd = ["dvc", "repro"]
    with lock_for_children(params):
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
    if rc == 0:
        print("\nreport: outputs/report/report.md (and report.html); metrics: `dvc metrics show`")
    if dvc_sets:
        # `dvc exp run -S` writes the overrides into params.yaml; a later plain run would reuse them.
        print("note: params.yaml now holds " + ", ".join(dvc_sets)
              + " (dvc exp run applies them); `git checkout params.yaml` returns to the defaults", flush=True)
    return rc


# The commands' entry points, imported when their command runs: plain imports a reader and a
# linter can follow, and torch or Prefect load only for the command that needs them.
def _retrain(**kw) -> dict:
    from flows.retrain_flow import retrain_flow

    return retrain_flow(**kw)


def _candidates(**kw) -> dict:
    from flows.candidates_flow import candidates_flow

    return candidates_flow(**kw)


def _sweep(**kw) -> dict:
    from flows.sweep_flow import sweep_flow

    return sweep_flow(**kw)


def _recover(**kw) -> dict:
    from components.lifecycle.versions import run_recover

    return run_recover(**kw)


def _promote(**kw) -> dict:
    from components.lifecycle.versions import run_promote

    return run_promote(**kw)


def _versions(**kw) -> dict:
    from components.lifecycle.versions import run_versions

    return run_versions(**kw)


def _synth(**kw) -> dict:
    from components.data.synth import run_synth

    return run_synth(**kw)


def cmd_flow(entry: Callable[..., dict], prefect: bool = True) -> Callable[[argparse.Namespace], int]:
    """A command that calls entry with the checked params; a Prefect flow first checks its server answers,
    and its expected errors print one line, without Prefect's run tracebacks (prefect_api.flow_logging)."""
    def run(args: argparse.Namespace) -> int:
        from contextlib import nullcontext

        params = _params(args)
        quiet = nullcontext()
        if prefect:
            from components.runtime.prefect_api import check_prefect_api, flow_logging

            check_prefect_api()
            quiet = flow_logging(params.get("out_dir", "outputs"), getattr(args, "debug", False))
        with quiet:
            result = entry(params=params, **{k: v for k, v in vars(args).items() if k.startswith("opt_")})
        print(json.dumps(result or {}, indent=2, default=str))
        return 0

    return run


def cmd_compare(args: argparse.Namespace) -> int:
    """The comparison through DVC (experiments/dvc.yaml): the overrides are kept in its plan, so each
    stage reads the same params."""
    from flows.compare_dvc import run_compare

    result = run_compare(_params(args), params_file=args.params, overrides=list(args.set),
                     opt_variants=args.opt_variants, opt_adopt=args.opt_adopt, opt_jobs=args.opt_jobs,
                     opt_results=args.opt_results)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_compare_step(args: argparse.Namespace) -> int:
    """One stage of experiments/dvc.yaml (what `dvc repro` runs for `sa2crq compare`)."""
    from flows.compare_dvc import run_step

    print(json.dumps(run_step(args.kind, args.set_id, variant=args.variant, seed=args.seed, baseline=args.baseline),
                     indent=2, default=str))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from components.serving.server import serve

    return serve(_params(args), host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sa2crq",
        description="Generative retrieval with adaptive semantic IDs (SA2CRQ): data, tokenizers, retriever, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: SA2CRQ_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug keeps the top-level value instead of resetting it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also: SA2CRQ_DEBUG=1)")
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -s tokenizer.sarq.tau=4 (repeatable)")
    common.add_argument("--wait", type=_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="when another run holds the output folder's lock, wait up to this long "
                             "(default: refuse at once; also SA2CRQ_LOCK_WAIT)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", parents=[common], help="run the whole pipeline through DVC and print where the report is")
    s.add_argument("--dataset", help="amazon-scientific (default) | climate-fever | generic")
    s.add_argument("--profile", help="default | smoke (a small slice, few epochs)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", parents=[common], help="run one pipeline step (what each DVC stage calls)")
    s.add_argument("name", help="step name; `sa2crq steps` lists them")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("resolve-params", parents=[common],
                       help="write <out_dir>/params.resolved.yaml: the params with the profile overlaid "
                            "(the first DVC stage; later stages list the keys they read from it)")
    s.set_defaults(func=cmd_resolve_params)

    s = sub.add_parser("steps", help="list the pipeline steps and the functions behind them")
    s.set_defaults(func=cmd_steps)

    s = sub.add_parser("deps", help="write the code deps of every DVC stage (dvc.yaml, experiments/) from the "
                                    "modules it imports (components/runtime/stage_deps.py)")
    s.add_argument("--check", action="store_true", help="change nothing; exit 2 naming a stage whose code deps are off")
    s.set_defaults(func=cmd_deps)

    s = sub.add_parser("fusion-objectives", parents=[common],
                       help="from the trained retriever's validation fusion grid (metrics/retriever_train.json): the "
                            "point each objective (recall@K, balanced, the configured one, without generation) "
                            "chooses and its validation recall at every eval.budgets K")
    s.set_defaults(func=cmd_fusion_objectives)

    s = sub.add_parser("compare", parents=[common],
                       help="the paper's Table 1: train and evaluate every tokenizer variant in eval.variants over eval.seeds")
    s.add_argument("--variants", dest="opt_variants", metavar="NAMES",
                   help="comma-separated names from eval.variants (default: all); 'none' = the baselines only")
    s.add_argument("--jobs", "-j", dest="opt_jobs", type=_positive_int, default=1, metavar="N",
                   help="train / evaluate N runs at a time (default 1; dvc repro itself runs one stage at a time)")
    s.add_argument("--results", dest="opt_results", metavar="FILE",
                   help="a subset of the comparison (--variants, -s eval.seeds / eval.baselines): write its results "
                        "file here (default <out_dir>/compare/_subset/results.json); results/<dataset>.json is "
                        "written only by the full comparison")
    s.add_argument("--adopt", dest="opt_adopt", action="store_true",
                   help="record the runs already on disk as done (dvc commit) instead of running anything")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("compare-step", help="one stage of the comparison (experiments/dvc.yaml runs it)")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    s.add_argument("kind", choices=["prepare", "embed", "train", "evaluate", "baseline", "aggregate"])
    s.add_argument("--set", dest="set_id", required=True, help="the comparison: the out_dir's key in compare.yaml")
    s.add_argument("--variant", help="train / evaluate: the variant's key")
    s.add_argument("--seed", type=int, help="train / evaluate / baseline: the seed")
    s.add_argument("--baseline", help="baseline: its eval.baselines name")
    s.set_defaults(func=cmd_compare_step)

    s = sub.add_parser("retrain", parents=[common], help="assign SIDs to new items, fine-tune with replay, check, promote")
    s.add_argument("--new-items", dest="opt_new_items", required=True, metavar="FILE",
                   help="new items in the data contract's item format (parquet / csv / jsonl)")
    s.set_defaults(func=cmd_flow(_retrain))

    s = sub.add_parser("candidates", parents=[common], help="write per-query top-K candidates for an A/B test")
    s.add_argument("--a", dest="opt_a", required=True, help="model version A (an output folder)")
    s.add_argument("--b", dest="opt_b", required=True, help="model version B (an output folder)")
    s.add_argument("--queries", dest="opt_queries", required=True, metavar="FILE", help="queries (data contract format)")
    s.add_argument("--k", dest="opt_k", type=_positive_int, default=100, help="candidates per query (default 100)")
    s.add_argument("--out", dest="opt_out", default="outputs/ab", help="output folder (default outputs/ab)")
    s.add_argument("--exclude-history", dest="opt_exclude_history", action=argparse.BooleanOptionalAction,
                   help="leave each history query's own items out of its candidates (default serve.exclude_history)")
    s.set_defaults(func=cmd_flow(_candidates))

    s = sub.add_parser("sweep", parents=[common], help="run a grid of params points in parallel and gather one table")
    s.add_argument("--grid", dest="opt_grid", action="append", default=[], metavar="KEY=[V1,V2]",
                   help="a swept param, e.g. --grid tokenizer.sarq.tau=[7,9] (repeatable)")
    s.set_defaults(func=cmd_flow(_sweep))

    s = sub.add_parser("serve", parents=[common],
                       help="serve the live retriever over HTTP: POST /retrieve, /health, /ready (README 'Online service')")
    s.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    s.add_argument("--port", type=_positive_int, help="port (default: serve.port, 8000)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("recover", parents=[common],
                       help="finish or roll back a promotion that was killed half-way (retrain and promote also do this first)")
    s.set_defaults(func=cmd_flow(_recover, prefect=False))

    s = sub.add_parser("promote", parents=[common],
                       help="make a kept version (versions/<v>/) live and prod in the registry; an earlier one = rollback")
    s.add_argument("opt_version", metavar="VERSION", help="a version under <out_dir>/versions/ (`sa2crq versions` lists them)")
    s.add_argument("--force", dest="opt_force", action="store_true",
                   help="promote a candidate that never passed the retrain checks (the output and the registry say so)")
    s.set_defaults(func=cmd_flow(_promote, prefect=False))

    s = sub.add_parser("versions", parents=[common], help="the live version and the model registry (GTO versions, prod)")
    s.set_defaults(func=cmd_flow(_versions, prefect=False))

    # counts are checked by run_synth (not argparse), so a bad one is one line, like every other bad input
    s = sub.add_parser("synth", parents=[common],
                       help="write a synthetic recommendation catalog of any size in the generic format (words from "
                            "amazon-scientific, Zipf popularity, topic histories, a planted next item)")
    s.add_argument("--items", dest="opt_items", metavar="N", help="catalog size (>= 50)")
    s.add_argument("--users", dest="opt_users", metavar="U", help="users; each gives leave-last-out queries")
    s.add_argument("--seed", dest="opt_seed", default="0", metavar="S", help="seed (default 0): same seed, same bytes")
    s.add_argument("--out", dest="opt_out", metavar="DIR",
                   help="folder written whole (default <out_dir>/synth/n<N>-u<U>-s<S>)")
    s.add_argument("--stats", dest="opt_stats", action="store_true",
                   help="also print its statistics beside amazon-scientific's (docs/SCALING.md)")
    s.set_defaults(func=cmd_flow(_synth, prefect=False))
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    lines_when_redirected()   # progress bars print lines when stderr is a file or a pipe
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    if getattr(args, "wait", None) is not None:
        from components.runtime.locks import WAIT_ENV

        os.environ[WAIT_ENV] = str(args.wait)  # an env var, so the stages `dvc repro` starts see it too
    return guarded(lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
