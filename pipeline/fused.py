"""Fused CPU training engine: each model's whole epoch in one compiled loop, no Python per step.

The batched torch engine (`pipeline.train`) runs a dozen small kernels per layer and epoch, each over
every model's `[unit, sample]` slab; on 2 cores it reached 13–15 % of the fp32 peak (issue 13). Here one
numba function runs a parallel loop over models, and inside it each model's epoch goes tile by tile
(`TILE_SAMPLES` samples, small enough that a tile's activations stay in the L1/L2 cache): forward,
loss, hand-written backward into a per-model gradient, then torch-style Adam over the model's flat
parameters. The unit counts (features, hidden width, SAE latents) are compile-time constants
(`numba.literally`), so the loop over a layer's inputs is unrolled and the loop over a tile's samples
becomes the vector loop with its accumulators in registers: 100 GFLOP/s per core on a 12 × 12 layer
against 32 GFLOP/s for the same loop with run-time sizes. Each new width compiles once and is cached on
disk (`cache=True`).

What stays the same as the torch engine (the reference, kept for GPUs, for SAE architectures this module
does not fuse, and when numba is missing): the initial parameters (drawn by the same torch code), the
noise (the same numbers bit for bit, from the same numpy generators, drawn chunk by chunk a chunk
ahead in a thread and handed to the kernel), the loss and its regularization forms (the elastic net as
its L1 and L2-penalty parts), gradient clipping by each model's global norm, Adam's formulas in
float32, the divergence rule and its messages, the curve points (computed by the same torch functions on
the kernel's parameters). Results agree to float rounding, until a sample sits within rounding of a ReLU
kink and the engines take different sides of it: then Adam can move a few parameters up to about one
step apart (tests/test_fused_engine.py measures both and states the tolerances).

Determinism: one model is computed by one thread from start to end, and every sum inside a model runs
in an order fixed at compile time, so a model's result does not depend on the thread count or on which
models share its pass (a test checks it bit for bit).

`POLYLAB_ENGINE` chooses the engine: `auto` (default: fused on CPU where it applies), `fused` (the same;
an error when numba is missing) or `torch` (always the reference).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
    from numba import literally, njit, prange
except ImportError:  # the torch engine then trains everything
    numba = None

ENGINE_VARIABLE = "POLYLAB_ENGINE"
ENGINES = ("auto", "fused", "torch")
# SAE architectures whose loss and gradient this module computes; any other trains on the torch engine.
FUSED_SAE_ARCHITECTURES = ("leaky_relu", "published_tied", "relu")
# Samples per tile: a tile's activations and derivatives in the published network (4 hidden layers ×
# 12 units × 2 arrays) are 98 KB at 256 samples, well inside the 1 MB L2. Longer tiles spread each weight
# gradient's final horizontal sum over more samples: per model-epoch 42 µs at 256 against 66 µs at 128
# (ReLU, one core); 512 measured the same as 256.
TILE_SAMPLES = 256


def chosen_engine() -> str:
    """The engine `POLYLAB_ENGINE` asks for (auto when unset)."""
    engine = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if engine not in ENGINES:
        raise ValueError(f"{ENGINE_VARIABLE} must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "fused" and numba is None:
        raise ValueError(f"{ENGINE_VARIABLE}=fused needs numba, which is not installed")
    return engine


def applies(device: torch.device, sae_architecture: str | None = None) -> bool:
    """Whether the fused engine trains this stage: CPU, numba present, not switched off, and (for an
    SAE) an architecture it fuses."""
    if device.type != "cpu" or numba is None or chosen_engine() == "torch":
        return False
    if sae_architecture is None:
        return True
    if sae_architecture not in FUSED_SAE_ARCHITECTURES:
        return False
    # The kernel computes the plain objective with a plain Adam step; should one of these architectures
    # ever gain one of the trainer's hooks (pipeline.sae: its own training loss, decoder projections, a
    # last pass, frozen parameters), it trains on the torch engine, which honours them, until the kernel
    # learns it.
    from pipeline import sae as sae_architectures

    architecture = sae_architectures.architecture(sae_architecture)
    return not any(getattr(architecture, hook, None) for hook in _SAE_HOOKS)


_SAE_HOOKS = ("training_losses", "unit_norm_decoder", "untrained", "after_update", "after_training")


def _use_torch_thread_count() -> None:
    # The engine uses the cores torch may use: one in each worker of a PassPool (which sets torch to one
    # thread), all of them in a single process, so N workers never start N × cores threads.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's own work queue rather than OpenMP: OpenMP threads spin after each parallel region, and on a
    # 2-core machine that spinning took the cores from torch (evaluation, curves) in the same process.
    numba.config.THREADING_LAYER = "workqueue"
# Models are handed to threads one at a time: a pass is sorted by activation and a GELU model costs
# about 1.45× a ReLU one (57.7 against 39.8 µs a model-epoch, `python bench/activations.py`), so equal
# contiguous halves would leave one thread idle at the end.
PARALLEL_CHUNK_MODELS = 1


if numba is not None:
    _BETA1 = np.float32(0.9)
    _BETA2 = np.float32(0.999)
    _ONE_MINUS_BETA1 = np.float32(1 - 0.9)
    _ONE_MINUS_BETA2 = np.float32(1 - 0.999)
    _EPSILON = np.float32(1e-8)
    _ZERO = np.float32(0.0)
    _ONE = np.float32(1.0)
    _DIVERGENCE_FACTOR = np.float32(1e3)  # pipeline.train.DIVERGENCE_FACTOR, as float32 like its torch check
    _DIVERGENCE_FLOOR = np.float32(10.0)  # pipeline.train.DIVERGENCE_FLOOR
    _CLIP_EPSILON = np.float32(1e-6)  # pipeline.train.CLIP_EPSILON (torch.nn.utils.clip_grad_norm_'s)

    # Φ(−|x|), the normal tail, as Abramowitz & Stegun 7.1.26 (Handbook of Mathematical Functions, 1964):
    # erfc(z) ≈ t·(a₁ + t·(a₂ + t·(a₃ + t·(a₄ + t·a₅))))·e^(−z²), t = 1/(1 + p·z), z ≥ 0, absolute error
    # ≤ 1.5e-7. With z = |x|/√2 the factor e^(−z²) = e^(−x²/2) is the one the normal density needs anyway,
    # so GELU's cumulative and density share one exponential and no erf is evaluated (one division, five
    # multiply-adds). The a_k are halved (Φ(−|x|) = erfc(z)/2) and p divided by √2. Φ(x) is then the tail
    # for x < 0 and 1 − tail for x ≥ 0: no 1 + erf cancellation below 0.
    _TAIL_SCALE = np.float32(0.3275911 / math.sqrt(2.0))
    _TAIL_A1, _TAIL_A2, _TAIL_A3, _TAIL_A4, _TAIL_A5 = (
        np.float32(coefficient / 2)
        for coefficient in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
    )
    _INVERSE_ROOT_TWO_PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))
    _HALF = np.float32(0.5)
    _EXPONENT_LIMIT = np.float32(20.25)
    # 1/k! for k = 1 … 9, and the argument's scale 1/32, for `_exp_of_negative`.
    _EXP_SCALE = np.float32(1.0 / 32.0)
    _EXP_C1, _EXP_C2, _EXP_C3, _EXP_C4, _EXP_C5, _EXP_C6, _EXP_C7, _EXP_C8, _EXP_C9 = (
        np.float32(1.0 / math.factorial(k)) for k in range(1, 10)
    )

    @njit(inline="always", cache=True)
    def _exp_of_negative(u):
        """exp(−u) for a float32 u in [0, 20.25]: exp(−u/32) by its degree-9 Taylor polynomial (error
        3e-9), squared five times, which multiplies float32's rounding by 32: relative error below 4e-6,
        which leaves 5e-7 absolute at most in GELU's Φ and 1e-6 in its derivative. Vectorizes (no libm
        call)."""
        y = -u * _EXP_SCALE
        value = _ONE + y * (
            _EXP_C1
            + y
            * (
                _EXP_C2
                + y
                * (
                    _EXP_C3
                    + y
                    * (_EXP_C4 + y * (_EXP_C5 + y * (_EXP_C6 + y * (_EXP_C7 + y * (_EXP_C8 + y * _EXP_C9)))))
                )
            )
        )
        for _ in range(5):
            value = value * value
        return value

    @njit(inline="always", cache=True)
    def _dense(weight, bias, inputs, outputs, out_units, in_units, count):
        """outputs[o, t] = bias[o] + Σ_i weight[o, i]·inputs[i, t] for t < count.

        weight `[out, in]`, bias `[out]`, inputs `[in, ≥count]`, outputs `[out, ≥count]`. With literal
        unit counts the i loop unrolls and t is the vector loop (accumulator in registers)."""
        for out in range(out_units):
            start = bias[out]
            for sample in range(count):
                total = start
                for unit in range(in_units):
                    total += weight[out, unit] * inputs[unit, sample]
                outputs[out, sample] = total

    @njit(inline="always", cache=True)
    def _dense_transposed(weight, inputs, outputs, out_units, in_units, count):
        """outputs[o, t] = Σ_i weight[i, o]·inputs[i, t]: the product with weight `[in, out]` transposed
        (backpropagation through a layer, and an encoder stored `[hidden, latent]`)."""
        for out in range(out_units):
            for sample in range(count):
                total = _ZERO
                for unit in range(in_units):
                    total += weight[unit, out] * inputs[unit, sample]
                outputs[out, sample] = total

    @njit(inline="always", cache=True)
    def _accumulate_outer(gradient, left, right, left_units, right_units, count):
        """gradient[a, b] += Σ_t left[a, t]·right[b, t] (a weight gradient: δ·hᵀ over a tile).

        Four rows of `left` at a time share each load of right[b, t]: 1.25 loads per multiply-add
        instead of 2 (the sums over t are vector reductions, which is what `reassoc` allows)."""
        blocked = left_units - left_units % 4
        for a in range(0, blocked, 4):
            for b in range(right_units):
                total0 = _ZERO
                total1 = _ZERO
                total2 = _ZERO
                total3 = _ZERO
                for sample in range(count):
                    value = right[b, sample]
                    total0 += left[a, sample] * value
                    total1 += left[a + 1, sample] * value
                    total2 += left[a + 2, sample] * value
                    total3 += left[a + 3, sample] * value
                gradient[a, b] += total0
                gradient[a + 1, b] += total1
                gradient[a + 2, b] += total2
                gradient[a + 3, b] += total3
        for a in range(blocked, left_units):
            for b in range(right_units):
                total = _ZERO
                for sample in range(count):
                    total += left[a, sample] * right[b, sample]
                gradient[a, b] += total

    @njit(inline="always", cache=True)
    def _accumulate_rows(gradient, values, units, count):
        """gradient[a] += Σ_t values[a, t] (a bias gradient)."""
        for a in range(units):
            total = _ZERO
            for sample in range(count):
                total += values[a, sample]
            gradient[a] += total

    @njit(inline="always", cache=True)
    def _activate(values, derivative, units, count, gelu):
        """In place: values ← act(values), derivative ← act'(pre-activation); `[unit, ≥count]` each.

        GELU is the exact one (torch's default): x·Φ(x), derivative Φ(x) + x·φ(x), in float32, with Φ from
        the normal tail above (Φ within 2.5e-7 of the exact value, tests/test_fused_engine.py)."""
        if gelu:
            for unit in range(units):
                for sample in range(count):
                    x = values[unit, sample]
                    t = _ONE / (_ONE + _TAIL_SCALE * abs(x))
                    gaussian = _exp_of_negative(min(_HALF * x * x, _EXPONENT_LIMIT))  # e^(−x²/2)
                    tail = (
                        t
                        * (_TAIL_A1 + t * (_TAIL_A2 + t * (_TAIL_A3 + t * (_TAIL_A4 + t * _TAIL_A5))))
                        * gaussian
                    )
                    cdf = _ONE - tail if x >= _ZERO else tail
                    values[unit, sample] = x * cdf
                    derivative[unit, sample] = cdf + x * (gaussian * _INVERSE_ROOT_TWO_PI)
        else:
            for unit in range(units):
                for sample in range(count):
                    x = values[unit, sample]
                    positive = x > _ZERO
                    values[unit, sample] = x if positive else _ZERO
                    derivative[unit, sample] = _ONE if positive else _ZERO

    @njit(inline="always", cache=True)
    def _adam(parameters, gradient, first_moment, second_moment, step, learning_rate, alive):
        """One torch.optim.Adam step (amsgrad off) on one model's flat float32 parameters; a failed
        model's gradient counts as zero, as the torch engine's `active` mask makes it."""
        bias_correction1 = np.float32(1.0 - 0.9**step)
        bias_correction2_root = np.float32(math.sqrt(1.0 - 0.999**step))
        step_size = learning_rate / bias_correction1
        for index in range(parameters.shape[0]):
            value = gradient[index] if alive else _ZERO
            first = first_moment[index] * _BETA1 + _ONE_MINUS_BETA1 * value
            second = second_moment[index] * _BETA2 + _ONE_MINUS_BETA2 * (value * value)
            first_moment[index] = first
            second_moment[index] = second
            denominator = np.sqrt(second) / bias_correction2_root + _EPSILON
            parameters[index] -= first / denominator * step_size

    @njit(inline="always", cache=True)
    def _clip_norm(gradient, max_norm):
        """gradient ← gradient · min(1, c / (‖gradient‖₂ + 1e-6)) for one model's flat gradient, as
        torch.nn.utils.clip_grad_norm_ (pipeline.train.clip_gradient_norms_); nothing when c = 0. The
        squares are summed in float64, the coefficient formed in float32 as torch forms it."""
        if max_norm == _ZERO:
            return
        total = 0.0
        for index in range(gradient.shape[0]):
            value = np.float64(gradient[index])
            total += value * value
        coefficient = max_norm / (np.float32(np.sqrt(total)) + _CLIP_EPSILON)
        if coefficient < _ONE:  # torch multiplies by the coefficient capped at 1: by 1 changes nothing
            for index in range(gradient.shape[0]):
                gradient[index] *= coefficient

    @njit(inline="always", cache=True)
    def _check_divergence(loss, epoch, bounds, failed_at, model):
        """The torch engine's rule (pipeline.train._PassState.check): the first epoch sets the bound
        max(1e3·loss, 10); a loss that is not finite or above it fails the model. True if it failed."""
        if epoch == 0:
            bound = loss * _DIVERGENCE_FACTOR
            if bound < _DIVERGENCE_FLOOR:  # NaN stays NaN, as torch's clamp keeps it
                bound = _DIVERGENCE_FLOOR
            bounds[model] = bound
        if not np.isfinite(loss) or loss > bounds[model]:
            failed_at[model] = epoch
            return True
        return False

    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _network_epochs_kernel(
        parameters,
        first_moments,
        second_moments,
        inputs,
        targets,
        noise,
        noise_offset,
        model_stream,
        sigma,
        learning_rate,
        l1_strength,
        l2_penalty_strength,
        grad_clip,
        decay,
        use_decay,
        use_gelu,
        first_epoch,
        epoch_count,
        bounds,
        failed_at,
        losses,
        features,
        hidden,
        hidden_layers,
        tile,
    ):
        """Train every model of a pass for `epoch_count` full-batch epochs from `first_epoch`.

        parameters, first_moments, second_moments: `[model, parameter]` float32, every weight (layer by
        layer, nn.Linear's `[out, in]` row-major) then every bias, as `pipeline.train._flat_parameters`.
        inputs, targets: `[model, feature, sample]`. noise: unit noise `[stream, epoch, hidden, sample]`
        (epoch counted from `noise_offset`; zero streams when no model is noisy), scaled by sigma
        `[model]` and added to the last hidden activation. learning_rate, l1_strength,
        l2_penalty_strength, grad_clip, decay `[model]` float32; use_gelu `[model]` bool. bounds `[model]`
        float32, failed_at `[model]` int64 (−1 while alive) carry the divergence state between calls;
        losses `[model, epoch_count]` receives each epoch's loss before its step.
        ReLU/GELU are exact; the loss is MSE over [feature, sample] + λ₁Σ|W| + λ₂ΣW² (weights only; the
        elastic net sets both), its gradient clipped to norm grad_clip where that is > 0, then Adam's
        coupled decay λ·p on every parameter where `decay` is set.
        """
        models = parameters.shape[0]
        samples = inputs.shape[2]
        weight_count = hidden * features * 2 + hidden * hidden * (hidden_layers - 1)
        output_scale = np.float32(2.0 / (features * samples))
        noisy = noise.shape[0] > 0
        for model in prange(models):
            model_parameters = parameters[model]
            gradient = np.empty_like(model_parameters)
            activations = np.empty((hidden_layers, hidden, tile), dtype=np.float32)
            derivatives = np.empty((hidden_layers, hidden, tile), dtype=np.float32)
            delta = np.empty((hidden, tile), dtype=np.float32)
            delta_below = np.empty((hidden, tile), dtype=np.float32)
            residual = np.empty((features, tile), dtype=np.float32)
            tile_inputs = np.empty((features, tile), dtype=np.float32)
            # Inner loops read these (and the noise) through one-dimensional row slices: indexed at
            # [..., unit, start + sample] inside the vector loop, the 3-D and 4-D arrays are read 4.8-7×
            # more slowly (`python bench/indexing.py`). The slices made this kernel 1.23× and the SAE
            # kernel 1.42× faster, with bit-identical results.
            model_inputs = inputs[model]
            model_targets = targets[model]
            gelu = use_gelu[model]
            for local_epoch in range(epoch_count):
                epoch = first_epoch + local_epoch
                alive = failed_at[model] < 0
                gradient[:] = _ZERO
                # Views of this model's layers into the flat vector (they follow Adam's in-place updates).
                squared_error = 0.0
                for start in range(0, samples, tile):
                    count = min(tile, samples - start)
                    weight_start = 0
                    bias_start = weight_count
                    # A C-contiguous copy: the vector loops need unit stride, which a strided view of
                    # `inputs` would only give through a run-time check.
                    for unit in range(features):
                        source = model_inputs[unit, start : start + count]
                        destination = tile_inputs[unit]
                        for sample in range(count):
                            destination[sample] = source[sample]
                    first_weight = model_parameters[weight_start : weight_start + hidden * features].reshape(
                        (hidden, features)
                    )
                    _dense(
                        first_weight,
                        model_parameters[bias_start : bias_start + hidden],
                        tile_inputs,
                        activations[0],
                        hidden,
                        features,
                        count,
                    )
                    _activate(activations[0], derivatives[0], hidden, count, gelu)
                    weight_start += hidden * features
                    bias_start += hidden
                    for layer in range(1, hidden_layers):
                        weight = model_parameters[weight_start : weight_start + hidden * hidden].reshape(
                            (hidden, hidden)
                        )
                        _dense(
                            weight,
                            model_parameters[bias_start : bias_start + hidden],
                            activations[layer - 1],
                            activations[layer],
                            hidden,
                            hidden,
                            count,
                        )
                        _activate(activations[layer], derivatives[layer], hidden, count, gelu)
                        weight_start += hidden * hidden
                        bias_start += hidden
                    last = activations[hidden_layers - 1]
                    if noisy:
                        scale = sigma[model]
                        epoch_noise = noise[model_stream[model], noise_offset + local_epoch]
                        for unit in range(hidden):
                            unit_noise = epoch_noise[unit, start : start + count]
                            unit_values = last[unit]
                            for sample in range(count):
                                unit_values[sample] += unit_noise[sample] * scale
                    output_weight = model_parameters[weight_start : weight_start + features * hidden].reshape(
                        (features, hidden)
                    )
                    _dense(
                        output_weight,
                        model_parameters[bias_start : bias_start + features],
                        last,
                        residual,
                        features,
                        hidden,
                        count,
                    )
                    for unit in range(features):
                        unit_targets = model_targets[unit, start : start + count]
                        unit_residual = residual[unit]
                        for sample in range(count):
                            difference = unit_residual[sample] - unit_targets[sample]
                            squared_error += np.float64(difference * difference)
                            unit_residual[sample] = difference * output_scale
                    # Backward, last layer first: ∂W = δ·hᵀ, ∂b = Σ_t δ, δ_below = act'(pre) ⊙ Wᵀδ.
                    gradient_weights = gradient[weight_start : weight_start + features * hidden].reshape(
                        (features, hidden)
                    )
                    _accumulate_outer(gradient_weights, residual, last, features, hidden, count)
                    _accumulate_rows(gradient[bias_start : bias_start + features], residual, features, count)
                    _dense_transposed(output_weight, residual, delta, hidden, features, count)
                    for unit in range(hidden):
                        for sample in range(count):
                            delta[unit, sample] *= derivatives[hidden_layers - 1, unit, sample]
                    for layer in range(hidden_layers - 1, 0, -1):
                        weight_start -= hidden * hidden
                        bias_start -= hidden
                        weight = model_parameters[weight_start : weight_start + hidden * hidden].reshape(
                            (hidden, hidden)
                        )
                        gradient_weights = gradient[weight_start : weight_start + hidden * hidden].reshape(
                            (hidden, hidden)
                        )
                        _accumulate_outer(
                            gradient_weights, delta, activations[layer - 1], hidden, hidden, count
                        )
                        _accumulate_rows(gradient[bias_start : bias_start + hidden], delta, hidden, count)
                        _dense_transposed(weight, delta, delta_below, hidden, hidden, count)
                        for unit in range(hidden):
                            for sample in range(count):
                                delta[unit, sample] = (
                                    delta_below[unit, sample] * derivatives[layer - 1, unit, sample]
                                )
                    weight_start -= hidden * features
                    bias_start -= hidden
                    gradient_weights = gradient[weight_start : weight_start + hidden * features].reshape(
                        (hidden, features)
                    )
                    _accumulate_outer(gradient_weights, delta, tile_inputs, hidden, features, count)
                    _accumulate_rows(gradient[bias_start : bias_start + hidden], delta, hidden, count)
                loss = np.float32(squared_error / (features * samples))
                l1 = l1_strength[model]
                l2 = l2_penalty_strength[model]
                if l1 != _ZERO or l2 != _ZERO:
                    # float32 sums (vectorized; torch's are float32 too) and a branch-free sign.
                    absolute_sum = _ZERO
                    square_sum = _ZERO
                    doubled = np.float32(2.0) * l2
                    for index in range(weight_count):
                        value = model_parameters[index]
                        absolute_sum += abs(value)
                        square_sum += value * value
                        sign = np.float32(value > _ZERO) - np.float32(value < _ZERO)
                        # The penalties' gradients, in the torch engine's order: + λ₁·sign(W) + 2λ₂·W.
                        gradient[index] = gradient[index] + l1 * sign + doubled * value
                    loss = loss + l1 * absolute_sum + l2 * square_sum
                # The torch engine's order: penalties, clip, then the coupled decay inside Adam's step.
                _clip_norm(gradient, grad_clip[model])
                if use_decay:
                    strength = decay[model]
                    for index in range(model_parameters.shape[0]):
                        gradient[index] += strength * model_parameters[index]
                losses[model, local_epoch] = loss
                newly_failed = alive and _check_divergence(loss, epoch, bounds, failed_at, model)
                _adam(
                    model_parameters,
                    gradient,
                    first_moments[model],
                    second_moments[model],
                    epoch + 1,
                    learning_rate[model],
                    alive and not newly_failed,
                )
                if newly_failed:
                    model_parameters[:] = _ZERO

    @njit(cache=True)
    def _network_epochs(
        parameters,
        first_moments,
        second_moments,
        inputs,
        targets,
        noise,
        noise_offset,
        model_stream,
        sigma,
        learning_rate,
        l1_strength,
        l2_penalty_strength,
        grad_clip,
        decay,
        use_decay,
        use_gelu,
        first_epoch,
        epoch_count,
        bounds,
        failed_at,
        losses,
        features,
        hidden,
        hidden_layers,
        tile,
    ):
        # Compiles the kernel once per (features, hidden) pair with both as constants.
        _network_epochs_kernel(
            parameters,
            first_moments,
            second_moments,
            inputs,
            targets,
            noise,
            noise_offset,
            model_stream,
            sigma,
            learning_rate,
            l1_strength,
            l2_penalty_strength,
            grad_clip,
            decay,
            use_decay,
            use_gelu,
            first_epoch,
            epoch_count,
            bounds,
            failed_at,
            losses,
            literally(features),
            literally(hidden),
            hidden_layers,
            tile,
        )

    # SAE kinds of `_sae_epochs_kernel`.
    _LEAKY_RELU, _LEAKY_RELU_TIED, _RELU = 0, 1, 2

    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _sae_epochs_kernel(
        parameters,
        first_moments,
        second_moments,
        inputs,
        kind,
        l1_coefficient,
        leaky_slope,
        learning_rate,
        grad_clip,
        first_epoch,
        epoch_count,
        bounds,
        failed_at,
        losses,
        hidden,
        latents,
        tile,
    ):
        """Train every model's SAE for `epoch_count` full-batch epochs from `first_epoch`.

        parameters, first_moments, second_moments: `[model, parameter]` float32, laid out encoder
        `[hidden, latent]`, encoder_bias `[latent]`, decoder `[latent, hidden]`, then (ReLU SAE only)
        decoder_bias `[hidden]`, each row-major. inputs: `[model, hidden, sample]`. kind: _LEAKY_RELU,
        _LEAKY_RELU_TIED or _RELU (pipeline.sae's leaky_relu, published_tied, relu). learning_rate,
        grad_clip `[model]` float32 (the gradient's norm limit, 0 = none). bounds, failed_at, losses as in
        `_network_epochs_kernel`.
        Leaky: z = LeakyReLU(W_encᵀx + b), x̂ = W_decᵀz, loss = mean (x̂ − x)² + λΣ|z|.
        ReLU: z = ReLU(W_encᵀ(x − b_dec) + b_enc), x̂ = W_decᵀz + b_dec, loss = mean (x̂ − x)² +
        λ·mean_t Σ_k z_k‖d_k‖. Tied: after each step the shared weight is decoder + encoderᵀ − decoder
        before the step (pipeline.train._tie).
        """
        models = parameters.shape[0]
        samples = inputs.shape[2]
        relu = kind == _RELU
        encoder_size = hidden * latents
        encoder_bias_start = encoder_size
        decoder_start = encoder_bias_start + latents
        decoder_bias_start = decoder_start + latents * hidden
        reconstruction_scale = np.float32(2.0 / (hidden * samples))
        inverse_samples = np.float32(1.0 / samples)
        for model in prange(models):
            model_parameters = parameters[model]
            model_inputs = inputs[model]  # read through row slices, as in `_network_epochs_kernel`
            encoder = model_parameters[:encoder_size].reshape((hidden, latents))
            encoder_bias = model_parameters[encoder_bias_start:decoder_start]
            decoder = model_parameters[decoder_start:decoder_bias_start].reshape((latents, hidden))
            gradient = np.empty_like(model_parameters)
            gradient_encoder = gradient[:encoder_size].reshape((hidden, latents))
            gradient_encoder_bias = gradient[encoder_bias_start:decoder_start]
            gradient_decoder = gradient[decoder_start:decoder_bias_start].reshape((latents, hidden))
            decoder_before = np.empty((latents, hidden), dtype=np.float32)
            centred = np.empty((hidden, tile), dtype=np.float32)
            latent_values = np.empty((latents, tile), dtype=np.float32)
            latent_derivative = np.empty((latents, tile), dtype=np.float32)
            latent_gradient = np.empty((latents, tile), dtype=np.float32)
            residual = np.empty((hidden, tile), dtype=np.float32)
            norms = np.zeros(latents, dtype=np.float32)
            latent_sums = np.zeros(latents, dtype=np.float32)
            no_bias = np.zeros(max(hidden, latents), dtype=np.float32)
            decoder_bias = model_parameters[decoder_bias_start:] if relu else no_bias
            for local_epoch in range(epoch_count):
                epoch = first_epoch + local_epoch
                alive = failed_at[model] < 0
                gradient[:] = _ZERO
                latent_sums[:] = _ZERO
                if relu:
                    for latent in range(latents):
                        total = _ZERO
                        for unit in range(hidden):
                            total += decoder[latent, unit] * decoder[latent, unit]
                        norms[latent] = np.sqrt(total)
                squared_error = 0.0
                penalty = 0.0
                for start in range(0, samples, tile):
                    count = min(tile, samples - start)
                    for unit in range(hidden):
                        shift = decoder_bias[unit]
                        unit_inputs = model_inputs[unit, start : start + count]
                        unit_centred = centred[unit]
                        for sample in range(count):
                            unit_centred[sample] = unit_inputs[sample] - shift
                    _dense_transposed(encoder, centred, latent_values, latents, hidden, count)
                    for latent in range(latents):
                        offset = encoder_bias[latent]
                        for sample in range(count):
                            pre = latent_values[latent, sample] + offset
                            positive = pre > _ZERO
                            if relu:
                                latent_values[latent, sample] = pre if positive else _ZERO
                                latent_derivative[latent, sample] = _ONE if positive else _ZERO
                            else:
                                latent_values[latent, sample] = pre if positive else pre * leaky_slope
                                latent_derivative[latent, sample] = _ONE if positive else leaky_slope
                    _dense_transposed(decoder, latent_values, residual, hidden, latents, count)
                    for unit in range(hidden):
                        shift = decoder_bias[unit]
                        unit_inputs = model_inputs[unit, start : start + count]
                        unit_residual = residual[unit]
                        for sample in range(count):
                            difference = unit_residual[sample] + shift - unit_inputs[sample]
                            squared_error += np.float64(difference * difference)
                            unit_residual[sample] = difference * reconstruction_scale
                    # ∂W_dec = z·g_x̂ᵀ; g_z = W_dec·g_x̂ + the penalty's ∂/∂z; g_pre = g_z ⊙ act'(pre).
                    _accumulate_outer(gradient_decoder, latent_values, residual, latents, hidden, count)
                    _dense(decoder, no_bias, residual, latent_gradient, latents, hidden, count)
                    for latent in range(latents):
                        if relu:
                            weight = norms[latent]
                            penalty_gradient = l1_coefficient * weight * inverse_samples
                            row_sum = _ZERO
                            for sample in range(count):
                                row_sum += latent_values[latent, sample]
                            latent_sums[latent] += row_sum
                            penalty += np.float64(row_sum) * np.float64(weight)
                            for sample in range(count):
                                latent_gradient[latent, sample] = (
                                    latent_gradient[latent, sample] + penalty_gradient
                                ) * latent_derivative[latent, sample]
                        else:
                            absolute = _ZERO
                            for sample in range(count):
                                value = latent_values[latent, sample]
                                absolute += abs(value)
                                latent_gradient[latent, sample] = (
                                    latent_gradient[latent, sample] + l1_coefficient * np.sign(value)
                                ) * latent_derivative[latent, sample]
                            penalty += np.float64(absolute)
                    _accumulate_outer(gradient_encoder, centred, latent_gradient, hidden, latents, count)
                    _accumulate_rows(gradient_encoder_bias, latent_gradient, latents, count)
                    if relu:
                        _accumulate_rows(gradient[decoder_bias_start:], residual, hidden, count)
                if relu:
                    # ‖d_k‖'s gradient d_k/‖d_k‖ times λ·mean_t z_k; b_dec enters through x − b_dec too.
                    for latent in range(latents):
                        factor = l1_coefficient * (latent_sums[latent] * inverse_samples) / norms[latent]
                        for unit in range(hidden):
                            gradient_decoder[latent, unit] += factor * decoder[latent, unit]
                    for unit in range(hidden):
                        total = _ZERO
                        for latent in range(latents):
                            total += encoder[unit, latent] * gradient_encoder_bias[latent]
                        gradient[decoder_bias_start + unit] -= total
                    loss = np.float32(squared_error / (hidden * samples)) + np.float32(
                        l1_coefficient * penalty / samples
                    )
                else:
                    loss = np.float32(squared_error / (hidden * samples)) + np.float32(
                        l1_coefficient * penalty
                    )
                losses[model, local_epoch] = loss
                newly_failed = alive and _check_divergence(loss, epoch, bounds, failed_at, model)
                _clip_norm(gradient, grad_clip[model])
                if kind == _LEAKY_RELU_TIED:
                    decoder_before[:] = decoder
                _adam(
                    model_parameters,
                    gradient,
                    first_moments[model],
                    second_moments[model],
                    epoch + 1,
                    learning_rate[model],
                    alive and not newly_failed,
                )
                if kind == _LEAKY_RELU_TIED:
                    for latent in range(latents):
                        for unit in range(hidden):
                            shared = (
                                decoder[latent, unit] + encoder[unit, latent] - decoder_before[latent, unit]
                            )
                            decoder[latent, unit] = shared
                            encoder[unit, latent] = shared
                if newly_failed:
                    model_parameters[:] = _ZERO

    @njit(cache=True)
    def _sae_epochs(
        parameters,
        first_moments,
        second_moments,
        inputs,
        kind,
        l1_coefficient,
        leaky_slope,
        learning_rate,
        grad_clip,
        first_epoch,
        epoch_count,
        bounds,
        failed_at,
        losses,
        hidden,
        latents,
        tile,
    ):
        # Compiles the kernel once per (hidden, latents) pair with both as constants.
        _sae_epochs_kernel(
            parameters,
            first_moments,
            second_moments,
            inputs,
            kind,
            l1_coefficient,
            leaky_slope,
            learning_rate,
            grad_clip,
            first_epoch,
            epoch_count,
            bounds,
            failed_at,
            losses,
            literally(hidden),
            literally(latents),
            tile,
        )


_ENTRY_POINTS: dict[tuple, object] = {}


@contextlib.contextmanager
def _compile_lock():
    """Hold a lock shared by every process on this machine while a kernel is compiled or loaded.

    Compiling the kernels takes about a minute (70 s measured on 2 busy cores). The workers of a PassPool start
    together; without the lock each would compile the same kernels on a cold cache. With it the first
    compiles and writes numba's on-disk cache, and the others wait and then load it (under a second).
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): each process compiles on a cold cache
        yield
        return
    path = os.path.join(tempfile.gettempdir(), "polylab-fused-compile.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _call_specialized(dispatcher, literal_values: tuple[int, ...], *arguments) -> None:
    """Call `dispatcher` (a driver that asks for literal unit counts), at the cost of a C call.

    A literal-dispatching function goes through numba's Python type resolution on every call from
    Python (2–13 ms measured; 200 calls per sweep pass). After the first call has compiled or loaded the
    specialization for these unit counts, its entry point is kept and called directly (0.6 µs); the
    other arguments always have the same types, so the entry point's signature fits them.
    """
    key = (dispatcher, literal_values)
    entry_point = _ENTRY_POINTS.get(key)
    if entry_point is not None:
        entry_point(*arguments)
        return
    with _compile_lock():
        dispatcher(*arguments)
    for signature, compiled in dispatcher.overloads.items():
        literals = [getattr(argument, "literal_value", None) for argument in signature]
        if tuple(value for value in literals if value is not None) == literal_values:
            _ENTRY_POINTS[key] = compiled.entry_point
            return


def _segments(epochs: int, curve_every: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """(first epoch, epoch count) pieces of one training run: cut at every curve point (the curve is
    read between two kernel calls) and, when `chunk` is given, at every noise chunk boundary."""
    cuts = {epochs}
    cuts.update(range(curve_every, epochs, curve_every))
    if chunk is not None:
        cuts.update(range(chunk, epochs, chunk))
    pieces, start = [], 0
    for cut in sorted(cuts):
        pieces.append((start, cut - start))
        start = cut
    return pieces


def _record_failures(
    state, losses: np.ndarray, failed_before: np.ndarray, failed_at: np.ndarray, stage: str, first_epoch: int
) -> None:
    """Hand the kernel's verdicts to the pass's bookkeeping, which words the reasons.

    `losses: [model, epoch]` of the piece just trained. The bookkeeping's first call sets its bounds (the
    first epoch), and it is called again only for the epochs where some model newly failed, with that
    epoch's losses, so it reaches the same verdicts and messages as on the torch engine.
    """
    if first_epoch == 0:
        state.check(torch.from_numpy(losses[:, 0].copy()), stage, 0)
    newly_failed = np.flatnonzero((failed_before < 0) & (failed_at >= 0))
    for epoch in sorted({int(failed_at[model]) for model in newly_failed}):
        if epoch > 0 or first_epoch != 0:
            state.check(torch.from_numpy(losses[:, epoch - first_epoch].copy()), stage, epoch)


def train_networks(configs, seeds, datasets, state, progress, device):
    """The fused counterpart of `pipeline.train._train_networks`: same arguments, same return value
    (curves, weights `[model, d_out, d_in]` per layer, biases `[model, d_out]` per layer)."""
    from pipeline import train as reference
    from pipeline.data import generator_for
    from pipeline.models import initial_parameters, layer_dims, mlp_forward_features, runs_of

    _use_torch_thread_count()
    first = configs[0]
    network = first.network
    activation = runs_of([config.network.act for config in configs])
    dims = layer_dims(first.data.features, network.hidden_dim, network.hidden_layers)
    initial = [
        initial_parameters(config.network.init, dims, generator_for(seed, "init"))
        for config, seed in zip(configs, seeds, strict=True)
    ]
    flat, weights, biases = reference._flat_parameters(initial, device)

    def per_model(values) -> np.ndarray:
        return np.asarray(list(values), dtype=np.float32)

    l1_strength, l2_penalty_strength, decay = (
        per_model(strengths) for strengths in reference.regularization_strengths(configs)
    )
    train_inputs = reference._stack_features([dataset.train_inputs for dataset in datasets], device)
    train_targets = reference._stack_features([dataset.train_targets for dataset in datasets], device)
    validation_inputs = reference._stack_features([dataset.validation_inputs for dataset in datasets], device)
    validation_targets = reference._stack_features(
        [dataset.validation_targets for dataset in datasets], device
    )
    epochs, samples, hidden = network.epochs, train_inputs.shape[2], network.hidden_dim
    noise = reference._NoiseSource(configs, seeds, (hidden, samples), epochs, device)
    model_stream = noise.model_stream.numpy().astype(np.int64)
    sigma = noise.sigma.reshape(-1).numpy().copy()
    parameters = flat.numpy()
    first_moments, second_moments = np.zeros_like(parameters), np.zeros_like(parameters)
    models = len(configs)
    bounds = np.zeros(models, dtype=np.float32)
    failed_at = np.array([-1 if failure is None else 0 for failure in state.failures], dtype=np.int64)
    use_gelu = np.array([config.network.act == "gelu" for config in configs])
    arguments = (
        per_model(config.network.lr for config in configs),
        l1_strength,
        l2_penalty_strength,
        per_model(config.network.grad_clip for config in configs),
        decay,
        bool(decay.any()),
        use_gelu,
    )
    inputs_array, targets_array = train_inputs.numpy(), train_targets.numpy()
    curves: dict[str, list] = {"epoch": [], "train_mse": [], "val_mse": []}

    def mse(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, _ = mlp_forward_features(inputs, weights, biases, activation)
        return (outputs - targets).square().mean(dim=(1, 2))

    def draw_chunk(first_epoch: int) -> np.ndarray:
        # The torch engine's draws, call for call: one chunk `[stream, epoch, hidden, sample]` of every
        # (seed, kind) stream, drawn in epoch order.
        chunk_epochs = min(reference.NOISE_CHUNK_EPOCHS, epochs - first_epoch)
        drawn = torch.empty(len(noise.stream_order), chunk_epochs, hidden, samples)
        for index, (seed, kind) in enumerate(noise.stream_order):
            fill_unit_noise(kind, drawn[index], noise.streams[(seed, kind)])
        return drawn.numpy()

    # Noise is drawn one chunk ahead in a thread while the kernel (which releases the GIL) trains: the
    # draws are a serial numpy job as large as a third of the kernel's work (Student-t), and overlapping
    # them keeps both cores busy. One thread draws every chunk in order, so the streams are unchanged.
    drawer = ThreadPoolExecutor(1, thread_name_prefix="noise") if noise.enabled else None
    pending: dict[int, Future] = {}
    chunk, chunk_start = np.zeros((0, 1, hidden, samples), dtype=np.float32), 0
    try:
        if drawer is not None:
            pending[0] = drawer.submit(draw_chunk, 0)
        for first_epoch, count in _segments(epochs, first.curve_every, reference.NOISE_CHUNK_EPOCHS):
            if first_epoch in pending:
                chunk, chunk_start = pending.pop(first_epoch).result(), first_epoch
                following = first_epoch + reference.NOISE_CHUNK_EPOCHS
                if following < epochs:
                    pending[following] = drawer.submit(draw_chunk, following)
            losses = np.empty((models, count), dtype=np.float32)
            failed_before = failed_at.copy()
            with numba.parallel_chunksize(PARALLEL_CHUNK_MODELS):
                _call_specialized(
                    _network_epochs,
                    (first.data.features, hidden),
                    parameters,
                    first_moments,
                    second_moments,
                    inputs_array,
                    targets_array,
                    chunk,
                    first_epoch - chunk_start,
                    model_stream,
                    sigma,
                    *arguments,
                    first_epoch,
                    count,
                    bounds,
                    failed_at,
                    losses,
                    first.data.features,
                    hidden,
                    network.hidden_layers,
                    TILE_SAMPLES,
                )
            _record_failures(state, losses, failed_before, failed_at, "network", first_epoch)
            last = first_epoch + count
            if last % first.curve_every == 0 or last == epochs:
                curves["epoch"].append(last)
                curves["train_mse"].append(mse(train_inputs, train_targets).tolist())
                curves["val_mse"].append(mse(validation_inputs, validation_targets).tolist())
            if progress is not None:
                progress(count)
    finally:
        if drawer is not None:
            drawer.shutdown(wait=True, cancel_futures=True)
    # A model can blow up on its very last step; check the trained parameters once more.
    if state.check(mse(train_inputs, train_targets), "network", epochs):
        reference._freeze_failed([flat], state.alive)
    return curves, weights, biases


def train_saes_on_hidden(configs, seeds, hidden, state, progress, device):
    """The fused counterpart of `pipeline.train.train_saes_on_hidden` for the architectures in
    FUSED_SAE_ARCHITECTURES: same arguments and return value, same initialization and standardization."""
    from pipeline import train as reference

    _use_torch_thread_count()
    first = configs[0]
    sae_config = first.sae
    architecture, (mean, std), standardized, training_inputs, initial = reference.sae_starting_point(
        configs, seeds, hidden
    )
    hidden_dim = hidden.shape[-1]
    models, latents = len(configs), sae_config.d_sae
    names = list(initial[0])
    shapes = {name: tuple(initial[0][name].shape) for name in names}
    # The kernel's layout (encoder, encoder_bias, decoder, decoder_bias) is the registry's key order.
    expected = ["encoder", "encoder_bias", "decoder"] + (
        ["decoder_bias"] if sae_config.architecture == "relu" else []
    )
    if names != expected:
        raise ValueError(
            f"the fused SAE expects parameters {expected}; {sae_config.architecture} has {names}"
        )
    sizes = [math.prod(shapes[name]) for name in names]
    flat = torch.empty(models, sum(sizes))
    views, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        views[name] = flat[:, start : start + size].view(models, *shapes[name])
        views[name].copy_(torch.stack([model[name] for model in initial]))
        start += size
    parameters = flat.numpy()
    first_moments, second_moments = np.zeros_like(parameters), np.zeros_like(parameters)
    bounds = np.zeros(models, dtype=np.float32)
    failed_at = np.array([-1 if failure is None else 0 for failure in state.failures], dtype=np.int64)
    kind = {"leaky_relu": _LEAKY_RELU, "published_tied": _LEAKY_RELU_TIED, "relu": _RELU}[
        sae_config.architecture
    ]
    features = training_inputs.transpose(1, 2).contiguous().numpy()  # [model, hidden, sample]
    learning_rate = np.asarray([config.sae.lr for config in configs], dtype=np.float32)
    grad_clip = np.asarray([config.sae.grad_clip for config in configs], dtype=np.float32)
    curves: dict[str, list] = {"epoch": [], "sae_loss": [], "sae_l0": [], "sae_dead_fraction": []}
    epochs = sae_config.epochs
    for first_epoch, count in _segments(epochs, first.curve_every):
        losses = np.empty((models, count), dtype=np.float32)
        failed_before = failed_at.copy()
        with numba.parallel_chunksize(PARALLEL_CHUNK_MODELS):
            _call_specialized(
                _sae_epochs,
                (hidden_dim, latents),
                parameters,
                first_moments,
                second_moments,
                features,
                kind,
                np.float32(sae_config.l1_coefficient),
                np.float32(sae_config.leaky_slope),
                learning_rate,
                grad_clip,
                first_epoch,
                count,
                bounds,
                failed_at,
                losses,
                hidden_dim,
                latents,
                TILE_SAMPLES,
            )
        _record_failures(state, losses, failed_before, failed_at, "sae", first_epoch)
        last = first_epoch + count
        if last % first.curve_every == 0 or last == epochs:
            with torch.no_grad():
                active = architecture.encode(views, standardized, sae_config) > 0
            curves["epoch"].append(last)
            curves["sae_loss"].append(losses[:, -1].tolist())
            curves["sae_l0"].append(active.float().mean(dim=(1, 2)).tolist())
            curves["sae_dead_fraction"].append((~active.any(dim=1)).float().mean(dim=1).tolist())
        if progress is not None:
            progress(count)
    return curves, {name: view.to(device) for name, view in views.items()}, (mean, std)


if numba is not None:

    @njit(cache=True, nogil=True)
    def _uniform_floats(bits):
        """numpy's float32 uniforms from the 32-bit words its PCG64 Generator hands out in order:
        (word >> 8)·2⁻²⁴, as numpy's `next_float` forms them (exact: no rounding happens)."""
        uniforms = np.empty(bits.shape[0], dtype=np.float32)
        for index in range(bits.shape[0]):
            uniforms[index] = np.float32(bits[index] >> np.uint32(8)) * np.float32(2.0**-24)
        return uniforms

    @njit(cache=True, nogil=True)
    def _polar_radius(pairs):
        """W = U² + V² `[candidate]` of the polar method, with U, V = 2·pairs − 1 from `pairs: [2,
        candidate]` uniforms, in the float32 order of `pipeline.train._student_t3_unit`."""
        radius = np.empty(pairs.shape[1], dtype=np.float32)
        for index in range(pairs.shape[1]):
            u = pairs[0, index] * np.float32(2.0) - np.float32(1.0)
            v = pairs[1, index] * np.float32(2.0) - np.float32(1.0)
            radius[index] = u * u + v * v
        return radius

    @njit(cache=True, nogil=True, error_model="numpy")
    def _student_t3_accept(pairs, radius, powered, out, start):
        """Write the accepted candidates' t₃/√3 draws, in order, into `out[start:]` until it is full;
        returns how many were written. `powered` is radius^(−2/3), computed by numpy as the reference
        does. The remaining arithmetic is the reference's, in its float32 order (no fastmath), so the
        draws are the same numbers bit for bit.

        Two loops without a data-dependent branch: the transform of every candidate (vectorized; a
        rejected one gives inf or NaN, never kept), then a compaction that stores every value and
        advances only past accepted ones. The single loop with an `if accepted` it replaces mispredicted
        on the one candidate in five that is rejected: 3.2 → about 1 ns a draw for this step, 8.6 →
        6.1 ns for the whole Student-t draw (measured on 10-epoch chunks)."""
        count = pairs.shape[1]
        degrees = np.float32(3.0)
        root_three = np.float32(math.sqrt(3.0))
        values = np.empty(count, dtype=np.float32)
        for index in range(count):
            u = pairs[0, index] * np.float32(2.0) - np.float32(1.0)
            value = np.sqrt((powered[index] - np.float32(1.0)) * degrees / radius[index]) * u
            values[index] = value / root_three
        needed = out.shape[0] - start
        kept = 0
        for index in range(count):
            candidate = radius[index]
            values[kept] = values[index]  # kept ≤ index: compaction in place
            kept += (candidate < np.float32(1.0)) & (candidate > np.float32(0.0))
            if kept == needed:
                break
        out[start : start + kept] = values[:kept]
        return kept


def _uniform_pairs(generator: np.random.Generator, candidates: int) -> np.ndarray:
    """`generator.random((2, candidates), dtype=np.float32)`, the same numbers and the same generator state
    after it.

    numpy forms each float32 uniform from the next 32-bit word of its PCG64, taking each 64-bit output's
    low half and then its high half, so `2·candidates` uniforms are exactly the next `candidates` raw
    outputs read as little-endian 32-bit words. Drawing those raw and converting them in one compiled
    pass makes a whole Student-t draw 1.24× faster (7.3 → 5.9 ns, `python bench/noise.py --repeats 9`).
    Where that reading does not hold (another bit generator, a big-endian machine, a half word left
    over from an odd draw), it is numpy's own call.
    """
    bit_generator = generator.bit_generator
    if (
        type(bit_generator) is np.random.PCG64
        and sys.byteorder == "little"
        and not bit_generator.state["has_uint32"]
    ):
        bits = bit_generator.random_raw(candidates).view(np.uint32)
        return _uniform_floats(bits).reshape(2, candidates)
    return generator.random((2, candidates), dtype=np.float32)


def fill_unit_noise(kind: str, out: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """`pipeline.train.fill_unit_noise`, the same numbers, with the Student-t transform in two compiled
    passes around numpy's power instead of eight numpy passes, and the uniforms from raw PCG64 outputs
    (`_uniform_pairs`): 8.5 → 5.9 ns a draw (`python bench/noise.py --repeats 9`). The power is numpy's,
    so that its vectorized rounding is the reference's too.

    The generator advances exactly as there (the same candidate blocks); bipolar and Gaussian noise
    are the reference's own code.
    """
    from pipeline.train import fill_unit_noise as reference_fill

    if kind != "positive_kurtosis":
        return reference_fill(kind, out, generator)
    flat = out.numpy().reshape(-1)
    written = 0
    while written < flat.size:
        candidates = int((flat.size - written) * 1.3) + 64  # as the reference: acceptance π/4 ≈ 0.785
        pairs = _uniform_pairs(generator, candidates)
        radius = _polar_radius(pairs)
        with np.errstate(divide="ignore"):  # W = 0 gives inf; such a candidate is rejected
            powered = radius ** np.float32(-2 / 3)
        written += _student_t3_accept(pairs, radius, powered, flat, written)
    return out
