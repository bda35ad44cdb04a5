"""The `simimg` command line: one subcommand per job, a progress bar on stderr, `--json` alone on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import simimg
from simimg import (
    ARCHITECTURES,
    DEFAULT_ARCH,
    ENGINES,
    EXPLAIN_METHODS,
    EXPORT_FORMATS,
    INDEX_KINDS,
    PRECISIONS,
    PREDICT_FORMATS,
    AuditJob,
    IndexJob,
    PredictJob,
    ServeConfig,
    TrainConfig,
)
from simimg.errors import SimimgError

if TYPE_CHECKING:
    from simimg import AuditReport, EpochStats, IndexReport, PredictReport, TrainReport

log = logging.getLogger("simimg")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    simimg.reuse_freed_memory()  # process-wide allocator tuning: the entry point opts in, the library never does
    try:
        return args.run(args) or 0
    except SimimgError as err:
        print(f"simimg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simimg: interrupted; re-run the same command to finish the job", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"simimg: error: {err.strerror or err}{where}: the disk is full, read-only or over a size limit; nothing "
            "half-written was published (the last version still serves): make room (or the folder writable), then "
            "re-run the same command",
            file=sys.stderr,
        )
        return 2


# a full disk, a quota, a file-size limit, a read-only file system: the user's to fix, not a bug's traceback
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (an unknown --arch, a missing argument) get one line, like every other simimg error."""

    def error(self, message: str) -> NoReturn:
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


def add_model_options(p: argparse.ArgumentParser, config: type[IndexJob] | type[TrainConfig]) -> None:
    """The model and compute options `simimg index` and `simimg train` share; defaults from the job's config."""
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help=f"backbone (default {DEFAULT_ARCH})")
    p.add_argument(
        "--weights",
        help="imagenet (default, torchvision's weights API), none (random init), "
        "or PATH to a state dict or an earlier simimg model folder",
    )
    p.add_argument("--image-size", type=positive_int, help="crop size in pixels (default 224)")
    add_compute(p, config)
    p.add_argument("--batch-size", type=positive_int, default=config.batch_size, help="(default %(default)s)")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        help="decode processes (default: all cores feeding a GPU; none on the CPU, which decodes inline)",
    )


def add_compute(p: argparse.ArgumentParser, config: type[Any] = IndexJob) -> None:
    p.add_argument("--device", default=config.device, help="auto, cpu or cuda (default auto: CUDA when present)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=config.precision,
        help="auto (default): bf16 where the device has native bf16 units (CUDA, or a CPU with "
        "AVX512-BF16 or AMX), else fp32 (CPU training: fp32); fp32 or bf16 force one",
    )


def given(args: argparse.Namespace, *keys: str) -> dict:
    """The options the user set: the rest keep the library's own defaults, which live in one place."""
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def emit(args: argparse.Namespace, payload: object, human: Callable[[], None]) -> None:
    """Machine-readable JSON on stdout with --json; a human summary otherwise."""
    if args.json:
        json.dump(payload, sys.stdout, indent=None)
        sys.stdout.write("\n")
    else:
        human()


class ProgressBar:
    """A tqdm bar on stderr driven by (done, total) callbacks from the library."""

    bar: Any  # a tqdm bar from the first callback on (None before)

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
    add_model_options(p, IndexJob)
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=IndexJob.chunk_size,
        help="commit embeddings every this many images, so an interrupted run resumes (default %(default)s)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first: minutes to start, faster per image on large folders",
    )
    p.add_argument(
        "--index-kind",
        choices=("auto", *INDEX_KINDS),
        help="FAISS index: flat (exact), ivf, or ivfpq (compressed, 264 bytes a vector, exact re-rank "
        "from the stored vectors); auto picks by size (default: as last built, else auto)",
    )
    p.add_argument(
        "--on-disk",
        action=argparse.BooleanOptionalAction,
        help="keep an ivfpq index's lists in a file per version, memory-mapped, for collections larger than RAM "
        "(--no-on-disk: in RAM); default: as last built, else on disk once they would take 1/8 of this machine's RAM",
    )
    p.add_argument(
        "--unlabeled",
        metavar="DIR",
        help="a folder of unlabeled images to index too: searchable, predicted, never trained on (an unlabeled/ "
        "folder beside the class folders is found anyway; default: as last built)",
    )
    add_engine(p, IndexJob, "HOME/NAME/runs")


