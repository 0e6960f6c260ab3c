"""Counter-keyed random streams per machine ("common random numbers").

Every random number a machine uses is a pure function of ``(seed, machine kind, machine
number, stream, counter)``: nothing depends on how many numbers something else drew, so
the same seed under two maintenance policies sees the same randomness wherever the two
histories ask the same question, and policy differences are paired.  The streams are
split by what their counter counts:

* ``ENV``     - counter = plant tick (row 0 starts the walks; row k is tick k).  Drawn even
  while the machine is down (ambient walks, sensor noise), so the noise at plant time t
  is the same under every policy;
* ``PART``    - counter = the machine's part / batch index (product variant, set points,
  random failure, scrap), so the k-th part is the same part under every policy;
* ``UNIT``    - counter = the machine's fitted tool / restored pump index (tool life, wear
  rate, pump damage law), so the k-th tool is the same tool under every policy;
* ``INSPECT`` - counter = plant tick of a planned inspection (:func:`keyed_row`): two
  inspections of a machine at the same plant time report alike under every policy.

Rows are generated in fixed blocks of ``block`` rows, block ``b`` by a Philox generator
(a counter-based bit generator) with the stream's key and ``b`` in its counter, so a
row's value depends only on its index (and the block size, a constant of each stream):
one numpy call per block, plain Python floats after, and random access.  A stream's
state is its key and row index; the drawn block is a cache that is neither pickled nor
copied.  Within one numpy version the numbers are identical on every machine.
"""

from __future__ import annotations

import numpy as np

ENV, PART, UNIT, INSPECT = 0, 1, 2, 3
KIND_CODES = {"milling": 0, "pump": 1}


def stream_key(seed: int, kind: str, number: int, stream: int) -> tuple[int, int]:
    """The 128-bit Philox key of one stream (two uint64 words from a SeedSequence)."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(KIND_CODES[kind], number, stream))
    k = ss.generate_state(2, np.uint64)
    return int(k[0]), int(k[1])


def _generator(key: tuple[int, int], counter: int) -> np.random.Generator:
    # The counter's third word holds the block / row key: each gets 2^128 numbers of its own.
    return np.random.Generator(np.random.Philox(key=np.array(key, dtype=np.uint64),
                                                counter=np.array([0, 0, counter, 0], dtype=np.uint64)))


def keyed_row(key: tuple[int, int], counter: int, uniforms: int) -> list[float]:
    """``uniforms`` U(0,1) numbers that depend only on ``(key, counter)`` (rare, random-access draws)."""
    return _generator(key, counter).random(uniforms).tolist()


class Rows:
    """Rows of ``normals`` standard normals followed by ``uniforms`` U(0,1) numbers; row ``i`` is a
    pure function of the stream's key and ``i``.  :meth:`next` returns row ``index`` and advances."""

    __slots__ = ("key", "normals", "uniforms", "block", "index", "rows", "_block_no", "_start", "_end")

    def __init__(self, key: tuple[int, int], normals: int, uniforms: int, block: int):
        self.key = key
        self.normals = normals
        self.uniforms = uniforms
        self.block = block
        self.index = 0
        self._forget()

    def _forget(self) -> None:
        self.rows: list[list[float]] = []
        self._block_no = -1
        self._start = self._end = 0      # self.rows holds rows _start.._end-1

    def __getstate__(self):
        # The drawn block is recomputed from the key on demand: state is the key and the index.
        return {"key": self.key, "normals": self.normals, "uniforms": self.uniforms, "block": self.block,
                "index": self.index}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self._forget()

    def __deepcopy__(self, memo) -> "Rows":
        # Drawn blocks are never mutated, so a copy shares them.
        other = Rows.__new__(Rows)
        other.key, other.normals, other.uniforms, other.block = self.key, self.normals, self.uniforms, self.block
        other.index, other.rows, other._block_no = self.index, self.rows, self._block_no
        other._start, other._end = self._start, self._end
        return other

    def next(self) -> list[float]:
        i = self.index
        if i >= self._end:
            self._load(i // self.block)
        self.index = i + 1
        return self.rows[i - self._start]

    def row(self, i: int) -> list[float]:
        """Row ``i`` without moving the stream (random access)."""
        b, r = divmod(i, self.block)
        return self._draw(b)[r] if b != self._block_no else self.rows[r]

    def _load(self, b: int) -> None:
        self.rows = self._draw(b)
        self._block_no = b
        self._start = b * self.block
        self._end = self._start + self.block

    def _draw(self, b: int) -> list[list[float]]:
        gen = _generator(self.key, b)
        parts = []
        if self.normals:
            parts.append(gen.standard_normal((self.block, self.normals)))
        if self.uniforms:
            parts.append(gen.random((self.block, self.uniforms)))
        return np.concatenate(parts, axis=1).tolist() if len(parts) > 1 else parts[0].tolist()
