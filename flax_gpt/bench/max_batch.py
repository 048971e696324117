"""`flax-gpt compile --find-max-batch`: the largest global batch that fits, proven by two compiles.

The answer is a multiple of the batch unit (every batch shard gets whole micro-batches) and comes
with its proof: a compile at that batch that fits without recomputing, and one at the next multiple
that does not fit or fits only by recomputing. Compiles are the cost (minutes each for a large
model), so the search extrapolates and interpolates memory to get near the edge in few of them,
then closes the bracket on multiples; `max_compiles`, a time budget and Ctrl-C stop it early with
the best batch proven to fit so far, flagged as not proven largest.
"""

from __future__ import annotations

GiB = 1024**3

# FLOPs over the line through the two smallest fitting batches that mark a batch the compiler
# fitted only by recomputing activations (see search_max_batch).
RECOMPUTE_TOLERANCE = 0.02


def search_max_batch(probe, start: int, unit: int, capacity: int, *, max_compiles: int = 12,
                     time_budget_s: float | None = None, say=None) -> dict:
    """Largest batch, a multiple of `unit`, that fits without recompute: `probe(batch)` is a
    `compile_step` result.

    Memory is close to linear in the batch (fixed parameters and optimizer state + activations per
    sequence): from the config's batch (`start`) the search doubles, then goes where the line
    through the last two fitting compiles meets `capacity` (small models: a batch-independent
    buffer sets the peak at small batches and hides the slope, so the line is refitted as it goes).
    Once a batch does not fit, it narrows the interval between the largest clean fit and the
    smallest batch that is not (interpolating memory, halving when that stalls or the upper figure
    came from an out-of-memory message) until the two are one multiple apart: that pair is the proof.

    Recompute: past the line XLA:TPU still fits bigger batches by rematerialising activations, at
    more FLOPs per sequence (distilgpt2 on v5e-4: +1.4% at 1.5x the line's batch, +12% at 1.8x).
    A batch whose compiled FLOPs exceed the line through the two smallest fitting batches by more
    than RECOMPUTE_TOLERANCE is not a clean fit; bigger ones may compile and run slower per token.

    Stops early, with the largest clean fit so far and `exact` False: after `max_compiles`
    compiles; when the next compile would end past `time_budget_s` seconds of compiling (the
    longest compile so far is the guess of how long it takes); on Ctrl-C (KeyboardInterrupt from
    `probe`). `stopped` says which, None when the bracket closed. Also returned: `proof` (the
    answer and the next multiple, and why that one is refused; None unless exact) and every
    compile's result and recompute verdict.
    """
    say = say or (lambda *_: None)
    results: dict[int, dict] = {}
    mem = lambda r: r["hbm_per_device_bytes"]["total"]

    def flops_line():
        """FLOPs against batch through the two smallest batches that fit, once there are two."""
        fitting = sorted(b for b, r in results.items() if r["fits"] and r["flops_per_device_step_xla"])
        if len(fitting) < 2:
            return None
        (a, fa), (b, fb) = ((x, results[x]["flops_per_device_step_xla"]) for x in fitting[:2])
        return lambda x: fa + (fb - fa) * (x - a) / (b - a)

    def recomputes(batch: int) -> bool:
        r, line = results[batch], flops_line()
        xla = r["flops_per_device_step_xla"]
        return bool(r["fits"] and line and xla and xla > (1 + RECOMPUTE_TOLERANCE) * line(batch))

    def clean(batch: int) -> bool:
        return results[batch]["fits"] and not recomputes(batch)

    def bracket() -> tuple[int, int | None]:
        """(largest clean fit or 0, smallest batch above it that is not a clean fit or None)."""
        lo = max((b for b in results if clean(b)), default=0)
        return lo, min((b for b in results if b > lo and not clean(b)), default=None)

    def run(batch: int) -> None:
        r = results[batch] = probe(batch)
        # one line per compile: a search is several multi-minute compiles
        verdict = ("fits only by recomputing activations (more FLOPs per sequence): not counted"
                   if recomputes(batch) else "fits" if r["fits"] else
                   "does not fit" if r["compiled"] else "does not fit (the compiler ran out of HBM)")
        say(f"batch {batch}: {mem(r) / GiB:.2f} of {capacity / GiB:.2f} GiB per device, {verdict} "
            f"({r['compile_time_s']} s)")

    def next_batch(lo: int, hi: int | None, streak: int) -> int:
        if not results:
            return max(unit, start // unit * unit)
        if lo == 0:  # the config's batch does not fit: the smallest one, then the bracket above it
            return unit
        if hi is None:  # where the line through the last two clean fits meets the capacity
            fits = sorted(b for b in results if clean(b))
            if len(fits) < 2:
                return 2 * lo
            a, b = fits[-2:]
            slope = (mem(results[b]) - mem(results[a])) / (b - a)
            guess = int((capacity - mem(results[b])) / slope) + b if slope > 0 else 8 * lo
            return max(lo + unit, min(guess // unit * unit, 8 * lo))  # a flat line says little
        # between the two: interpolate, or halve when one side keeps moving (regula falsi stalls)
        # or the upper figure is what the compiler wanted before giving up (well above what a
        # compiled program would hold)
        ml, mh = mem(results[lo]), mem(results[hi])
        guess = lo + (hi - lo) // 2 // unit * unit
        if streak < 2 and mh > ml and results[hi]["compiled"]:
            guess = lo + int((capacity - ml) / (mh - ml) * (hi - lo)) // unit * unit
        return min(max(guess, lo + unit), hi - unit)

    stopped, streak, last = None, 0, None
    while True:
        lo, hi = bracket()
        if hi is not None and hi - lo <= unit:
            break
        spent = sum(r["compile_time_s"] for r in results.values())
        longest = max((r["compile_time_s"] for r in results.values()), default=0.0)
        if len(results) >= max_compiles:
            stopped = "max_compiles"
        elif time_budget_s is not None and results and spent + longest > time_budget_s:
            stopped = "time_budget"
        if stopped:
            break
        batch = next_batch(lo, hi, streak)
        try:
            run(batch)
        except KeyboardInterrupt:
            stopped = "interrupted"
            break
        side = "lo" if clean(batch) else "hi"
        streak, last = (streak + 1 if side == last else 1), side
    lo, hi = bracket()
    proof = None
    if stopped is None:
        why = "does not fit" if not results[hi]["fits"] else "fits only by recomputing"
        proof = {"fits": lo or None, "next": hi, "next_is": why}
    return {"max_batch": lo, "exact": stopped is None, "stopped": stopped, "proof": proof,
            "compiles": len(results), "results": results, "recomputes": {b: recomputes(b) for b in results}}