def add_engine(p: argparse.ArgumentParser, config: type[IndexJob] | type[PredictJob], shards: str) -> None:
    """Where images are embedded: this process or Ray Data (`simimg index` and `simimg predict`)."""
    group = p.add_argument_group("the ray engine (pip install 'simimg[ray]'; see docs/SCALING.md)")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=config.engine,
        help="where images are embedded: this process (default), or Ray Data on a cluster",
    )
    group.add_argument(
        "--address",
        help="the Ray cluster: host:port, ray://host:port or auto (default: $RAY_ADDRESS, else a local Ray instance)",
    )
    group.add_argument(
        "--ray-actors",
        type=positive_int,
        help="embedding actors (default: one per GPU of the cluster, else one per 4 CPUs)",
    )
    group.add_argument(
        "--ray-shards",
        metavar="URI",
        help="where the run's Parquet shards go: a folder every node reaches, or s3://..., gs://... "
        f"(default {shards})",
    )


def _run_index(args: argparse.Namespace) -> int:
    name = args.name or simimg.folder_name(args.data_dir)
    bar = ProgressBar(f"index {name}")
    try:
        report = simimg.build_index(
            args.data_dir,
            name,
            args.home,
            progress=bar,
            arch=args.arch,
            weights=args.weights,
            image_size=args.image_size,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
            compile=args.compile,
            engine=args.engine,
            address=args.address,
            ray_actors=args.ray_actors,
            ray_shards=args.ray_shards,
            index_kind=args.index_kind,
            on_disk=args.on_disk,
            unlabeled=args.unlabeled,
        )
    finally:
        bar.close()
    emit(args, report.to_dict(), lambda: print_index_report(report))
    return 0


def print_index_report(report: IndexReport) -> None:
    print(
        f"{report.name}: embedded {report.indexed}, removed {report.removed}, {report.total} in the index "
        f"(version {report.version}, model {report.model}, {report.seconds:.1f} s on {report.device})"
    )
    if report.rebuilt:
        print(
            f"the model's embedding changed: the search index was rebuilt from its vectors "
            f"({report.indexed} images needed one)"
        )
    for s in report.skipped:
        print(f"skipped {s.path}: {s.reason}")


# --- predict -------------------------------------------------------------------------------------------
def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DIR", help="the images to classify: any folder, subfolders included")
    add_home(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write, a row per readable image")
    p.add_argument(
        "--format",
        choices=PREDICT_FORMATS,
        help="csv, parquet or jsonl (default: from FILE's extension: .csv, .parquet, .jsonl)",
    )
    p.add_argument(
        "--top-k", type=positive_int, default=PredictJob.top_k, help="top labels per row (default %(default)s)"
    )
    p.add_argument(
        "--uncertain-margin",
        type=float,
        default=PredictJob.uncertain_margin,
        help="flag a row uncertain when its top two probabilities are closer than this, or when its nearest "
        "labelled image has another label (default %(default)s)",
    )
    add_compute(p, PredictJob)
    p.add_argument("--batch-size", type=positive_int, default=PredictJob.batch_size, help="(default %(default)s)")
    p.add_argument("--workers", type=non_negative_int, help="decode processes (default: as `simimg index`)")
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=PredictJob.chunk_size,
        help="write results every this many images, so a killed run resumes (default %(default)s)",
    )
    add_engine(p, PredictJob, "FILE.parts/runs")


def _run_predict(args: argparse.Namespace) -> int:
    bar = ProgressBar(f"predict {args.name}")
    try:
        report = simimg.predict(
            args.data_dir,
            args.name,
            args.out,
            args.home,
            progress=bar,
            **{
                key: getattr(args, key)
                for key in (
                    "format",
                    "top_k",
                    "uncertain_margin",
                    "device",
                    "precision",
                    "batch_size",
                    "workers",
                    "chunk_size",
                    "engine",
                    "address",
                    "ray_actors",
                    "ray_shards",
                )
            },
        )
    finally:
        bar.close()
    emit(args, report.to_dict(), lambda: print_predict_report(report))
    return 0


