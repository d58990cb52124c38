// A bundle is untrusted input: a manifest that is malformed, or that disagrees with its model, is refused at load
// with one BundleError line (a num_labels of 0 looped for ever, hidden_size 2^28 ran V8 out of memory, hidden_size
// 16 on a 768 model gave silently wrong vectors, model: null threw a TypeError).
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import { BundleError, load } from '../src/index.js';
import { bundles, skip } from './helpers.js';

const binary = (extra) => (m) => { m.task = { level: 'sequence', problem_type: 'binary', num_labels: 1, labels: ['bound'], ...extra }; };
const CASES = [
  ['model null', (m) => { m.model = null; }, "'model' must be an object with a 'config' object"],
  ['hidden_size 2^28', (m) => { m.model.config.hidden_size = 2 ** 28; }, `the manifest says hidden_size ${2 ** 28}, the model gives`],
  ['hidden_size 16', (m) => { m.model.config.hidden_size = 16; }, 'the manifest says hidden_size 16, the model gives'],
  ['hidden_size text', (m) => { m.model.config.hidden_size = '768'; }, 'hidden_size must be a positive integer'],
  ['num_labels 0', binary({ num_labels: 0, labels: [] }), 'num_labels must be an integer from 1 to 65536, not 0'],
  ['num_labels -1', binary({ num_labels: -1 }), 'num_labels must be an integer from 1 to 65536, not -1'],
  ['num_labels 1.5', binary({ num_labels: 1.5 }), 'num_labels must be an integer'],
  ['labels not distinct', binary({ num_labels: 2, problem_type: 'multilabel', labels: ['a', 'a'] }), 'must be distinct'],
  ['escape in a label', binary({ labels: ['\u001b[2J'] }), 'printable names'],
  ['level bogus', binary({ level: 'bogus' }), "'task' must give a level"],
  ['task against the model', binary({}), 'does not match the model'],
  ['max_tokens 0', (m) => { m.max_tokens = 0; }, 'max_tokens must be an integer from 3 to 65536'],
  ['left_out 5', (m) => { m.left_out = 5; }, "'left_out' must map precisions"],
  ['variants a list', (m) => { m.models.fp32.variants = ['cpu']; }, "'models' must map precisions"],
  ['inputs missing', (m) => { delete m.inputs; }, "missing 'inputs'"],
];

describe('hostile manifests', { skip }, () => {
  const base = skip ? null : bundles.find((b) => !JSON.parse(readFileSync(path.join(b, 'manifest.json'), 'utf8')).task) ?? bundles[0];
  const scratch = mkdtempSync(path.join(tmpdir(), 'utr-manifest-'));
  after(() => rmSync(scratch, { recursive: true, force: true }));

  for (const [name, change, message] of CASES) {
    test(name, async () => {
      const folder = path.join(scratch, name.replace(/\W+/g, '-'));
      cpSync(base, folder, { recursive: true });
      const file = path.join(folder, 'manifest.json');
      const manifest = JSON.parse(readFileSync(file, 'utf8'));
      if (name === 'task against the model' && manifest.task) return; // only a plain encoder has no task_logits to match
      change(manifest);
      writeFileSync(file, JSON.stringify(manifest));
      await assert.rejects(load(folder), (e) => e instanceof BundleError && e.message.includes(message) && !e.message.includes('\n'));
    });
  }
});
