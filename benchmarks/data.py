"""Data-path benchmark: prepare throughput (images/s) and validation time on 60,000 synthetic images.

Targets on 2 CPU cores: prepare >= 5,000 images/s, validation <= 5 s (Great Expectations' import,
~7 s a process, is reported separately: it is paid once per process, not per image).

    python benchmarks/data.py [--per-class 5000] [--test-per-class 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import params as params_module  # noqa: E402
from tasks.data.sources import synthetic  # noqa: E402
from tasks.ingest import write_data  # noqa: E402
from tasks.params import SyntheticParams  # noqa: E402
from tasks.paths import Workspace  # noqa: E402
from tasks.prepare import prepare  # noqa: E402


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=5000, help="train images per class (10 classes)")
    parser.add_argument("--test-per-class", type=int, default=1000, help="test images per class")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    p = params_module.load(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        start = time.perf_counter()
        dataset = synthetic.generate(SyntheticParams(10, args.per_class, args.test_per_class), seed=0)
        ws.data.mkdir()
        written = write_data(dataset, ws.data, p.data.ingest)  # streamed into shards, as ingest does
        n = sum(sum(per_class.values()) for per_class in written.counts.values())
        generate_s = time.perf_counter() - start

        start, cpu_start = time.perf_counter(), _cpu_s()
        result = prepare(p.data, ws)
        prepare_s, prepare_cpu_s = time.perf_counter() - start, _cpu_s() - cpu_start

        start = time.perf_counter()
        from tasks import validate
        from tasks.data import contract as data_contract

        data_contract.import_gx()
        import_s = time.perf_counter() - start
        start = time.perf_counter()
        validate.validate(params_module.sections(validate.ValidateSections, p), ws)
        validate_s = time.perf_counter() - start

    print(f"images: {n} ({p.data.image_size}x{p.data.image_size}x{p.data.channels} PNG)")
    print(f"synthetic generation + Parquet shards: {generate_s:.1f} s ({n / generate_s:,.0f} images/s)")
    print(f"prepare: {prepare_s:.2f} s end to end = {n / prepare_s:,.0f} images/s "
          f"(decode loop alone: {result.images_per_s:,.0f} images/s; target >= 5,000)")
    # The wall-clock figure depends on what else runs; CPU time says what 2 idle cores would do.
    cores = os.cpu_count() or 1
    print(f"prepare CPU time: {prepare_cpu_s:.1f} s = {n / prepare_cpu_s:,.0f} images per CPU-second "
          f"(x{cores} cores = {cores * n / prepare_cpu_s:,.0f} images/s when idle, at best); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"validate: {validate_s:.2f} s for {n} manifest rows (target <= 5 s); "
          f"great_expectations import: {import_s:.1f} s once per process")


if __name__ == "__main__":
    main()