def print_predict_report(report: PredictReport) -> None:
    resumed = f", {report.resumed} from an interrupted run" if report.resumed else ""
    print(
        f"{report.out}: {report.rows} images classified ({report.uncertain} uncertain), {len(report.skipped)} "
        f"skipped{resumed} (model {report.model}, version {report.version}, {report.seconds:.1f} s on {report.device})"
    )
    for s in report.skipped:
        print(f"skipped {s.path}: {s.reason}")


# --- query ---------------------------------------------------------------------------------------------
def _query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_home(p)
    p.add_argument("-k", type=positive_int, default=10, help="how many neighbours (default 10)")
    p.add_argument("--label", help="only neighbours with this label")
    p.add_argument("--min-score", type=float, help="only neighbours at least this similar (cosine, -1 to 1)")
    add_compute(p)


def _run_query(args: argparse.Namespace) -> int:
    index = simimg.open_index(args.name, args.home, args.device, args.precision)
    images = args.images[0] if len(args.images) == 1 else args.images  # one bad file alone is an error
    found = index.search(images, args.k, args.label, args.min_score)
    results = [found] if len(args.images) == 1 else found

    def human() -> None:
        for r in results:
            print(r.query)
            if r.error:
                print(f"  skipped: {r.error}")
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
    info = simimg.index_info(args.name, args.home)

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
    add_model_options(p, TrainConfig)
    p.set_defaults(weights=TrainConfig.weights, image_size=TrainConfig.image_size)
    p.add_argument(
        "--epochs", type=positive_int, help="default: 15 from pretrained weights, 80 from scratch (--weights none)"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 pretrained, 2e-3 from scratch)")
    p.add_argument(
        "--val-split",
        type=float,
        default=TrainConfig.val_split,
        help="validation share when there is no val/ folder (default %(default)s)",
    )
    p.add_argument("--freeze-epochs", type=int, help="head-only warm-up epochs (default: 3 pretrained, 0 scratch)")
    p.add_argument(
        "--patience",
        type=int,
        help="stop after this many epochs without a better validation loss, "
        "counted once the learning rate is below half its peak "
        "(default: 5 pretrained, 20 scratch)",
    )
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--memory-efficient", action="store_true", help="DenseNet checkpointing: less memory, slower")
    p.add_argument(
        "--head-only",
        action="store_true",
        help="fit only a classifier on the embeddings the index already stores: seconds, nothing "
        "re-embedded; a folder with images the index does not hold (new, changed, or another "
        "collection's) is refused",
    )
    p.add_argument(
        "--embed-missing",
        action="store_true",
        help="with --head-only (ignored without it): embed the images the index does not hold with its "
        "serving model (not added to the index) instead of refusing",
    )
    p.add_argument(
        "--no-index",
        dest="index",
        action="store_false",
        help="stop after training: keep the new model without serving it (`simimg use` serves it later)",
    )


class TrainBars:
    """The train command's stderr: a bar per phase, a line per epoch."""

    def __init__(self) -> None:
        self.bar = ProgressBar("loading", unit="batch")

    def on_phase(self, phase: str) -> None:
        self.bar.close()
        self.bar = ProgressBar(phase, unit="batch" if phase == "training" else "img")

    def on_epoch(self, s: EpochStats) -> None:
        print(
            f"\repoch {s.epoch:>3} {s.phase:<8} train loss {s.train_loss:.4f} acc {s.train_accuracy:.3f} | "
            f"val loss {s.val_loss:.4f} acc {s.val_accuracy:.3f} | lr {s.lr:.2e} | {s.images_per_s:.1f} img/s "
            f"| {s.seconds:.1f} s",
            file=sys.stderr,
        )


