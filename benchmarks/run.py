"""`make bench`: every speed and memory benchmark, one after the other; results go to BENCHMARKS.md by hand."""

from __future__ import annotations

from benchmarks import dask_ingest, ingest_throughput, maml_step, meta_training, predict_memory


def main() -> None:
    for title, run in (
        ("Ingest throughput", lambda: ingest_throughput.main([])),
        ("Ingest on Dask workers", lambda: dask_ingest.main([])),
        ("Meta-training speed", lambda: meta_training.main([])),
        ("MAML meta-step against higher", lambda: maml_step.main([])),
        ("Prediction speed and memory", lambda: predict_memory.main(["--sizes", "4096"])),
    ):
        print(f"\n## {title}\n", flush=True)
        run()


if __name__ == "__main__":
    main()
