"""Which precision an index's model serves in: the int8 gate's record, kept in the index's catalog.

The index job writes it (jobs/int8.py: `int8:<model>` in the catalog's meta, the gate's figures and the key of the
quantized trunk in the per-user cache; `precision`, what the last run embedded with); the query service and
`simimg info` read it. Here, below both, so that a query serves int8 exactly when the index's gate passed.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from simimg.store.catalog import Catalog

if TYPE_CHECKING:  # torch-free at import: `simimg info` reads the record without loading a model
    from simimg.models.device import Compute
    from simimg.models.net import LoadedModel

log = logging.getLogger(__name__)

PRECISION_KEY = "precision"


def int8_record(catalog: Catalog, model: str) -> dict[str, Any] | None:
    """The int8 gate's figures recorded for `model` in this index, or None when int8 was never tried with it."""
    text = catalog.get_meta(f"int8:{model}")
    if text is None:
        return None
    try:
        record: dict[str, Any] = json.loads(text)
    except ValueError:
        return None
    return record


def record_int8(catalog: Catalog, model: str, record: dict[str, Any]) -> None:
    """Keep the gate's figures with the index (call inside a transaction)."""
    catalog.set_meta(**{f"int8:{model}": json.dumps(record)})


def record_precision(catalog: Catalog, compute: Compute) -> None:
    """What this run embedded with: "int8", "bf16" or "fp32" (call inside a transaction)."""
    catalog.set_meta(**{PRECISION_KEY: compute.precision})


def precision_info(catalog: Catalog, model: str) -> dict[str, Any]:
    """`simimg info`'s `precision` (None for an index built before it was recorded) and, when int8 was tried with
    the serving model, `int8_gate`."""
    info: dict[str, Any] = {"precision": catalog.get_meta(PRECISION_KEY)}
    record = int8_record(catalog, model)
    if record is not None:
        info["int8_gate"] = record
    return info


def kept_int8(compute: Compute, catalog: Catalog, model: LoadedModel) -> tuple[Compute, dict[str, Any] | None]:
    """`compute` switched to int8 when it may run int8 and this index's gate passed for `model` with a quantized
    trunk still in this machine's cache; else `compute` itself. Also returns the record it judged by."""
    if compute.int8 == "no":
        return compute, None
    from simimg.models.device import int8_compute
    from simimg.models.int8 import entry, read_gate

    record = int8_record(catalog, model.bundle.fingerprint)
    if record is None:
        return compute, None
    kept = read_gate(entry(model.net.trunk, model.bundle.preprocess, record["sample"]))
    if kept is None:
        return compute, None
    if kept.get("passed"):
        return int8_compute(compute, record["sample"]), record
    return compute, record
