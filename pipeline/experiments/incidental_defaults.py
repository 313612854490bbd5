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

# Co-occurring features (`incidental cooccurrence`): n = 32 with m below, at and above n (superposition →
# incidental), p from 0 (one feature per input) to 0.3; λ = 1e-2 and lr 1e-2 so that encodings sparsify
# within 4000 steps (measured: the counts at p ≤ 3e-3 do not change between 3000 and 6000 steps).
COOCCURRENCE = {
    "n": 32,
    "ms": (16, 24, 32, 64, 128),
    "p_values": (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "l1": 1e-2,
    "lr": 1e-2,
    "instances": 12,
    "steps": 4000,
    "batch_size": 64,
}
# Inputs per step of a co-occurrence point, at most (the flag --i-know-it-is-big lifts it).
COOCCURRENCE_MAX_BATCH = 65_536

# The splitting remedy (`incidental splitting`): a collisions point trained as usual, then every polysemantic
# neuron split into two copies w/√2 with noise of scale ε, trained on with a fresh AdamW.
SPLITTING = {
    "n": 32,
    "m": 64,
    "l1": 1e-2,
    "lr": 1e-2,
    "instances": 32,
    "steps": 4000,
    "epsilons": (0.0, 0.003, 0.01, 0.03, 0.1, 0.3),
    "extra_steps": 4000,
    "measure_every": 250,
}
