// Embeddings, fill-mask and task predictions over a bundle, with onnxruntime-node (docs/spec.md sections 4-8).
import ort from 'onnxruntime-node';

import { Bundle, BundleError } from './bundle.js';
import { CLS, EOS, KmerTokenizer, MASK, PAD, problem } from './tokenizer.js';
import { planBatches, splitWindows } from './windows.js';

export class InputError extends Error {
  constructor(message, index = null) {
    super(index === null ? message : `sequence ${index}: ${message}`);
    this.index = index;
  }
}

/** Open a bundle (format version and checksums checked) and an ONNX Runtime session for one precision. */
export async function load(folder, { precision = 'fp32', threads = 0 } = {}) {
  const bundle = folder instanceof Bundle ? folder : new Bundle(folder);
  const tokenizer = KmerTokenizer.fromSpec(bundle.json(bundle.manifest.tokenizer));
  if (tokenizer.k !== bundle.k) throw new Error(`${bundle.path}: tokenizer k=${tokenizer.k}, model k=${bundle.k}`);
  const session = await ort.InferenceSession.create(bundle.modelFile(precision), { intraOpNumThreads: threads });
  checkShapes(bundle, session);
  return new Model(bundle, tokenizer, session, precision);
}

/** The manifest's hidden size and task record against the model's own output shapes, before anything is allocated
 * from them: a wrong hidden_size gave silently wrong vectors. */
function checkShapes(bundle, session) {
  const shapes = Object.fromEntries(session.outputNames.map((name, i) => [name, session.outputMetadata?.[i]?.shape ?? []]));
  const hidden = shapes.last_hidden_state?.at(-1);
  if (hidden !== bundle.hiddenSize) {
    throw new BundleError(`${bundle.path}: the manifest says hidden_size ${bundle.hiddenSize}, the model gives ${hidden}`);
  }
  const task = bundle.task;
  if (!task) return;
  const logits = shapes.task_logits ?? [];
  const rank = { sequence: 2, nucleotide: 3, contact: 4 }[task.level];
  if (logits.length !== rank || logits.at(-1) !== task.num_labels) {
    const stated = `(${logits.map((d) => (typeof d === 'number' ? d : '?')).join(', ')})`;
    throw new BundleError(`${bundle.path}: the task record (${task.level} level, ${task.num_labels} labels) does not match the model's task_logits ${stated}`);
  }
}

export class Model {
  constructor(bundle, tokenizer, session, precision) {
    Object.assign(this, { bundle, tokenizer, session, precision });
    this.k = bundle.k;
    this.maxTokens = bundle.maxTokens;
    this.hiddenSize = bundle.hiddenSize;
    this.task = bundle.task;
  }

  /** Raw outputs (onnxruntime-node tensors) for rows of ids, padded here; positions: per row, the indices wanted in `logits`. */
  async forward(rows, positions = null) {
    const { ids, mask, length } = this.tokenizer.pad(rows);
    if (length > this.maxTokens) throw new InputError(`${length} tokens is more than this model's maximum of ${this.maxTokens}`);
    const feeds = {
      input_ids: new ort.Tensor('int64', ids, [rows.length, length]),
      attention_mask: new ort.Tensor('int64', mask, [rows.length, length]),
    };
    if (this.session.inputNames.includes('mask_positions')) {
      const count = positions ? positions[0].length : 0; // none: (B, 0), the LM head does no work
      feeds.mask_positions = new ort.Tensor('int64', BigInt64Array.from((positions ?? []).flat(), BigInt), [rows.length, count]);
    }
    return this.session.run(feeds);
  }

  /** One Float32Array(H) per sequence (pooling "mean" or "cls"), or per sequence an array of its n k-mer rows ("tokens"). */
  async embed(sequences, { pooling = 'mean', overlap = 64, truncation = false, strict = false, batchSize = 64, maxBatchTokens = 8192 } = {}) {
    if (!['mean', 'cls', 'tokens'].includes(pooling)) throw new InputError(`pooling must be mean, cls or tokens, got ${pooling}`);
    const rows = this.#rows(sequences, { strict });
    const window = this.maxTokens - 2;
    const windows = rows.flatMap((r, s) => (truncation ? splitWindows(Math.min(r.length, window), window, 0) : splitWindows(r.length, window, overlap))
      .map((w) => ({ ...w, sequence: s })));
    const H = this.hiddenSize;
    const sums = rows.map(() => new Float64Array(H));
    const counts = rows.map(() => 0);
    const pieces = rows.map(() => []);
    for await (const [w, out] of this.#windowOutputs(windows, rows, 'last_hidden_state', batchSize, maxBatchTokens)) {
      const owned = w.ownEnd - w.ownStart;
      const row = (r) => out.subarray(r * H, (r + 1) * H); // r: the window's model row (0 is <cls>)
      for (let r = 1 + w.ownStart - w.start; r < 1 + w.ownEnd - w.start; r++) {
        if (pooling === 'mean') row(r).forEach((v, h) => { sums[w.sequence][h] += v; });
        else if (pooling === 'tokens') pieces[w.sequence].push([w.start + r - 1, Float32Array.from(row(r))]);
      }
      if (pooling === 'cls') row(0).forEach((v, h) => { sums[w.sequence][h] += owned * v; });
      counts[w.sequence] += owned;
    }
    if (pooling === 'tokens') return pieces.map((p) => p.sort((a, b) => a[0] - b[0]).map(([, v]) => v));
    return sums.map((sum, s) => Float32Array.from(sum, (v) => v / counts[s]));
  }

