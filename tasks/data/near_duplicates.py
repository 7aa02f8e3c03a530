"""Near duplicates: resized, re-encoded or brightened copies, between train and test and within a split.

Two stages. Candidates are pairs whose 64-bit perceptual hashes (manifest column ``phash``) differ
in at most ``bits`` bits, found by multi-index hashing (four 16-bit bucket keys), or by a blocked
XOR-popcount scan of every pair when that is cheaper (a large ``bits``). A candidate is
confirmed when the two images, area-averaged to 8x8 px in every channel, correlate at least
``min_correlation``. The hash finds the few pairs worth comparing; the thumbnails tell a copy from
a look-alike: on the synthetic set a hash match alone flags a quarter of the distinct test images
(same shape in a similar place), the thumbnails flag 0.1% (benchmarks/RESULTS.md).
Exact copies (same content hash) are left to the exact-duplicate and leak checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.data.phash import from_hex
from tasks.data.reports import NearDuplicatePair, NearDuplicates

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 8  # px; coarse enough to ignore JPEG noise, fine enough to see pose and colour
BLOCK_ELEMENTS = 1 << 23  # hash pairs per XOR block of the full scan: 64 MB of uint64 temporaries
CHUNKS, CHUNK_BITS = 4, 16  # multi-index hashing: the 64-bit hash as four 16-bit bucket keys
QUERY_BLOCK = 2048  # query rows probed at a time (bounds the candidate arrays)
THUMBNAIL_BLOCK = 4096  # images converted to float32 at a time
PAIR_BLOCK = 1 << 16  # candidate pairs correlated at a time
PROBE_COST = 8  # a bucket probe costs about this many scanned pairs (measured: benchmarks/validation.py)
MAX_REPORTED_PAIRS = 100  # pairs listed in validation.json; all are counted


@dataclass(frozen=True)
class SplitRows:
    """The decoded images of one split: manifest rows, hashes, and the prepared pixel array."""

    rows: pd.DataFrame  # manifest rows (path, content_hash, index, ...), original index kept
    hashes: np.ndarray  # uint64
    images: np.ndarray  # (N, C, H, W) uint8, row ``index`` of each manifest row; may be memory-mapped


@dataclass(frozen=True)
class Twins:
    """For each row of a split, its closest confirmed near duplicate (a row of another or the same split)."""

    twin: np.ndarray  # int64 row of the partner split, -1 when none
    bits: np.ndarray  # Hamming distance of the hashes
    correlation: np.ndarray  # of the 8x8 thumbnails


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # query row, reference row, Hamming distance


def _empty() -> Pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)


def _scan(query: np.ndarray, reference: np.ndarray, bits: int, same: bool) -> Pairs:
    """Every pair within ``bits``, by XOR and popcount over all pairs, a block of query rows at a time."""
    found: list[Pairs] = []
    rows = max(1, BLOCK_ELEMENTS // max(len(reference), 1))
    for start in range(0, len(query), rows):
        block = query[start : start + rows]
        first = start + 1 if same else 0  # in one split each unordered pair once, never an image with itself
        distance = np.bitwise_count(block[:, None] ^ reference[None, first:])
        if same:  # row a of the block starts at column a - 1 of this slice: drop what lies before it
            width = min(len(block), distance.shape[1])
            distance[:, :width][np.arange(len(block))[:, None] > np.arange(width)[None, :]] = 255
        q, r = np.nonzero(distance <= bits)
        found.append((q + start, r + first, distance[q, r]))
    return _joined(found)


def _joined(found: list[Pairs]) -> Pairs:
    if not found:
        return _empty()
    q, r, d = zip(*found, strict=True)
    return np.concatenate(q), np.concatenate(r), np.concatenate(d)


def _probe_masks(radius: int) -> np.ndarray:
    """Every CHUNK_BITS-bit XOR mask with at most ``radius`` bits set."""
    masks = np.arange(1 << CHUNK_BITS, dtype=np.int64)
    return masks[np.bitwise_count(masks) <= radius]


def _chunk(hashes: np.ndarray, c: int) -> np.ndarray:
    return ((hashes >> np.uint64(CHUNK_BITS * c)) & np.uint64((1 << CHUNK_BITS) - 1)).astype(np.int64)


def _indexed(query: np.ndarray, reference: np.ndarray, bits: int, same: bool) -> Pairs:
    """Every pair within ``bits`` by multi-index hashing: two hashes within ``bits`` agree to within
    ``bits // CHUNKS`` bits on at least one of the CHUNKS 16-bit chunks, so a query is compared only
    with the reference rows in the buckets near its chunks."""
    radius = bits // CHUNKS
    masks = _probe_masks(radius)
    found: list[Pairs] = []
    for c in range(CHUNKS):
        keys = _chunk(reference, c)
        order = np.argsort(keys, kind="stable")
        bucketed = reference[order]  # each bucket's hashes are one contiguous run
        sizes = np.bincount(keys, minlength=1 << CHUNK_BITS)
        starts = np.cumsum(sizes) - sizes
        query_keys = _chunk(query, c)
        for start in range(0, len(query), QUERY_BLOCK):
            probes = (query_keys[start : start + QUERY_BLOCK, None] ^ masks[None, :]).ravel()
            counts = sizes[probes]
            hit = np.flatnonzero(counts)
            if len(hit) == 0:
                continue
            counts, first = counts[hit], starts[probes[hit]]
            ends = np.cumsum(counts)
            # candidate k of a probe sits at bucketed[first + k]
            position = np.arange(ends[-1]) - np.repeat(ends - counts - first, counts)
            rows = np.repeat(start + hit // len(masks), counts)  # the query row of each candidate
            xor = query[rows] ^ bucketed[position]
            close = np.flatnonzero(np.bitwise_count(xor) <= bits)
            rows, partners, xor = rows[close], order[position[close]], xor[close]
            # a pair near in an earlier chunk was found there already: keep each pair once
            keep = partners > rows if same else np.ones(len(rows), bool)
            for earlier in range(c):
                keep &= np.bitwise_count(_chunk(xor, earlier)) > radius
            found.append((rows[keep], partners[keep], np.bitwise_count(xor[keep])))
    return _joined(found)


def candidate_pairs(query: np.ndarray, reference: np.ndarray, bits: int, same: bool = False) -> Pairs:
    """(query row, reference row, distance) of every pair within ``bits`` bits; ``same``: i < j only.

    Multi-index hashing when it compares fewer pairs than a full scan would, else the full scan."""
    probes = len(query) * len(_probe_masks(bits // CHUNKS)) * CHUNKS
    if probes * PROBE_COST >= len(query) * len(reference) / (2 if same else 1):
        return _scan(query, reference, bits, same)
    return _indexed(query, reference, bits, same)


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, C*8*8) float32 area-averaged thumbnails, centred and of unit norm: a dot product is a correlation."""
    side = images.shape[-1]
    edges = np.linspace(0.0, side, THUMBNAIL_SIDE + 1)
    pixel = np.arange(side)[None, :]
    weights = np.clip(np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel), 0.0, None)
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    small = np.empty((len(images), images.shape[1] * THUMBNAIL_SIDE**2), np.float32)
    for start in range(0, len(images), THUMBNAIL_BLOCK):
        block = np.asarray(images[start : start + THUMBNAIL_BLOCK], dtype=np.float32)
        small[start : start + len(block)] = (weights @ block @ weights.T).reshape(len(block), -1)
    small -= small.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(small, axis=1, keepdims=True)
    return np.divide(small, norm, out=np.zeros_like(small), where=norm > 0)  # a blank image correlates with nothing