def _run_train(args: argparse.Namespace) -> int:
    options = {
        key: getattr(args, key)
        for key in (
            "arch",
            "epochs",
            "lr",
            "freeze_epochs",
            "patience",
            "seed",
            "val_split",
            "device",
            "precision",
            "resume",
            "workers",
            "memory_efficient",
            "embed_missing",
            "batch_size",
            "index",
            "weights",
            "image_size",
        )
    }
    bars = TrainBars()
    hooks = simimg.Hooks(
        on_epoch=bars.on_epoch, progress=lambda done, total: bars.bar(done, total), on_phase=bars.on_phase
    )
    try:
        report = simimg.train(
            args.data_dir,
            args.name,
            args.home,
            head_only=args.head_only,
            hooks=hooks,
            **options,
        )
    finally:
        bars.bar.close()
    emit(args, report.to_dict(), lambda: print_train_report(report))
    return 0


def print_train_report(report: TrainReport) -> None:
    if report.kind == "head":
        h = report.head
        print(
            f"{report.name}: fitted a classifier on {h['from_catalog']} stored and {h['embedded']} new embeddings "
            f"in {report.seconds:.1f} s (C={h['C']:g}); val accuracy {report.val_accuracy:.1%}; model {report.model}"
        )
    else:
        how = "stopped early" if report.stopped_early else "cancelled" if report.cancelled else "finished"
        print(
            f"{report.name}: {how} after {len(report.history)} epochs in {report.seconds:.1f} s on {report.device}; "
            f"kept epoch {report.best_epoch} (val accuracy {report.val_accuracy:.1%}) as model {report.model or '-'}"
        )
    if report.index is not None:
        print(
            f"serving it: version {report.index.version}, {report.index.total} images ({report.index.indexed} embedded)"
        )
    elif report.model:
        print(f"not serving it yet: `simimg use {report.model} --name {report.name}` serves it")
    for s in report.skipped:
        print(f"skipped {s['path']}: {s['reason']}")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        nargs="?",
        help="evaluate on DATA_DIR/val if it exists, else on the validation split the model recorded",
    )
    add_home(p)
    add_compute(p)
    p.add_argument("--batch-size", type=positive_int, help="(default: simimg.evaluate's, 64)")
    p.add_argument("--workers", type=non_negative_int)
    p.add_argument("--model", help="a kept model's fingerprint (or a unique prefix); default: the one serving")


def _run_evaluate(args: argparse.Namespace) -> int:
    bar = ProgressBar(f"evaluate {args.name}")
    try:
        result = simimg.evaluate(
            args.data_dir,
            args.name,
            args.home,
            model=args.model,
            progress=bar,
            **given(args, "device", "precision", "batch_size", "workers"),
        )
    finally:
        bar.close()

    def human() -> None:
        r = result["retrieval"]
        print(
            f"{result['name']} (model {result['model']}): {result['images']} validation images from "
            f"{result['data_dir']}"
        )
        print(
            f"accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}; retrieval against the "
            f"{r['gallery']} ({r['gallery_size']}): P@1 {r['p_at_1']:.3f}, P@10 {r['p_at_10']:.3f}, "
            f"mAP {r['map']:.3f}"
        )
        for label, m in result["per_class"].items():
            print(
                f"  {label:<20} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
                f"({m['support']})"
            )
        print(
            "confusion (rows true, columns predicted): "
            + " | ".join(f"{c}: {row}" for c, row in zip(result["classes"], result["confusion_matrix"]))
        )
        for m in result["most_confused"][:10]:
            print(f"  {m['probability']:.1%} {m['predicted']} but is {m['label']}: {m['path']}")

    emit(args, result, human)
    return 0