  /** The task head's predictions: probabilities (values for regression) or, with logits: true, the raw outputs. */
  async predict(sequences, { logits = false, aggregate = 'mean', overlap = 64, strict = false, batchSize = 64, maxBatchTokens = 8192 } = {}) {
    const task = this.task;
    if (!task) throw new Error('this bundle has no task head');
    const window = this.maxTokens - 2;
    const maxKmers = task.level === 'contact' ? window : null;
    const rows = this.#rows(sequences, { strict, maxKmers });
    const extent = task.level === 'nucleotide' ? this.k - 1 : 0;
    const windows = rows.flatMap((r, s) => splitWindows(r.length, window, overlap, extent).map((w) => ({ ...w, sequence: s })));
    const finish = logits ? (x) => x : (x) => outputFunction(task.problem_type, x, task.num_labels);
    const pieces = rows.map(() => []);
    for await (const [w, out] of this.#windowOutputs(windows, rows, 'task_logits', batchSize, maxBatchTokens)) {
      const owned = task.level === 'nucleotide' ? out.subarray((w.ownStart - w.start) * task.num_labels, (w.ownEnd - w.start) * task.num_labels) : out;
      pieces[w.sequence].push({ start: w.ownStart, weight: w.ownEnd - w.ownStart, values: finish(Float32Array.from(owned)) });
    }
    return pieces.map((p) => combine(p.sort((a, b) => a.start - b.start), task, aggregate));
  }

  /** Top-k answers for each <mask>, in the format of the transformers fill-mask pipeline. */
  async fillMask(text, { topK = 5 } = {}) {
    const ids = this.tokenizer.encode(text);
    const masked = ids.flatMap((id, i) => (id === MASK ? [i] : []));
    if (!masked.length) throw new InputError('no <mask> token in the text');
    const out = (await this.forward([ids], [masked])).logits;
    const V = this.tokenizer.vocabSize;
    const answers = masked.map((position, m) => {
      const row = out.data.subarray(m * V, (m + 1) * V);
      const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
      const exps = Array.from(row, (x) => Math.exp(x - max));
      const total = exps.reduce((a, b) => a + b, 0);
      const order = exps.map((_, i) => i).sort((a, b) => exps[b] - exps[a]).slice(0, topK); // stable: ties by lower id
      return order.map((token) => {
        const filled = ids.map((id, i) => (i === position ? token : id));
        const shown = filled.filter((id) => id !== PAD); // section 7: <pad> removed from `sequence`
        return { score: exps[token] / total, token, token_str: this.tokenizer.vocabulary[token], sequence: this.tokenizer.decode(shown, masked.length === 1) };
      });
    });
    return masked.length === 1 ? answers[0] : answers;
  }

  /** P(A, C, G, U) at each 0-based nucleotide of `sequence`, each from one row with every k-mer covering it masked
   * (docs/spec.md section 9): zero-shot variant scores are ln P(alt) - ln P(ref). */
  async nucleotideProbabilities(sequence, positions, { batchSize = 64, maxBatchTokens = 8192 } = {}) {
    if (!this.session.outputNames.includes('logits')) throw new InputError("this bundle's model has no MLM head");
    const [ids] = this.#rows([sequence], {});
    const { k } = this;
    const n = ids.length;
    const W = this.maxTokens - 2;
    if (n !== sequence.length - k + 1) throw new InputError('the sequence holds special tokens or characters that upper-case to several letters');
    const rows = positions.map((p) => {
      if (!Number.isInteger(p) || p < 0 || p >= sequence.length) throw new InputError(`position ${p + 1} is outside the sequence (1..${sequence.length})`);
      const lo = Math.max(0, p - k + 1);
      const hi = Math.min(p, n - 1);
      const start = n <= W ? 0 : Math.min(Math.max(0, lo - Math.floor((W - (hi - lo + 1)) / 2)), n - W);
      const row = [CLS, ...ids.slice(start, start + W), EOS];
      const covering = Array.from({ length: hi - lo + 1 }, (_, m) => lo + m);
      for (const i of covering) row[1 + i - start] = MASK;
      return { row, masked: covering.map((i) => 1 + i - start), offsets: covering.map((i) => p - i) };
    });
    const { kmerIds, letterAt } = this.#letterTable();
    const V = this.tokenizer.vocabSize;
    const out = new Array(rows.length);
    for (const batch of planBatches(rows.map((r) => r.row.length), maxBatchTokens, batchSize)) {
      // one width per batch: each row's masked positions repeated cyclically to k, the first ones read
      const positionsOf = batch.map((j) => Array.from({ length: k }, (_, m) => rows[j].masked[m % rows[j].masked.length]));
      const { logits } = await this.forward(batch.map((j) => rows[j].row), positionsOf);
      batch.forEach((j, b) => {
        const letters = [0, 0, 0, 0];
        rows[j].offsets.forEach((offset, m) => {
          const row = logits.data.subarray((b * k + m) * V, (b * k + m + 1) * V);
          const z = kmerIds.map((id) => row[id]);
          const max = Math.max(...z);
          const q = z.map((x) => Math.exp(x - max));
          const total = q.reduce((a, c) => a + c, 0);
          q.forEach((x, t) => { letters[letterAt[offset][t]] += x / total / rows[j].offsets.length; });
        });
        out[j] = letters;
      });
    }
    return out;
  }

