"""Independent, buffered random streams per machine ("common random numbers").

Each machine owns several numpy ``Generator`` streams, each seeded from
``SeedSequence(seed, spawn_key=(kind, number, stream))``.  Streams are split by what
consumes them so that a maintenance decision never shifts unrelated randomness:

* ``ENV``  - one row per plant tick, drawn even while the machine is down (ambient
  walks, sensor noise), so the noise at plant time t is the same under every policy;
* ``PART`` - one row per part / batch (product variant, set points, random failure,
  scrap), so the k-th part is the same part under every policy;
* ``UNIT`` - one row per fitted tool / restored pump (tool life, pump damage law).

Numbers are drawn in fixed-size blocks (one numpy call per block, then plain Python
floats), which keeps the per-tick cost small and the sequence independent of how a
run is chunked.  Within one numpy version the streams are identical on every machine.
"""

from __future__ import annotations

import numpy as np

ENV, PART, UNIT = 0, 1, 2
KIND_CODES = {"milling": 0, "pump": 1}


def generator(seed: int, kind: str, number: int, stream: int) -> np.random.Generator:
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(KIND_CODES[kind], number, stream))
    return np.random.Generator(np.random.PCG64(ss))


class Rows:
    """Rows of ``normals`` standard normals followed by ``uniforms`` U(0,1) numbers, drawn in blocks."""

    __slots__ = ("gen", "normals", "uniforms", "block", "rows", "i")

    def __init__(self, gen: np.random.Generator, normals: int, uniforms: int, block: int):
        self.gen = gen
        self.normals = normals
        self.uniforms = uniforms
        self.block = block
        self.rows: list[list[float]] = []
        self.i = 0

    def __deepcopy__(self, memo) -> "Rows":
        # Drawn blocks are never mutated, so a copy shares them; only the generator is copied.
        other = Rows.__new__(Rows)
        other.gen = np.random.Generator(type(self.gen.bit_generator)())
        other.gen.bit_generator.state = self.gen.bit_generator.state
        other.normals, other.uniforms, other.block = self.normals, self.uniforms, self.block
        other.rows, other.i = self.rows, self.i
        return other

    def next(self) -> list[float]:
        i = self.i
        if i >= len(self.rows):
            self._refill()
            i = 0
        self.i = i + 1
        return self.rows[i]

    def _refill(self) -> None:
        parts = []
        if self.normals:
            parts.append(self.gen.standard_normal((self.block, self.normals)))
        if self.uniforms:
            parts.append(self.gen.random((self.block, self.uniforms)))
        self.rows = np.concatenate(parts, axis=1).tolist() if len(parts) > 1 else parts[0].tolist()
        self.i = 0
