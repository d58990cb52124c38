// Windows over long sequences and length-sorted batches: docs/spec.md section 4, integer arithmetic only.

const ceilDiv = (a, b) => Math.floor((a + b - 1) / b);

/** [start, end) of each window over n rows. */
export function windowBounds(n, window, overlap) {
  if (window < 1 || overlap < 0 || overlap >= window) throw new Error(`need window >= 1 and 0 <= overlap < window (got ${window}, ${overlap})`);
  if (n <= window) return [[0, n]];
  const count = ceilDiv(n - overlap, window - overlap);
  const length = ceilDiv(n + (count - 1) * overlap, count);
  return Array.from({ length: count }, (_, i) => {
    const start = Math.floor((i * (n - length)) / (count - 1)); // exact: the operands stay far below 2^53
    return [start, start + length];
  });
}

/** Windows with the rows each owns: {start, end, ownStart, ownEnd}; extent k - 1 for nucleotide rows. */
export function splitWindows(n, window, overlap, extent = 0) {
  const bounds = windowBounds(n, window, overlap);
  const cuts = [0, ...bounds.slice(1).map(([start], i) => Math.floor((start + bounds[i][1] + extent) / 2)), n + extent];
  return bounds.map(([start, end], i) => ({ start, end, ownStart: cuts[i], ownEnd: cuts[i + 1] }));
}

/** Index arrays of rows, longest first, each batch's rows x longest row within maxBatchTokens. */
export function planBatches(lengths, maxBatchTokens, maxBatchSize) {
  const order = lengths.map((_, i) => i).sort((a, b) => lengths[b] - lengths[a]); // stable
  const batches = [];
  for (let i = 0; i < order.length;) {
    const size = Math.max(1, Math.min(maxBatchSize, Math.floor(maxBatchTokens / Math.max(lengths[order[i]], 1))));
    batches.push(order.slice(i, i + size));
    i += size;
  }
  return batches;
}
