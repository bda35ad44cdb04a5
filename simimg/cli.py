"""The `simimg` command line: one subcommand per job, a progress bar on stderr, `--json` alone on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from simimg.errors import SimimgError
from simimg.indexing import IndexJob, default_workers, run_index
from simimg.layout import resolve_home
from simimg.model import ARCHITECTURES

log = logging.getLogger("simimg")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except SimimgError as err:
        print(f"simimg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simimg: interrupted; re-run the same command to finish the job", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (an unknown --arch, a missing argument) get one line, like every other simimg error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simimg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does, on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


# --- shared option groups ------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    """An argparse type: a whole number >= low, so `-k 0` is a usage error rather than a quiet surprise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is too small (at least {low})")
    return value


def add_home(p: argparse.ArgumentParser, name_required: bool = True) -> None:
    p.add_argument("--name", required=name_required, help="index name (a folder under HOME)")
    p.add_argument("--home", help="where indexes live (default: $SIMIMG_HOME, else ./indexes)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="backbone (default densenet121)")
    p.add_argument("--weights", help="imagenet (default, torchvision's weights API), none (random init), "
                                     "or PATH to a state dict or an earlier simimg model folder")
    p.add_argument("--image-size", type=positive_int, help="crop size in pixels (default 224)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help="decode processes (default: all cores; `index` on the CPU decodes inline instead)")


def emit(args: argparse.Namespace, payload: object, human: Callable[[], None]) -> None:
    """Machine-readable JSON on stdout with --json; a human summary otherwise."""
    if args.json:
        json.dump(payload, sys.stdout, indent=None)
        sys.stdout.write("\n")
    else:
        human()


class ProgressBar:
    """A tqdm bar on stderr driven by (done, total) callbacks from the library."""

    def __init__(self, desc: str, unit: str = "img") -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- index ---------------------------------------------------------------------------------------------
def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images, root/<class>/<image>")
    add_home(p, name_required=False)
    add_model_options(p)
    p.set_defaults(workers=None)  # index_workers picks: all cores feeding a GPU, none on the CPU
    p.add_argument("--chunk-size", type=positive_int, default=512,
                   help="commit embeddings every this many images, so an interrupted run resumes (default 512)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first: minutes to start, faster per image on large folders")


def _run_index(args: argparse.Namespace) -> int:
    job = IndexJob(data_dir=args.data_dir, name=args.name or Path(args.data_dir).resolve().name,
                   home=str(resolve_home(args.home)), arch=args.arch, weights=args.weights,
                   image_size=args.image_size, device=args.device, batch_size=args.batch_size, workers=args.workers,
                   chunk_size=args.chunk_size, compile=args.compile)
    bar = ProgressBar(f"index {job.name}")
    try:
        report = run_index(job, progress=bar)
    finally:
        bar.close()

    def human() -> None:
        print(f"{report.name}: embedded {report.indexed}, removed {report.removed}, {report.total} in the index "
              f"(version {report.version}, {report.seconds:.1f} s on {report.device})")
        if report.rebuilt:
            print("the model changed, so every image was embedded again")
        for s in report.skipped:
            print(f"skipped {s.path}: {s.reason}")

    emit(args, report.to_dict(), human)
    return 0


# --- query ---------------------------------------------------------------------------------------------
def _query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_home(p)
    p.add_argument("-k", type=positive_int, default=10, help="how many neighbours (default 10)")
    p.add_argument("--label", help="only neighbours with this label")
    p.add_argument("--min-score", type=float, help="only neighbours at least this similar (cosine, -1 to 1)")
    p.add_argument("--device", default="auto")


def _run_query(args: argparse.Namespace) -> int:
    from simimg.search import SearchService

    service = SearchService(args.home, args.name, args.device)
    results = [service.query_file(path, args.k, args.label, args.min_score) for path in args.images]

    def human() -> None:
        for r in results:
            print(r.query)
            if r.prediction:
                top = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in r.prediction.top)
                print(f"  predicted: {r.prediction.label} ({top})")
            for n in r.neighbors:
                print(f"  {n.score:.4f}  {n.label or '-':<16} {n.path}")

    emit(args, [r.to_dict() for r in results], human)
    return 0


# --- info ----------------------------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_home(p)


def _run_info(args: argparse.Namespace) -> int:
    from simimg.search import SearchService

    info = SearchService(args.home, args.name, "cpu").info()

    def human() -> None:
        for key, value in info.items():
            if key != "labels":
                print(f"{key:>12}: {value}")
        for label, n in info["labels"].items():
            print(f"{'':>12}  {n:>7}  {label or '(no label)'}")

    emit(args, info, human)
    return 0


# --- train, evaluate, model-info -----------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="root/<class>/<image>, or root/{train,val}/<class>/<image>")
    add_home(p, name_required=False)
    add_model_options(p)
    p.set_defaults(batch_size=32)
    p.add_argument("--epochs", type=positive_int, help="default: 15 from pretrained weights, 80 from scratch (--weights none)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 pretrained, 2e-3 from scratch)")
    p.add_argument("--val-split", type=float, default=0.2, help="validation share when there is no val/ folder")
    p.add_argument("--freeze-epochs", type=int, help="head-only warm-up epochs (default: 3 pretrained, 0 scratch)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better validation loss, "
                                                 "counted once the learning rate is below half its peak "
                                                 "(default: 5 pretrained, 20 scratch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--memory-efficient", action="store_true", help="DenseNet checkpointing: less memory, slower")


def _run_train(args: argparse.Namespace) -> int:
    from simimg.train import EpochStats, TrainConfig, run_training

    config = TrainConfig(data_dir=args.data_dir, name=args.name or Path(args.data_dir).resolve().name,
                         home=str(resolve_home(args.home)), arch=args.arch, weights=args.weights or "imagenet",
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size or 224,
                         val_split=args.val_split, freeze_epochs=args.freeze_epochs, patience=args.patience,
                         device=args.device, seed=args.seed, resume=args.resume, workers=args.workers,
                         memory_efficient=args.memory_efficient)
    bars = [ProgressBar("epoch 1", unit="batch")]

    def on_epoch(s: EpochStats) -> None:
        bars[-1].close()
        print(f"epoch {s.epoch:>3} {s.phase:<8} train loss {s.train_loss:.4f} acc {s.train_accuracy:.3f} | "
              f"val loss {s.val_loss:.4f} acc {s.val_accuracy:.3f} | lr {s.lr:.2e} | {s.images_per_s:.1f} img/s "
              f"| {s.seconds:.1f} s", file=sys.stderr)
        bars.append(ProgressBar(f"epoch {s.epoch + 1}", unit="batch"))

    try:
        report = run_training(config, on_epoch=on_epoch, progress=lambda done, total: bars[-1](done, total))
    finally:
        bars[-1].close()

    def human() -> None:
        how = "stopped early" if report.stopped_early else "cancelled" if report.cancelled else "finished"
        print(f"{report.name}: {how} after {len(report.history)} epochs in {report.seconds:.1f} s on {report.device}; "
              f"kept epoch {report.best_epoch} (val accuracy {report.val_accuracy:.1%})")
        for s in report.skipped:
            print(f"skipped {s['path']}: {s['reason']}")

    emit(args, report.to_dict(), human)
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?",
                   help="evaluate on DATA_DIR/val if it exists, else on the validation split the model recorded")
    add_home(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=default_workers())


