"""What a sepcnn training step costs with the fused batch-norm kernel and with Keras' own layer.

    python -m benchmarks.training_step [--rounds 2] [--steps 40]

Alternating child processes (fused, keras, fused, keras, ...: this VM's speed drifts within
minutes, so the two are measured next to each other) each build sepcnn as `train` does, with
`training.batchnorm.FusedBatchNormalization` or with it swapped for
`keras.layers.BatchNormalization`, and time `fit` over `--steps` batches of 32 random images:
on one fixed batch (the step alone), fed by the 'basic' augmentation pipeline (one view, v2's
recipe) and by the paired views of `--consistency` (two views per image). Milliseconds per step,
one warm-up epoch first. Random pixels: the cost does not depend on the content.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import report

BATCH = 32


def child(variant: str, steps: int) -> dict[str, float]:
    import keras
    import numpy as np
    import tensorflow as tf

    from training import architectures, consistency
    from training.augmentation import augment_fn

    if variant == "keras":
        architectures.FusedBatchNormalization = keras.layers.BatchNormalization
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (steps * BATCH, 224, 224, 1), dtype=np.uint8)
    y = (rng.random(steps * BATCH) > 0.5).astype(np.float32)
    prepare = augment_fn(1, "basic")

    def pipeline(paired: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        fn = consistency.paired_views(prepare) if paired else prepare
        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    fixed = tf.data.Dataset.from_tensors((tf.cast(x[:BATCH], tf.float32), y[:BATCH])).repeat(steps)
    cases = {
        "fixed batch": (fixed, keras.losses.BinaryCrossentropy(from_logits=True)),
        "one augmented view": (pipeline(False), keras.losses.BinaryCrossentropy(from_logits=True)),
        "two views (--consistency)": (pipeline(True), consistency.PairedConsistencyLoss(12.0)),
    }
    result = {}
    for name, (data, loss) in cases.items():
        model = architectures.build("sepcnn")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)
        model.fit(data, epochs=1, verbose=0)  # tracing and warm-up
        started = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        result[name] = round((time.perf_counter() - started) / steps * 1000, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", choices=["fused", "keras"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs: dict[str, list[dict[str, float]]] = {"fused": [], "keras": []}
    for _ in range(args.rounds):
        for variant in runs:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.training_step",
                    "--child",
                    variant,
                    "--steps",
                    str(args.steps),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for case in runs["fused"][0]:
        fused = ", ".join(f"{r[case]:.0f}" for r in runs["fused"])
        keras_bn = ", ".join(f"{r[case]:.0f}" for r in runs["keras"])
        rows.append((f"{case}: ms per step, fused | Keras", f"{fused} | {keras_bn}"))
    report("sepcnn training step, batch-norm kernels", rows, {"steps": args.steps, **runs})


if __name__ == "__main__":
    main()
