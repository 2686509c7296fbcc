"""What every `specreason` subcommand shares: the provider arguments and turning errors into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpecReasonError

if TYPE_CHECKING:
    from ..providers import ProviderConfig

PROG = "specreason"
THREADS_HELP = "ONNX Runtime intra-op threads (0: auto = 1 below 10M parameters, else all cores)"


def add_provider_arguments(p: argparse.ArgumentParser) -> None:
    """--provider and its options (specreason_rt/providers.py), for every command that runs a bundle."""
    from ..providers import PROVIDER_NAMES

    p.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                   help="where the models run: cpu (default), cuda / tensorrt (ONNX Runtime execution providers, "
                        "need onnxruntime-gpu), trt (the bundle's TensorRT engines, KV cache on the GPU; needs "
                        "pip install 'specreason-rt[trt]' and engines from specreason-export --trt)")
    p.add_argument("--device-id", type=int, default=0, metavar="N", help="GPU index for cuda/tensorrt/trt")
    p.add_argument("--fp16", action="store_true", help="tensorrt provider: let TensorRT use fp16 kernels")
    p.add_argument("--trt-cache", type=Path, default=None, metavar="DIR",
                   help="tensorrt provider: engine and timing cache directory (default ~/.cache/specreason/trt-ep)")


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    from ..providers import ProviderConfig

    return ProviderConfig(name=args.provider, device_id=args.device_id, fp16=args.fp16, cache_dir=args.trt_cache)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, prog: str = PROG) -> int:
    """Run a subcommand: a SpecReasonError is one line on stderr (exit 1), Ctrl-C exit 130."""
    try:
        return int(func(args))
    except SpecReasonError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
