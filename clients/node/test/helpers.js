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
