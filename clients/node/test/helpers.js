// Shared by the tests: which bundles to test (set by the Python suite, tests/test_contract.py) and comparisons.
import assert from 'node:assert/strict';
import path from 'node:path';

/** Bundle folders from UTR_BUNDLES (path-list); the tests skip, saying so, without them. */
export const bundles = (process.env.UTR_BUNDLES ?? '').split(path.delimiter).filter(Boolean);
export const skip = bundles.length ? false : 'UTR_BUNDLES names no bundle: run through pytest tests/test_contract.py, or set it to bundle folders';

/** |a - b| <= atol everywhere, over nested arrays / typed arrays of equal shape. */
export function assertClose(actual, expected, atol, what) {
  const a = flat(actual);
  const b = flat(expected);
  assert.equal(a.length, b.length, `${what}: ${a.length} values, expected ${b.length}`);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  assert.ok(worst <= atol, `${what}: max abs difference ${worst} > ${atol}`);
  return worst;
}

export function flat(x) {
  if (typeof x === 'number') return [x];
  return Array.from(x).flatMap((v) => (typeof v === 'number' ? [v] : flat(v)));
}

/** Fill-mask answers agree: scores within rtol in order; tokens equal unless tied (within 2 rtol) or last. */
export function assertFillMaskAgrees(got, expected, rtol, what) {
  assert.equal(got.length, expected.length, `${what}: number of masks`);
  got.forEach((answer, m) => {
    const scores = expected[m].map((r) => r.score);
    answer.forEach((a, i) => {
      assert.ok(Math.abs(a.score - scores[i]) <= rtol * Math.abs(scores[i]), `${what}: mask ${m} score ${i}: ${a.score} vs ${scores[i]}`);
      const tied = scores.some((s, j) => j !== i && Math.abs(s - scores[i]) <= 2 * rtol * Math.abs(s));
      if (!tied && i < answer.length - 1) {
        assert.deepEqual([a.token, a.sequence], [expected[m][i].token, expected[m][i].sequence], `${what}: mask ${m} answer ${i}`);
      }
    });
  });
}

/** The comparator of `utrexport verify` (utr_runtime/parity.py) under one precision's tolerance from conformance.json:
 * `max_abs`, `mean_cosine` and `min_cosine` over the vectors (rows of the last axis, `width` values each); for raw task
 * outputs (`task` given) `prob_max_abs` on probabilities (relative to the largest reference value for regression)
 * and `agreement` on the decisive labels. */
export function assertWithin(actual, expected, tolerance, what, { width, task = null, decisiveMargin = 0.1 } = {}) {
  const a = flat(actual);
  const b = flat(expected);
  assert.equal(a.length, b.length, `${what}: ${a.length} values, expected ${b.length}`);
  assert.ok(a.every(Number.isFinite), `${what}: values that are not finite`);
  if (tolerance.max_abs !== undefined) assertClose(a, b, tolerance.max_abs, what);
  const rows = (x) => Array.from({ length: x.length / width }, (_, r) => x.slice(r * width, (r + 1) * width));
  if (tolerance.mean_cosine !== undefined || tolerance.min_cosine !== undefined) {
    const reference = rows(b);
    const cosines = rows(a).map((row, r) => cosine(row, reference[r]));
    const mean = cosines.reduce((s, c) => s + c, 0) / cosines.length;
    assert.ok(mean >= (tolerance.mean_cosine ?? -1), `${what}: mean cosine ${mean} < ${tolerance.mean_cosine}`);
    assert.ok(Math.min(...cosines) >= (tolerance.min_cosine ?? -1), `${what}: min cosine ${Math.min(...cosines)} < ${tolerance.min_cosine}`);
  }
  if (tolerance.prob_max_abs !== undefined) {
    const [pa, pb] = [rows(a), rows(b)].map((r) => r.map((row) => outputs(task.problem_type, row)));
    let error = 0;
    pa.forEach((row, r) => row.forEach((v, i) => { error = Math.max(error, Math.abs(v - pb[r][i])); }));
    if (task.problem_type === 'regression') error /= Math.max(...pb.flat().map(Math.abs), 1e-12);
    assert.ok(error <= tolerance.prob_max_abs, `${what}: probability max abs difference ${error} > ${tolerance.prob_max_abs}`);
    if (task.problem_type === 'regression') return;
    const decided = pb.map((row, r) => {
      const candidate = decisions(task.problem_type, pa[r]);
      return decisions(task.problem_type, row).map((d, i) => [d, candidate[i]]);
    });
    const decisive = decided.flat().filter(([d]) => d.margin > decisiveMargin);
    const agreement = decisive.length ? decisive.filter(([d, c]) => d.label === c.label).length / decisive.length : 1;
    assert.ok(agreement >= tolerance.agreement, `${what}: ${agreement} of the decisive labels kept, below ${tolerance.agreement}`);
  }
}

function cosine(x, y) {
  let [dot, nx, ny] = [0, 0, 0];
  x.forEach((v, i) => { dot += v * y[i]; nx += v * v; ny += y[i] * y[i]; });
  return nx * ny > 0 ? dot / Math.sqrt(nx * ny) : 1;
}

// A task head's outputs of one row (section 8) and its decisions with their margins (utr_runtime.parity.labels).
function outputs(problemType, row) {
  if (problemType === 'binary' || problemType === 'multilabel') return row.map((v) => 1 / (1 + Math.exp(-v)));
  if (problemType !== 'multiclass') return row;
  const max = Math.max(...row);
  const exps = row.map((v) => Math.exp(v - max));
  const total = exps.reduce((s, e) => s + e, 0);
  return exps.map((e) => e / total);
}

function decisions(problemType, probabilities) {
  if (problemType !== 'multiclass') return probabilities.map((p) => ({ label: p >= 0.5, margin: Math.abs(p - 0.5) }));
  const order = probabilities.map((_, i) => i).sort((i, j) => probabilities[j] - probabilities[i]);
  return [{ label: order[0], margin: probabilities[order[0]] - probabilities[order[1]] }];
}