def _model_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCH)
    p.add_argument("--image-size", type=positive_int, help="(default 224)")
    p.add_argument("--batch-size", type=positive_int, help="batch for the CUDA peak training memory (default 32)")
    p.add_argument("--device")
    p.add_argument("--memory-efficient", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")


def _run_model_info(args: argparse.Namespace) -> int:
    info = simimg.model_info(args.arch, **given(args, "image_size", "device", "batch_size", "memory_efficient"))

    def human() -> None:
        for key, value in info.items():
            print(f"{key:>24}: {value}")

    emit(args, info, human)
    return 0


# --- audit, explain -------------------------------------------------------------------------------------
def _audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="root/<class>/<image>, or root/{train,val}/<class>/<image>")
    add_home(p, name_required=False)
    p.add_argument("--device", default=AuditJob.device)
    p.add_argument("--batch-size", type=positive_int, default=AuditJob.batch_size, help="(default %(default)s)")
    p.add_argument("--workers", type=non_negative_int)
    p.add_argument(
        "--val-split",
        type=float,
        default=AuditJob.val_split,
        help="without train/ and val/ folders, the seeded split `simimg train` would make (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=AuditJob.seed)
    p.add_argument(
        "--folds", type=positive_int, default=AuditJob.folds, help="cross-validation folds for the label check"
    )
    p.add_argument("--show", type=non_negative_int, default=20, help="findings of each kind to print (default 20)")


def _run_audit(args: argparse.Namespace) -> int:
    bar = ProgressBar(f"audit {args.name or simimg.folder_name(args.data_dir)}")
    try:
        report = simimg.audit(
            args.data_dir,
            args.name,
            args.home,
            progress=bar,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            val_split=args.val_split,
            seed=args.seed,
            folds=args.folds,
        )
    finally:
        bar.close()
    emit(args, report.to_dict(), lambda: print_audit_report(report, args.show))
    return 0


def print_audit_report(report: AuditReport, show: int) -> None:
    s = report.summary
    balance = s["imbalance"]
    print(
        f"{s['data_dir']}: {s['images']} images in {len(s['classes'])} classes ({s['split']} split), model "
        f"{s['model']}; {s['embedded']} embedded here, {s['from_catalog']} from the index"
    )
    print(
        f"label issues {s['label_issues']} | exact duplicates {s['exact_duplicates']} | near duplicates "
        f"{s['near_duplicates']} (cosine >= {s['near_threshold']:.6f}) | cross-class {s['cross_class']} | "
        f"cross-split {s['cross_split']} | outliers {s['outliers']}"
    )
    print(
        "classes: "
        + ", ".join(f"{c} {n}" for c, n in balance["counts"].items())
        + (f" (imbalanced, {balance['ratio']:.2f}x)" if balance["imbalanced"] else "")
    )
    for d in [f for f in report.duplicates if not f.get("seen")][:show]:
        flags = " ".join(f for f, on in (("cross-class", d["cross_class"]), ("cross-split", d["cross_split"])) if on)
        print(f"  {d['kind']:<5} {d['score']:.6f} {flags:<23} " + " = ".join(d["paths"]))
    for i in [f for f in report.label_issues if not f.get("seen")][:show]:
        print(f"  label {i['score']:.3f} {i['label']} -> {i['suggested']}: {i['path']}")
    for o in [f for f in report.outliers if not f.get("seen")][:show]:
        print(f"  outlier {o['score']:.3f}: {o['path']}")
    for skipped in s["skipped"]:
        print(f"skipped {skipped['path']}: {skipped['reason']}")


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE")
    add_home(p)
    p.add_argument("--out", required=True, help="PNG to write: the map over the image, at the image's size")
    p.add_argument(
        "--neighbor",
        help="explain the similarity to this image (a gallery path as results show it, "
        "or any file) instead of the predicted class",
    )
    p.add_argument("--label", help="explain this class instead of the predicted one")
    p.add_argument(
        "--method",
        choices=EXPLAIN_METHODS,
        default=EXPLAIN_METHODS[0],
        help="the grad-cam library's method (default %(default)s)",
    )
    p.add_argument("--device", default="auto")


def _run_explain(args: argparse.Namespace) -> int:
    result = simimg.explain(
        args.image,
        args.name,
        args.home,
        neighbor=args.neighbor,
        label=args.label,
        out=args.out,
        method=args.method,
        device=args.device,
    )
    payload = {"image": args.image, **result.to_dict(), "out": args.out}
    what = (
        f"class {result.target} ({result.score:.1%})"
        if result.kind == "class"
        else f"similarity to {result.target} (cosine {result.score:.4f})"
    )
    emit(
        args,
        payload,
        lambda: print(
            f"{args.out}: where the model looks for the {what}, {result.method} on "
            f"{result.layer}, {result.size[0]}x{result.size[1]}"
        ),
    )
    return 0


# --- labels ---------------------------------------------------------------------------------------------
LABEL_ACTIONS = {
    "set": "give images another class (PATH: a file, or its path as the index shows it)",
    "exclude": "take images out of the index, training and evaluation (they stay on disk)",
    "accept": "accept the last audit's suggested labels (its --top highest-ranked; all by default)",
    "dismiss": "judge images fine as they are: later audits mark their findings as seen",
    "undo": "undo the latest batch of edits",
    "list": "the edits in force, oldest first",
    "queue": "what to review first: the audit's open issues or duplicates, the unlabeled pool, or a class",
    "export": "write the corrected collection: a class-folder tree (copies, or --move) or a CSV/Parquet file",
}


def _labels_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, help_text in LABEL_ACTIONS.items():
        a = actions.add_parser(action, help=help_text, description=help_text)
        add_home(a)
        if action in ("set", "exclude", "dismiss"):
            a.add_argument("paths", nargs="+", metavar="PATH")
        if action == "set":
            a.add_argument("--to", required=True, metavar="CLASS", help="the class to give them")
        if action == "accept":
            a.add_argument("--top", type=positive_int, help="accept only the highest-ranked suggestions")
        if action == "queue":
            a.add_argument("--queue", choices=simimg.REVIEW_QUEUES, default="issues", help="(default %(default)s)")
            a.add_argument("--class", dest="label", metavar="CLASS", help="the class of --queue class")
            a.add_argument("--limit", type=positive_int, default=20, help="items to list (default %(default)s)")
        if action == "export":
            a.add_argument("--out", required=True, metavar="DIR_OR_FILE")
            a.add_argument("--format", choices=("imagefolder", "csv", "parquet"), default="imagefolder")
            a.add_argument("--move", action="store_true", help="move the files (writes OUT/moves.jsonl to undo it)")


def _run_labels(args: argparse.Namespace) -> int:
    if args.action == "list":
        edits = simimg.label_edits(args.name, args.home)
        emit(args, edits, lambda: print("\n".join([*map(_edit_line, edits), f"{len(edits)} edits in force"])))
        return 0
    if args.action == "queue":
        items = [i.to_dict() for i in simimg.review_queue(args.name, args.queue, args.label, args.home, args.limit)]
        emit(args, items, lambda: print("\n".join([*map(_queue_line, items), f"{len(items)} to review"])))
        return 0
    if args.action == "export":
        result = simimg.export_labels(args.name, args.out, args.format, args.move, args.home)
        emit(args, result, lambda: print(f"wrote {result['images']} images to {result['out']} ({args.format})"))
        return 0
    report = {
        "set": lambda: simimg.set_labels(args.name, args.paths, args.to, args.home),
        "exclude": lambda: simimg.exclude_images(args.name, args.paths, args.home),
        "dismiss": lambda: simimg.dismiss_findings(args.name, args.paths, args.home),
        "accept": lambda: simimg.accept_suggestions(args.name, args.top, args.home),
        "undo": lambda: simimg.undo_labels(args.name, args.home),
    }[args.action]()
    emit(
        args,
        report.to_dict(),
        lambda: print(
            f"{'undid' if report.action == 'undo' else 'recorded'} batch {report.batch} ({report.edits} edits): "
            f"version {report.version}, {report.relabelled} relabelled, {report.excluded} excluded in all"
        ),
    )
    return 0


def _edit_line(edit: dict) -> str:
    old = edit["old_label"] or "(unlabeled)"
    change = f"{old} -> {edit['new_label']}" if edit["action"] == "set" else edit["action"]
    return f"batch {edit['batch']:<4} {edit['source']:<10} {change:<30} {edit['path']}"


def _queue_line(item: dict) -> str:
    change = f"{item['label'] or '(unlabeled)'} -> {item['suggested']}" if item["suggested"] else item["label"]
    group = f"group {item['group']:<4} " if item["group"] is not None else ""
    return f"{item['score']:8.4f}  {group}{change or '':<30} {item['path']}"


# --- models, use ----------------------------------------------------------------------------------------
def _models_arguments(p: argparse.ArgumentParser) -> None:
    add_home(p)


def _run_models(args: argparse.Namespace) -> int:
    entries = simimg.list_models(args.name, args.home)

    def human() -> None:
        for m in entries:
            accuracy = "-" if m.val_accuracy is None else f"{m.val_accuracy:.1%}"
            print(
                f"{'*' if m.serving else ' '} {m.fingerprint}  {m.created}  {m.kind:<10} {m.arch:<12} "
                f"val {accuracy:>6}  {m.source}"
            )

    emit(args, [dataclasses.asdict(m) for m in entries], human)
    return 0


def _use_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fingerprint", metavar="FINGERPRINT", help="a kept model (a unique prefix is enough)")
    add_home(p)
    add_compute(p)


def _run_use(args: argparse.Namespace) -> int:
    bar = ProgressBar(f"use {args.fingerprint}")
    try:
        report = simimg.use_model(
            args.fingerprint, args.name, args.home, args.device, progress=bar, precision=args.precision
        )
    finally:
        bar.close()
    emit(args, report.to_dict(), lambda: print_index_report(report))
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    add_home(p)
    p.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, or model.zip for a bundle)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=EXPORT_FORMATS[0],
        help="onnx (checked against onnxruntime) or bundle (model.json + model.safetensors, zipped)",
    )
    p.add_argument("--model", help="a kept model's fingerprint (or a unique prefix); default: the one serving")


