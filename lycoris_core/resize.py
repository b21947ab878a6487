"""Resize: re-rank one LoHa / LoKr / LoRA file to a LoRA or LoKr of a target rank or energy.

A resize is a merge of a single source at weight 1 (`merge.merge_adapters`), so the same SVD /
nearest-Kronecker code, error report and metadata apply; the metadata records
`lycoris_merge_operation = resize`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .adapter import Adapter, load_adapter
from .merge import FactorSpec, MergeResult, Progress, merge_adapters


def resize_adapter(adapter: Adapter | str | os.PathLike, spec: FactorSpec,
                   model_weights: Mapping[str, object] | None = None,
                   progress: Progress | None = None) -> MergeResult:
    """ΔW of every module of `adapter`, re-factorised by `spec` (see `merge.merge_adapters`)."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    return merge_adapters([(adapter, 1.0)], spec, model_weights, progress, operation="resize")


def cmd_resize(args) -> int:
    from .merge import FileWeights, run_result_cli, spec_from_args

    weights = FileWeights(args.model) if args.model else None
    return run_result_cli(args, resize_adapter(args.file, spec_from_args(args), weights))


def add_cli(sub) -> None:
    from .merge import add_spec_arguments

    p = sub.add_parser("resize", help="re-rank a LoHa/LoKr/LoRA file to a LoRA or LoKr")
    p.add_argument("file")
    add_spec_arguments(p)
    p.set_defaults(func=cmd_resize)
