"""Default settings of the three incidental experiments, in a module that imports nothing heavy.

`pipeline.experiments.incidental` takes its keyword defaults from here, and `cli.py` shows the same values
in --help from here: importing the experiments module means importing torch, scipy and pandas (about 2 s),
which a sweep would otherwise pay before it can start its worker processes.
"""

from __future__ import annotations

COLLISIONS = {
    "n": 64,
    "ms": (64, 128, 256, 512),
    "l1_values": (1e-3,),
    "instances": 16,
    # 12 000, not the published 7500: at m = n = 64 every instance sparsifies (pipeline.incidental.
    # CONVERGENCE_THRESHOLD) only after 8750–9000 steps (seeds 0–3); 7500 leaves its count about 4 % low.
    "steps": 12_000,
}

NOISE = {
    "n": 8,
    "m": 16,
    "instances": 5,
    "steps": 20_000,
    "sigmas": (0.07, 0.1, 0.15),
    "noise_types": ("bipolar", "gaussian", "laplace", "student_t"),
    "optimizer": "sgd",
    "lr": 0.02,
    "l1": 0.0,
}

DYNAMICS = {
    "m": 10_000,
    "l1_values": (1e-3, 1e-4),
    "t_max_times_l1": 3.0,
    "dt": 0.5,
    "seed": 0,
}
