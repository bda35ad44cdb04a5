"""The `simimg` command line: one subcommand per job, a progress bar on stderr, `--json` alone on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from simimg.errors import SimimgError
from simimg.indexer import IndexJob, default_workers, run_index
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simimg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does, on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


# --- shared option groups ------------------------------------------------------------------------------
def add_home(p: argparse.ArgumentParser, name_required: bool = True) -> None:
    p.add_argument("--name", required=name_required, help="index name (a folder under HOME)")
    p.add_argument("--home", help="where indexes live (default: $SIMIMG_HOME, else ./indexes)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="backbone (default densenet121)")
    p.add_argument("--weights", help="imagenet (default, torchvision's weights API), none (random init), "
                                     "or PATH to a state dict or an earlier simimg model folder")
    p.add_argument("--image-size", type=int, help="crop size in pixels (default 224)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers(), help="decode processes (default: all cores)")


def emit(args: argparse.Namespace, payload: object, human: Callable[[], None]) -> None:
    """Machine-readable JSON on stdout with --json; a human summary otherwise."""
    if args.json:
        json.dump(payload, sys.stdout, indent=None)
        sys.stdout.write("\n")
    else:
        human()


class ProgressBar:
    """A tqdm bar on stderr driven by (done, total) callbacks from the library."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- index ---------------------------------------------------------------------------------------------
def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images, root/<class>/<image>")
    add_home(p, name_required=False)
    add_model_options(p)
    p.add_argument("--chunk-size", type=int, default=512,
                   help="commit embeddings every this many images, so an interrupted run resumes (default 512)")


def _run_index(args: argparse.Namespace) -> int:
    job = IndexJob(data_dir=args.data_dir, name=args.name or Path(args.data_dir).resolve().name,
                   home=str(resolve_home(args.home)), arch=args.arch, weights=args.weights,
                   image_size=args.image_size, device=args.device, batch_size=args.batch_size, workers=args.workers,
                   chunk_size=args.chunk_size)
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
    p.add_argument("-k", type=int, default=10, help="how many neighbours (default 10)")
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


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("index", "build or update an index of a folder (only new or changed files are embedded)",
     _index_arguments, _run_index),
    ("query", "find the images most similar to IMAGE (and its predicted class, with a trained model)",
     _query_arguments, _run_query),
    ("info", "what an index holds: counts per label, backbone, fingerprint, classifier", _info_arguments, _run_info),
]

if __name__ == "__main__":
    sys.exit(main())