  // The ids of the 4^k k-mers of A, C, G, U, and per offset the letter (0..3) each holds there.
  #letterTable() {
    if (!this.letters) {
      const index = new Map(this.tokenizer.vocabulary.map((token, id) => [token, id]));
      const kmers = [''];
      for (let i = 0; i < this.k; i++) kmers.splice(0, kmers.length, ...kmers.flatMap((prefix) => [...'ACGU'].map((c) => prefix + c)));
      this.letters = { kmerIds: kmers.map((kmer) => index.get(kmer)),
        letterAt: Array.from({ length: this.k }, (_, o) => kmers.map((kmer) => 'ACGU'.indexOf(kmer[o]))) };
    }
    return this.letters;
  }

  // Each sequence's rows (ids between <cls> and <eos>), after section 3's checks.
  #rows(sequences, options) {
    return sequences.map((seq, i) => {
      if (typeof seq !== 'string') throw new InputError(`expected a string, got ${typeof seq}`, i);
      const why = problem(this.tokenizer, seq, options);
      if (why) throw new InputError(why, i);
      return this.tokenizer.encode(seq).slice(1, -1);
    });
  }

  // [window, its unpadded output rows as one Float32Array] for every window, run in length-sorted batches.
  async *#windowOutputs(windows, rows, name, batchSize, maxBatchTokens) {
    for (const batch of planBatches(windows.map((w) => w.end - w.start + 2), maxBatchTokens, batchSize)) {
      const chosen = batch.map((j) => windows[j]);
      const out = (await this.forward(chosen.map((w) => [CLS, ...rows[w.sequence].slice(w.start, w.end), EOS])))[name];
      for (const [j, w] of chosen.entries()) yield [w, this.#unpadded(name, out, j, w.end - w.start)];
    }
  }

  // Window j's rows of an output, without padding: last_hidden_state (<cls>, its n rows, <eos>), or task_logits
  // (the sequence's row, its n + k - 1 nucleotides, or its n x n k-mer pairs).
  #unpadded(name, out, j, n) {
    const perRow = out.data.length / out.dims[0];
    const data = out.data.subarray(j * perRow, (j + 1) * perRow);
    const level = name === 'task_logits' ? this.task.level : null;
    const width = out.dims[out.dims.length - 1];
    if (level === 'sequence') return data;
    if (level === 'contact') {
      const [, , side] = out.dims;
      const block = new Float32Array(n * n * width);
      for (let a = 0; a < n; a++) block.set(data.subarray(a * side * width, (a * side + n) * width), a * n * width);
      return block;
    }
    return data.subarray(0, (level === 'nucleotide' ? n + this.k - 1 : n + 2) * width);
  }
}

function outputFunction(problemType, x, labels) {
  if (problemType === 'binary' || problemType === 'multilabel') return x.map((v) => 1 / (1 + Math.exp(-v)));
  if (problemType !== 'multiclass') return x;
  const out = new Float32Array(x.length);
  for (let r = 0; r < x.length; r += labels) {
    const row = x.subarray(r, r + labels);
    const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
    const exps = Array.from(row, (v) => Math.exp(v - max));
    const total = exps.reduce((a, b) => a + b, 0);
    exps.forEach((e, i) => { out[r + i] = e / total; });
  }
  return out;
}

// A sequence's windows -> its prediction: sequence level aggregated, nucleotide level concatenated, contact as is.
function combine(pieces, task, aggregate) {
  if (task.level === 'contact') return pieces[0].values;
  if (task.level === 'nucleotide') {
    const out = new Float32Array(pieces.reduce((n, p) => n + p.values.length, 0));
    pieces.reduce((at, p) => { out.set(p.values, at); return at + p.values.length; }, 0);
    return out;
  }
  if (aggregate === null) return pieces.map((p) => p.values);
  const out = new Float64Array(task.num_labels).fill(aggregate === 'max' ? -Infinity : 0);
  const total = pieces.reduce((n, p) => n + p.weight, 0);
  for (const p of pieces) {
    p.values.forEach((v, i) => { out[i] = aggregate === 'max' ? Math.max(out[i], v) : out[i] + (p.weight * v) / total; });
  }
  return Float32Array.from(out);
}
