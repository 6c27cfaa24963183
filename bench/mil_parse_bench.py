"""model.mil parsing speed: our parser against coremltools loading the same program.

    python bench/mil_parse_bench.py [--runs 5] [--copies 16]

Two measurements, medians of `--runs`:

1. Same program, two formats: the factory's tiny SD1 Unet as an `.mlpackage` loaded by
   coremltools' own loader (protobuf parse + `milproto.load` into a pymil Program) against
   its compiled-layout `model.mil` parsed by `coreml_hub.mil.text.load`. Ratio printed as
   coremltools_time / ours (above 1: ours is faster).
2. Size: a model.mil the size of a real SD Unet's (5-10 MB): a program of `--copies`
   functions, each a copy of a real compiler-written model.mil body (shared/mil samples),
   or of the tiny Unet when the samples are absent. Prints MB/s and ops/s.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_time(fn, runs: int, clock=time.perf_counter) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def big_text(copies: int, fallback: Path) -> tuple[str, str]:
    sample = REPO / "shared" / "mil" / "fluidaudio_streaming_encoder.mil"
    source = sample.read_text() if sample.is_file() else fallback.read_text()
    origin = sample.name if sample.is_file() else f"{fallback.parent.name}/model.mil"
    head, _, rest = source.partition("\n{\n")
    body = rest.rsplit("\n}", 1)[0]
    functions = [re.sub(r"func main<", f"func main{i}<" if i else "func main<", body, count=1) for i in range(copies)]
    return head + "\n{\n" + "\n".join(functions) + "\n}", origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--copies", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    from coreml_hub.mil import text
    from coreml_hub.testing.factory import converted

    out = converted("sd1", "original", compiled=True)
    package = next((out / "original" / "packages").glob("*_unet.mlpackage"))
    compiled = out / "original" / "compiled" / "Unet.mlmodelc"

    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    def coremltools_load() -> None:
        spec = ct.utils.load_spec(str(package))
        milproto_load(spec, spec.specificationVersion, str(package / "Data" / "com.apple.CoreML" / "weights"))

    def ours_load() -> None:
        text.load(compiled)

    t_ct = median_time(coremltools_load, args.runs)
    t_ours = median_time(ours_load, args.runs)
    ops = sum(text.load(compiled).op_histogram().values())
    print(f"tiny SD1 Unet ({ops} ops): coremltools .mlpackage load {t_ct * 1000:.1f} ms, "
          f"coreml_hub model.mil load {t_ours * 1000:.1f} ms")
    print(f"ratio coremltools/ours: {t_ct / t_ours:.2f}x")

    source, origin = big_text(args.copies, compiled / "model.mil")
    program = text.loads(source)
    n_ops = sum(program.op_histogram().values())
    t_big = median_time(lambda: text.loads(source), args.runs)
    cpu_big = median_time(lambda: text.loads(source), args.runs, clock=time.process_time)
    mb = len(source.encode()) / 1e6
    print(f"{mb:.1f} MB model.mil ({args.copies} copies of {origin}, {n_ops} ops): parse median {t_big:.2f} s "
          f"wall, {cpu_big:.2f} s CPU ({mb / t_big:.1f} MB/s, {n_ops / t_big:,.0f} ops/s wall)")
    t_dump = median_time(lambda: text.dumps(program), args.runs)
    print(f"print back: median {t_dump:.2f} s; identical text: {text.dumps(program) == source}")


if __name__ == "__main__":
    sys.exit(main())
