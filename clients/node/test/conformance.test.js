// The client against each bundle's conformance.json (docs/spec.md): ids, windows and refusals exact; model outputs
// of every precision the bundle has, within that precision's tolerance (fp32: atol) from the vectors.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { Bundle, InputError, KmerTokenizer, load, problem, splitWindows, strictPosition } from '../src/index.js';
import { assertClose, assertFillMaskAgrees, assertWithin, bundles, skip } from './helpers.js';

for (const folder of bundles.length ? bundles : ['(none)']) {
  describe(`conformance of ${folder}`, { skip }, () => {
    const bundle = skip ? null : new Bundle(folder);
    const vectors = skip ? null : bundle.json(bundle.manifest.conformance);
    const tokenizer = skip ? null : new KmerTokenizer(bundle.k);
    const maxKmers = bundle?.task?.level === 'contact' ? bundle.maxTokens - 2 : null;

    test('tokenizer ids and padding', () => {
      for (const c of vectors.tokenizer) assert.deepEqual(tokenizer.encode(c.text), c.input_ids, JSON.stringify(c.text.slice(0, 40)));
      for (const c of vectors.truncation) assert.deepEqual(tokenizer.encode(c.text, c.max_length), c.input_ids, JSON.stringify(c.text));
      const { ids, mask } = tokenizer.pad(vectors.padding.texts.map((t) => tokenizer.encode(t)));
      assert.deepEqual([Array.from(ids, Number), Array.from(mask, Number)], [vectors.padding.input_ids.flat(), vectors.padding.attention_mask.flat()]);
    });

    test('strict mode and refused sequences', () => {
      for (const c of vectors.strict) assert.equal(strictPosition(c.text), c.refused_at, JSON.stringify(c.text));
      for (const c of vectors.validity) assert.equal(problem(tokenizer, c.text, { maxKmers }) !== null, c.refused, JSON.stringify(c.text.slice(0, 40)));
    });

    test('window plans', () => {
      for (const c of vectors.windows) {
        const got = splitWindows(c.kmers, c.window, c.overlap, c.extent).map((w) => [w.start, w.end, w.ownStart, w.ownEnd]);
        assert.deepEqual(got, c.windows, `${c.kmers} k-mers, overlap ${c.overlap}, extent ${c.extent}`);
      }
      for (const c of vectors.truncated_windows) {
        const got = splitWindows(Math.min(c.kmers, c.window), c.window, 0).map((w) => [w.start, w.end, w.ownStart, w.ownEnd]);
        assert.deepEqual(got, c.windows, `${c.kmers} k-mers, truncated`);
      }
    });

    for (const precision of skip ? [] : Object.keys(bundle.manifest.models)) {
      test(`model outputs, ${precision}`, async () => {
        const m = vectors.model;
        const tolerance = m.tolerances[precision];
        assert.ok(tolerance, `the vectors give no tolerance for ${precision}`);
        const model = await load(bundle, { precision });
        const H = model.hiddenSize;
        const within = (got, expected, what) => assertWithin(got, expected, tolerance.vectors, `${what} (${precision})`, { width: H });
        within(await model.embed(m.sequences, { overlap: m.overlap }), m.mean, 'mean');
        within(await model.embed(m.sequences, { pooling: 'cls', overlap: m.overlap }), m.cls, 'cls');
        within(await model.embed(m.sequences, { truncation: true }), m.truncated_mean, 'truncated mean');
        const tokens = await model.embed(m.sequences, { pooling: 'tokens', overlap: m.overlap });
        m.token_rows.forEach((c, s) => within(c.rows.map((r) => tokens[s][r]), c.vectors, `token rows of sequence ${s}`));
        const raw = m.forward; // the rows as given, padded, with an empty (B, 0) mask_positions
        const hidden = (await model.forward(raw.input_ids.map((row, b) => row.filter((_, j) => raw.attention_mask[b][j] === 1)))).last_hidden_state;
        const length = raw.input_ids[0].length;
        raw.rows.forEach((rows, b) => within(rows.map((r) => hidden.data.subarray((b * length + r) * H, (b * length + r + 1) * H)),
          raw.last_hidden_state[b], `forward row ${b}`));
        const atReference = precision === m.precision; // below fp32, near-tied fill-mask answers may swap
        for (const c of atReference ? m.fill_mask?.cases ?? [] : []) {
          const got = await model.fillMask(c.text, { topK: m.fill_mask.top_k });
          assertFillMaskAgrees(c.answers.length === 1 ? [got] : got, c.answers, m.fill_mask.score_rtol, c.text);
        }
        for (const text of m.fill_mask?.refused ?? []) await assert.rejects(model.fillMask(text), InputError, JSON.stringify(text.slice(0, 30)));
        const past = m.fill_mask?.top_k_past_vocabulary;
        if (past) assert.equal((await model.fillMask(past.text, { topK: past.top_k })).length, past.answers, 'top_k past the vocabulary');
        if (m.zero_shot && atReference) { // section 9: P(A, C, G, U) at fp32 within atol
          const z = m.zero_shot;
          const got = await model.nucleotideProbabilities(z.sequence, z.positions);
          got.forEach((p, i) => p.forEach((v, l) => assert.ok(Math.abs(v - z.probabilities[i][l]) <= m.atol,
            `zero-shot position ${z.positions[i]} letter ${'ACGU'[l]}: ${v} vs ${z.probabilities[i][l]}`)));
        }
        if (m.predict) await checkPredict(model, m, tolerance, atReference);
      });
    }
  });
}

// Raw task outputs (logits: true) at every precision; probabilities (and aggregate max) at fp32 within atol.
async function checkPredict(model, m, tolerance, atReference) {
  const p = m.predict;
  const labels = model.task.num_labels;
  const options = p.level === 'contact' ? {} : { overlap: m.overlap };
  const chosen = (got) => (p.level === 'nucleotide' ? got.map((g, s) => p.rows[s].map((r) => g.subarray(r * labels, (r + 1) * labels))) : got);
  const logits = chosen(await model.predict(p.sequences, { ...options, logits: true }));
  assertWithin(logits, p.logits, tolerance.task_logits, `predict logits (${p.level}, ${model.precision})`,
    { width: labels, task: model.task, decisiveMargin: m.decisive_margin });
  if (!atReference) return;
  assertClose(chosen(await model.predict(p.sequences, options)), p.values, m.atol, `predict (${p.level})`);
  if (p.max_values) assertClose(await model.predict(p.sequences, { ...options, aggregate: 'max' }), p.max_values, m.atol, 'predict, aggregate max');
}