def _run_export(args: argparse.Namespace) -> int:
    written = simimg.export_model(args.name, args.out, args.format, args.home, args.model)
    emit(
        args,
        written,
        lambda: print(f"{args.name}: model {written['model']} written to {written['path']} ({written['format']})"),
    )
    return 0


def _upgrade_arguments(p: argparse.ArgumentParser) -> None:
    add_home(p)


def _run_upgrade(args: argparse.Namespace) -> int:
    changed = simimg.upgrade_index(args.name, args.home)
    emit(
        args,
        {"name": args.name, "upgraded": changed},
        lambda: print(f"{args.name}: {'upgraded to this layout' if changed else 'already in this layout'}"),
    )
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    add_home(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="embed damaged vectors again from the original images, rebuild a damaged FAISS file, remove what "
        "killed runs left; then check again",
    )


def _run_verify(args: argparse.Namespace) -> int:
    """Exit 1 when a damaged file is left (after --repair: one it could not mend)."""
    report = simimg.verify_index(args.name, args.home, args.repair)

    def human() -> None:
        for line in report.repaired:
            print(f"repaired: {line}")
        for damaged in report.problems:
            shown = ", ".join(damaged.images[:5]) + (" ..." if len(damaged.images) > 5 else "")
            print(f"DAMAGED {damaged.kind} {damaged.file}: {damaged.reason}; {len(damaged.images)} images: {shown}")
        for leftover in report.leftovers:
            print(f"left by a killed run: {leftover} (--repair removes it)")
        checked = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in report.checked.items())
        unrecorded = sum(report.unrecorded.values())
        note = f"; {unrecorded} written before checksums, not checked" if unrecorded else ""
        print(f"{args.name}: checked {checked}{note}: " + ("damaged" if report.problems else "all whole"))

    emit(args, dataclasses.asdict(report), human)
    return 1 if report.problems else 0


