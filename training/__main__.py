"""`convserve-train`: one subcommand per model family, plus `all` for the default set.

Each family's trainer owns its flags (`add_arguments`) and its entry point (`run_from_args`);
this module only routes to them, so adding a family (gan, scenes-resnet, captioner) is one
entry in TRAINERS and, if it belongs to the default set, one in DEFAULT_MODELS. `all --jobs N`
trains N models at a time, each in a process of its own with one torch thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.contract.manifest import CONFIG_FILE
from training import train_butd, train_captioner, train_classifier, train_gan, train_scenes_resnet
from training.export import published_versions
from training.runs import CHECKPOINT_FILE


@dataclass(frozen=True)
class Trainer:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run_from_args: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class DefaultModel:
    """A model `all` trains: its repository name and how to train and publish it."""

    name: str
    train: Callable[..., dict]  # (seed, run_dir, repository, quick, progress) -> metrics


TRAINERS: dict[str, Trainer] = {
    "classifier": Trainer(
        help="LeNet-5 on scikit-learn's digits",
        add_arguments=train_classifier.add_arguments,
        run_from_args=train_classifier.run_from_args,
    ),
    "gan": Trainer(
        help="label-conditional DCGAN on scikit-learn's digits",
        add_arguments=train_gan.add_arguments,
        run_from_args=train_gan.run_from_args,
    ),
    "scenes-resnet": Trainer(
        help="a residual network naming the large object in generated scenes",
        add_arguments=train_scenes_resnet.add_arguments,
        run_from_args=train_scenes_resnet.run_from_args,
    ),
    "captioner": Trainer(
        help="a show-attend-tell captioner (CNN encoder, LSTM with soft attention) on generated scenes",
        add_arguments=train_captioner.add_arguments,
        run_from_args=train_captioner.run_from_args,
    ),
    "captioner-butd": Trainer(
        help="a bottom-up top-down captioner (region detector, two-LSTM decoder) on generated scenes",
        add_arguments=train_butd.add_arguments,
        run_from_args=train_butd.run_from_args,
    ),
}


#: dcgan joins these once the server can serve generators (the Generate RPC).
def train_dcgan(run_dir: Path, **kwargs: object) -> dict:
    """The DCGAN, judged by the LeNet-5 that `all` trained beside it when there is one."""
    judge = run_dir.parent / train_classifier.MODEL_NAME / CHECKPOINT_FILE
    return train_gan.run(run_dir=run_dir, classifier_checkpoint=judge if judge.is_file() else None, **kwargs)


DEFAULT_MODELS: list[DefaultModel] = [
    DefaultModel(name=train_classifier.MODEL_NAME, train=train_classifier.run),
    DefaultModel(name=train_scenes_resnet.MODEL_NAME, train=train_scenes_resnet.run),  # minutes
    DefaultModel(name=train_gan.MODEL_NAME, train=train_dcgan),  # a quarter of an hour
    DefaultModel(name=train_captioner.MODEL_NAME, train=train_captioner.run),  # 17 minutes
    DefaultModel(name=train_butd.MODEL_NAME, train=train_butd.run),
]


def has_published_version(repository: Path, name: str) -> bool:
    """True when `<repository>/<name>` has a manifest and at least one integer version directory."""
    model_dir = repository / name
    return (model_dir / CONFIG_FILE).is_file() and bool(published_versions(model_dir))


def run_all(args: argparse.Namespace) -> int:
    """Train and publish the default models (or those named by --only); --missing skips published ones."""
    known = [model.name for model in DEFAULT_MODELS]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        print(
            f"convserve-train all: unknown model(s) {', '.join(unknown)}; default models: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    if args.jobs < 1:
        print(f"convserve-train all: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    chosen = []
    for model in DEFAULT_MODELS:
        if args.only and model.name not in args.only:
            continue
        if args.missing and has_published_version(args.repository, model.name):
            print(f"{model.name}: already published in {args.repository}, skipped")
            continue
        chosen.append(model)
    options = {
        "seed": args.seed,
        "repository": args.repository,
        "quick": args.quick,
        "progress": not args.no_progress
        and args.jobs == 1,  # bars of parallel runs would overwrite each other
    }
    first = [m for m in chosen if args.jobs == 1 or m.name == train_classifier.MODEL_NAME]
    for model in first:  # lenet5 judges the DCGAN: it is trained before the others start
        model.train(run_dir=args.runs / model.name, **options)
    rest = [m for m in chosen if m not in first]
    if not rest:
        return 0
    # In DEFAULT_MODELS order, each as soon as a process is free. "spawn": a forked copy of a
    # process that has torch's thread pools can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(model.train, run_dir=args.runs / model.name, **options) for model in rest]
        for future in futures:
            future.result()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve-train", description="Train, export and publish models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, trainer in TRAINERS.items():
        sub = commands.add_parser(name, help=trainer.help, description=trainer.help)
        trainer.add_arguments(sub)
        sub.set_defaults(handler=trainer.run_from_args)

    every = commands.add_parser(
        "all", help="every default model", description="Train and publish every default model."
    )
    every.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository to publish into (default: models)",
    )
    every.add_argument(
        "--runs", type=Path, default=Path("runs"), help="parent of the run directories (default: runs)"
    )
    every.add_argument("--missing", action="store_true", help="skip models already published (default: off)")
    every.add_argument(
        "--only", nargs="+", metavar="MODEL", help="only these default models, e.g. lenet5 (default: all)"
    )
    every.add_argument("--quick", action="store_true", help="a few epochs only, for tests (default: off)")
    every.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    every.add_argument("--no-progress", action="store_true", help="hide the progress bars (default: off)")
    every.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="models trained at a time, one process and thread each (default: 1)",
    )
    every.set_defaults(handler=run_all)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
