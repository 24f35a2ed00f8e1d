"""Counter-based per-row random numbers, so that a row's tokens do not depend on the rest of its batch.

A `torch.Generator` hands out numbers in call order, so row i of a batch would see different numbers than the same
prompt alone. Instead every row carries a 62-bit seed, and the uniform for (row seed, output position, stream) is a
hash of those three integers: row i of any batch and the same prompt alone with the same seed read the same numbers.
All arithmetic stays inside int64 without overflow (32-bit values times multipliers below 2**31), so the hash is
identical on every device and backend.
"""

import torch

_MASK32 = 0xFFFFFFFF
SEED_BITS = 62

# Named streams keep the student's proposal and the teacher's replacement at one position independent.
STREAM_STUDENT = 1
STREAM_TEACHER = 2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply; multipliers from C. Wellons' hash prospector, both < 2**31).

    x (...) int64 holding values in [0, 2**32); returns the same shape and range.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_uniforms(row_seeds: torch.Tensor, counters: torch.Tensor | int, stream: int) -> torch.Tensor:
    """Uniform numbers in [0, 1), one per row, as a pure function of (seed, counter, stream).

    row_seeds (B,) int64 in [0, 2**62); counters (B,) int64 or an int (usually the output position of the token);
    stream: a small int naming the use (STREAM_STUDENT, STREAM_TEACHER). Returns (B,) float64 with 2**-32 resolution.
    """
    if not isinstance(counters, torch.Tensor):
        counters = torch.full_like(row_seeds, int(counters))
    lo = row_seeds & _MASK32
    hi = (row_seeds >> 32) & _MASK32
    h = _mix32((counters.to(torch.int64) & _MASK32) ^ ((stream * 0x9E3779B9) & _MASK32))
    h = _mix32(h ^ hi)
    h = _mix32(h ^ lo)
    h = _mix32(h ^ 0x5BD1E995)
    return h.to(torch.float64) * (1.0 / 2**32)


def draw_row_seeds(batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) int64 seeds in [0, 2**62) drawn from `generator` (or torch's global generator when None), on `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**SEED_BITS, (batch_size,), generator=generator, device=gen_device, dtype=torch.int64)
    return seeds.to(device) if device is not None else seeds


def resolve_row_seeds(
    row_seeds: torch.Tensor | None, batch_size: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    """The given (B,) row seeds as int64 on `device`, or new ones drawn from `generator` when None."""
    if row_seeds is None:
        return draw_row_seeds(batch_size, generator, device)
    if row_seeds.shape != (batch_size,):
        raise ValueError(f"row_seeds must have shape ({batch_size},), got {tuple(row_seeds.shape)}")
    return row_seeds.to(device=device, dtype=torch.int64)