# --- serve ---------------------------------------------------------------------------------------------
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="where indexes live (default: $SIMIMG_HOME, else ./indexes)")
    p.add_argument(
        "--host",
        default=ServeConfig.host,
        help="address to bind (default %(default)s); any other than loopback needs $SIMIMG_API_TOKEN",
    )
    p.add_argument("--port", type=non_negative_int, default=ServeConfig.port, help="(default %(default)s)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=ServeConfig.workers,
        help="server processes, each with its own warm models (default %(default)s: one per machine suits a CPU)",
    )
    p.add_argument("--device", default=ServeConfig.device)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=ServeConfig.precision,
        help="as for `simimg query`: int8 serves only where the index's int8 gate passed (default %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=ServeConfig.max_batch,
        help="images per forward pass at most (default %(default)s)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=ServeConfig.max_wait_ms,
        help="how long the oldest waiting image waits for others to join its batch (default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=ServeConfig.max_queue,
        help="images (and requests) waiting at most; beyond, 503 at once (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=ServeConfig.timeout_s,
        help="seconds a request may wait for its answer; 504 after (default %(default)s)",
    )
    p.add_argument(
        "--max-mb", type=float, default=ServeConfig.max_mb, help="largest upload in MB (default %(default)s)"
    )
    p.add_argument(
        "--max-files",
        type=positive_int,
        default=ServeConfig.max_files,
        help="images per request at most (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads for the forward passes (default: torch's, one per core); 1 does better when "
        "other processes keep the cores busy",
    )