def _run_evaluate(args: argparse.Namespace) -> int:
    from simimg.evaluate import run_evaluation

    bar = ProgressBar(f"evaluate {args.name}")
    try:
        result = run_evaluation(args.name, args.home, args.data_dir, args.device, progress=bar,
                                batch_size=args.batch_size, workers=args.workers)
    finally:
        bar.close()

    def human() -> None:
        r = result["retrieval"]
        print(f"{result['name']}: {result['images']} validation images from {result['data_dir']}")
        print(f"accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}; retrieval against the "
              f"{r['gallery']} ({r['gallery_size']}): P@1 {r['p_at_1']:.3f}, P@10 {r['p_at_10']:.3f}, mAP {r['map']:.3f}")
        for label, m in result["per_class"].items():
            print(f"  {label:<20} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
                  f"({m['support']})")
        print("confusion (rows true, columns predicted): " + " | ".join(
            f"{c}: {row}" for c, row in zip(result["classes"], result["confusion_matrix"])))
        for m in result["most_confused"][:10]:
            print(f"  {m['probability']:.1%} {m['predicted']} but is {m['label']}: {m['path']}")

    emit(args, result, human)
    return 0


def _model_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="densenet121")
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch for the CUDA peak training memory")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-efficient", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")


def _run_model_info(args: argparse.Namespace) -> int:
    from simimg.train import model_info

    info = model_info(args.arch, args.image_size, args.device, args.batch_size, args.memory_efficient)
    def human() -> None:
        for key, value in info.items():
            print(f"{key:>24}: {value}")

    emit(args, info, human)
    return 0


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("index", "build or update an index of a folder (only new or changed files are embedded)",
     _index_arguments, _run_index),
    ("query", "find the images most similar to IMAGE (and its predicted class, with a trained model)",
     _query_arguments, _run_query),
    ("info", "what an index holds: counts per label, backbone, fingerprint, classifier", _info_arguments, _run_info),
    ("train", "fine-tune a classifier on class folders (or train one from scratch) into NAME's model",
     _train_arguments, _run_train),
    ("evaluate", "accuracy, per-class F1, confusion and retrieval quality of NAME's trained model",
     _evaluate_arguments, _run_evaluate),
    ("model-info", "parameters, GFLOPs per image, embedding size (and peak training memory on CUDA) of a backbone",
     _model_info_arguments, _run_model_info),
]

if __name__ == "__main__":
    sys.exit(main())
