// The client against utr_runtime on real sequences: each UTR_PARITY file holds utr_runtime's answers for one bundle
// and precision (written by tests/test_contract.py). Ids exact; vectors within the file's atol.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { load } from '../src/index.js';
import { assertClose, assertFillMaskAgrees } from './helpers.js';

const records = (process.env.UTR_PARITY ?? '').split(path.delimiter).filter(Boolean);
const skip = records.length ? false : 'UTR_PARITY names no file: run through pytest tests/test_contract.py';

for (const file of records.length ? records : ['(none)']) {
  test(`parity with utr_runtime: ${file}`, { skip }, async () => {
    const r = JSON.parse(readFileSync(file, 'utf8'));
    const model = await load(r.bundle, { precision: r.precision });
    r.sequences.forEach((s, i) => assert.deepEqual(model.tokenizer.encode(s), r.ids[i], `ids of sequence ${i}`));
    const worst = [
      assertClose(await model.embed(r.sequences), r.mean, r.atol, 'mean'),
      assertClose(await model.embed(r.sequences, { pooling: 'cls' }), r.cls, r.atol, 'cls'),
      assertClose(await model.embed([...r.sequences.slice(0, 4), ...r.sequences.slice(-1)], { pooling: 'tokens' }), r.tokens, r.atol, 'tokens'),
    ];
    for (const c of r.fill_mask ?? []) assertFillMaskAgrees([await model.fillMask(c.text)], [c.answers], 1e-4, c.text);
    if (r.predict) worst.push(assertClose(await model.predict(r.predict.sequences), r.predict.values, r.atol, 'predict'));
    console.log(`${path.basename(r.bundle)} ${r.precision}: ${r.sequences.length} sequences, max abs difference ${Math.max(...worst).toExponential(2)}`);
  });
}
