"""Timing of the incidental-polysemanticity training step, and optionally of the default sweeps.

    python -m bench.incidental            # ms per step: written-out gradient vs autograd, side by side
    python -m bench.incidental --sweeps   # also the full default collisions and noise sweeps

Both step variants run the same AdamW update on the same weights; the ratio is what matters, since absolute
times on a shared CPU move with the load.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.experiments.incidental import collisions_points, noise_points, run_point
from pipeline.incidental import IncidentalConfig, initial_weights, instance_losses, loss_gradient


def step_time(config: IncidentalConfig, use_autograd: bool, steps: int = 300) -> float:
    """Mean seconds per AdamW step over `steps` steps, after 20 warm-up steps."""
    weights = initial_weights(config).requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=config.lr, weight_decay=config.weight_decay)

    def one_step() -> None:
        if use_autograd:
            optimizer.zero_grad(set_to_none=True)
            instance_losses(weights, config.l1).sum().backward()
        else:
            with torch.no_grad():
                weights.grad = loss_gradient(weights, config.l1)
        optimizer.step()

    for _ in range(20):
        one_step()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweeps", action="store_true", help="also time the default sweeps end to end")
    arguments = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'n':>4} {'m':>5} {'inst':>5} {'written ms':>11} {'autograd ms':>12} {'ratio':>6}")
    for n, m, instances in ((8, 16, 5), (64, 64, 16), (64, 128, 16), (64, 256, 16), (64, 512, 16)):
        config = IncidentalConfig(n=n, m=m, instances=instances)
        written = step_time(config, use_autograd=False)
        autograd = step_time(config, use_autograd=True)
        print(
            f"{n:>4} {m:>5} {instances:>5} {written * 1e3:>11.3f} {autograd * 1e3:>12.3f} {autograd / written:>6.2f}"
        )

    if arguments.sweeps:
        for name, configs in (("collisions", collisions_points()), ("noise", noise_points())):
            started = time.perf_counter()
            for config in configs:
                run_point(config)
            print(f"default {name} sweep ({len(configs)} points): {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