def _gather(split: SplitRows, rows: np.ndarray) -> np.ndarray:
    """Thumbnails of ``rows`` (positions in ``split.rows``), reading only those images."""
    index = split.rows["index"].to_numpy()[rows]
    order = np.argsort(index)  # ascending reads of a memory-mapped array
    out = np.empty((len(rows), split.images.shape[1] * THUMBNAIL_SIDE**2), np.float32)
    for start in range(0, len(order), THUMBNAIL_BLOCK):
        part = order[start : start + THUMBNAIL_BLOCK]
        out[part] = thumbnails(split.images[index[part]])
    return out


def _confirmed(
    query: SplitRows, reference: SplitRows, bits: int, min_correlation: float, same: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Confirmed pairs (query row, reference row, bits, correlation), exact copies left out."""
    q, r, d = candidate_pairs(query.hashes, reference.hashes, bits, same)
    content = pd.factorize(pd.concat([query.rows["content_hash"], reference.rows["content_hash"]]))[0]
    keep = content[: len(query.rows)][q] != content[len(query.rows) :][r]
    q, r, d = q[keep], r[keep], d[keep]
    if len(q) == 0:
        return q, r, d, np.empty(0, np.float32)
    uq, q_at = np.unique(q, return_inverse=True)
    ur, r_at = np.unique(r, return_inverse=True)
    query_thumbs, reference_thumbs = _gather(query, uq), _gather(reference, ur)
    correlation = np.empty(len(q), np.float32)
    for start in range(0, len(q), PAIR_BLOCK):  # pairs at a time: the gathered thumbnails stay small
        part = slice(start, start + PAIR_BLOCK)
        correlation[part] = np.einsum("nk,nk->n", query_thumbs[q_at[part]], reference_thumbs[r_at[part]])
    keep = correlation >= min_correlation
    return q[keep], r[keep], d[keep], correlation[keep]


def _closest(n: int, q: np.ndarray, r: np.ndarray, d: np.ndarray, c: np.ndarray) -> Twins:
    """Per query row, the confirmed partner with the highest correlation."""
    twin = np.full(n, -1, np.int64)
    bits = np.zeros(n, np.int64)
    correlation = np.zeros(n, np.float32)
    order = np.lexsort((c, q))  # by row, then by correlation: each row's best partner comes last
    best = order[np.append(q[order][1:] != q[order][:-1], True)] if len(order) else order
    twin[q[best]], bits[q[best]], correlation[q[best]] = r[best], d[best], c[best]
    return Twins(twin, bits, correlation)


def _described(partner: SplitRows, twins: Twins) -> list[str | None]:
    """Per row, ``<twin path> (<bits> bits, r=<correlation>)``, or None."""
    paths = partner.rows["path"].to_numpy()
    return [
        None if t < 0 else f"{paths[t]} ({b} bits, r={c:.3f})"
        for t, b, c in zip(twins.twin.tolist(), twins.bits.tolist(), twins.correlation.tolist(), strict=True)
    ]


def _pairs(kind: str, query: SplitRows, partner: SplitRows, twins: Twins) -> list[NearDuplicatePair]:
    paths, partner_paths = query.rows["path"].to_numpy(), partner.rows["path"].to_numpy()
    return [
        NearDuplicatePair(kind, str(paths[i]), str(partner_paths[twins.twin[i]]), int(twins.bits[i]),
                          round(float(twins.correlation[i]), 4))
        for i in np.flatnonzero(twins.twin >= 0)
    ]


@dataclass(frozen=True)
class NearDuplicateColumns:
    """The columns the contract's expectations run on, and the summary for validation.json."""

    within_split: pd.Series  # every manifest row: its near duplicate in its own split, described; None if none
    train_twin: pd.Series  # test rows: their near duplicate in train, described; None if none
    summary: NearDuplicates


def find(
    manifest: pd.DataFrame, images: dict[str, np.ndarray], bits: int, min_correlation: float
) -> NearDuplicateColumns:
    """Near duplicates within each split and from test into train (``images``: split -> prepared array)."""
    decoded = manifest[manifest["decoded"]]
    splits = {
        name: SplitRows(rows, from_hex(rows["phash"].to_numpy()), images[name])
        for name, rows in ((name, decoded[decoded["split"] == name]) for name in images)
    }
    within_split = pd.Series(None, index=manifest.index, dtype=object)
    pairs: list[NearDuplicatePair] = []
    counts: dict[str, int] = {}
    for name, split in splits.items():
        q, r, d, c = _confirmed(split, split, bits, min_correlation, same=True)
        # Each unordered pair was found once: give both images their partner.
        twins = _closest(len(split.rows), np.concatenate([q, r]), np.concatenate([r, q]),
                         np.concatenate([d, d]), np.concatenate([c, c]))
        within_split.loc[split.rows.index] = _described(split, twins)
        counts[name] = int((twins.twin >= 0).sum())
        pairs += _pairs("within_" + name, split, split, twins)
    test, train = splits["test"], splits["train"]
    q, r, d, c = _confirmed(test, train, bits, min_correlation, same=False)
    leak = _closest(len(test.rows), q, r, d, c)
    train_twin = pd.Series(_described(train, leak), index=test.rows.index, dtype=object)
    leaks = _pairs("leak", test, train, leak)
    summary = NearDuplicates(
        leaks=len(leaks),
        within_split=sum(counts.values()),
        pairs=(leaks + pairs)[:MAX_REPORTED_PAIRS],
    )
    log.info("near duplicates (hashes within %d bits, thumbnails r >= %.3f): %d test images leak into train; "
             "within splits %s", bits, min_correlation, summary.leaks, counts)
    return NearDuplicateColumns(within_split, train_twin, summary)