def _run_serve(args: argparse.Namespace) -> int:
    options = {
        key: getattr(args, key)
        for key in (
            "device",
            "precision",
            "max_batch",
            "max_wait_ms",
            "max_queue",
            "timeout_s",
            "max_mb",
            "max_files",
            "threads",
        )
    }
    simimg.serve(args.home, args.host, args.port, args.workers, access_log=args.verbose, **options)
    return 0


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    (
        "index",
        "build or update an index of a folder (only new or changed files are embedded)",
        _index_arguments,
        _run_index,
    ),
    (
        "predict",
        "classify every image under a folder into a file (csv, parquet, jsonl): top labels, margin, nearest "
        "labelled image, an uncertain flag",
        _predict_arguments,
        _run_predict,
    ),
    (
        "query",
        "find the images most similar to IMAGE (and its predicted class, with a trained model)",
        _query_arguments,
        _run_query,
    ),
    ("info", "what an index holds: counts per label, backbone, fingerprint, classifier", _info_arguments, _run_info),
    (
        "train",
        "fine-tune a classifier on class folders (or train one from scratch) into NAME's model",
        _train_arguments,
        _run_train,
    ),
    (
        "evaluate",
        "accuracy, per-class F1, confusion and retrieval quality of NAME's trained model",
        _evaluate_arguments,
        _run_evaluate,
    ),
    (
        "audit",
        "find likely label errors, exact and near duplicates (cross-class, cross-split), outliers and "
        "class imbalance in a labelled folder",
        _audit_arguments,
        _run_audit,
    ),
    (
        "explain",
        "where the model looks: a heatmap of the predicted class, or of the similarity to a neighbour",
        _explain_arguments,
        _run_explain,
    ),
    (
        "labels",
        "correct labels as versioned data: set, exclude, accept, dismiss, undo, list, export",
        _labels_arguments,
        _run_labels,
    ),
    ("models", "every model NAME keeps, newest first; * marks the one serving", _models_arguments, _run_models),
    ("use", "serve a kept model (re-embeds only images it has no vectors for)", _use_arguments, _run_use),
    (
        "export",
        "write a kept model for use elsewhere: ONNX (checked with onnxruntime) or its safetensors bundle",
        _export_arguments,
        _run_export,
    ),
    (
        "upgrade",
        "convert an index made by simimg 0.1 to this version's layout, keeping every vector",
        _upgrade_arguments,
        _run_upgrade,
    ),
    (
        "verify",
        "check every file of an index against its checksums, naming damaged ones and the images they affect; "
        "--repair mends what can be made again",
        _verify_arguments,
        _run_verify,
    ),
    (
        "serve",
        "serve the indexes over HTTP for programs (query, embed, info), with micro-batching",
        _serve_arguments,
        _run_serve,
    ),
    (
        "model-info",
        "parameters, GFLOPs per image, embedding size (and peak training memory on CUDA) of a backbone",
        _model_info_arguments,
        _run_model_info,
    ),
]

if __name__ == "__main__":
    sys.exit(main())
