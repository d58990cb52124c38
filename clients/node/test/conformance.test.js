// The client against each bundle's conformance.json (docs/spec.md): ids and windows exact, vectors within atol.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { Bundle, InputError, KmerTokenizer, load, problem, splitWindows, strictPosition } from '../src/index.js';
import { assertClose, assertFillMaskAgrees, bundles, skip } from './helpers.js';

for (const folder of bundles.length ? bundles : ['(none)']) {
  describe(`conformance of ${folder}`, { skip }, () => {
    const bundle = skip ? null : new Bundle(folder);
    const vectors = skip ? null : bundle.json(bundle.manifest.conformance);
    const tokenizer = skip ? null : new KmerTokenizer(bundle.k);

    test('tokenizer ids', () => {
      for (const c of vectors.tokenizer) assert.deepEqual(tokenizer.encode(c.text), c.input_ids, JSON.stringify(c.text));
      for (const c of vectors.truncation) assert.deepEqual(tokenizer.encode(c.text, c.max_length), c.input_ids, JSON.stringify(c.text));
    });

    test('strict mode and refused sequences', () => {
      for (const c of vectors.strict) assert.equal(strictPosition(c.text), c.refused_at, JSON.stringify(c.text));
      for (const c of vectors.validity) assert.equal(problem(tokenizer, c.text) !== null, c.refused, JSON.stringify(c.text));
    });

    test('window plans', () => {
      for (const c of vectors.windows) {
        const got = splitWindows(c.kmers, c.window, c.overlap, c.extent).map((w) => [w.start, w.end, w.ownStart, w.ownEnd]);
        assert.deepEqual(got, c.windows, `${c.kmers} k-mers, overlap ${c.overlap}, extent ${c.extent}`);
      }
    });

    test('model outputs', async () => {
      const m = vectors.model;
      const model = await load(bundle, { precision: m.precision });
      assertClose(await model.embed(m.sequences, { overlap: m.overlap }), m.mean, m.atol, 'mean');
      assertClose(await model.embed(m.sequences, { pooling: 'cls', overlap: m.overlap }), m.cls, m.atol, 'cls');
      assertClose(await model.embed(m.sequences, { truncation: true }), m.truncated_mean, m.atol, 'truncated mean');
      const tokens = await model.embed(m.sequences, { pooling: 'tokens', overlap: m.overlap });
      m.token_rows.forEach((c, s) => assertClose(c.rows.map((r) => tokens[s][r]), c.vectors, m.atol, `token rows of sequence ${s}`));
      for (const c of m.fill_mask?.cases ?? []) {
        const got = await model.fillMask(c.text, { topK: m.fill_mask.top_k });
        assertFillMaskAgrees(c.answers.length === 1 ? [got] : got, c.answers, m.fill_mask.score_rtol, c.text);
      }
      for (const text of m.fill_mask?.refused ?? []) await assert.rejects(model.fillMask(text), InputError, JSON.stringify(text.slice(0, 30)));
      const past = m.fill_mask?.top_k_past_vocabulary;
      if (past) assert.equal((await model.fillMask(past.text, { topK: past.top_k })).length, past.answers, 'top_k past the vocabulary');
      if (m.predict?.max_values) {
        assertClose(await model.predict(m.predict.sequences, { overlap: m.overlap, aggregate: 'max' }), m.predict.max_values, m.atol, 'predict, aggregate max');
      }
      if (m.predict) {
        const p = m.predict;
        const got = await model.predict(p.sequences, { overlap: m.overlap });
        const labels = model.task.num_labels;
        const chosen = p.level === 'nucleotide' ? got.map((g, s) => p.rows[s].map((r) => g.subarray(r * labels, (r + 1) * labels))) : got;
        assertClose(chosen, p.values, m.atol, `predict (${p.level})`);
      }
    });
  });
}
