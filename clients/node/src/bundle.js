// A bundle folder is untrusted input (docs/spec.md section 1): plain names listed in the manifest, regular files
// inside the folder, each checked against its SHA-256 before use.
import { createHash } from 'node:crypto';
import { closeSync, lstatSync, openSync, readFileSync, readSync, realpathSync } from 'node:fs';
import path from 'node:path';

export const FORMAT = 'utr-bundle';
export const FORMAT_VERSION = 2;

export class BundleError extends Error {}

export class Bundle {
  constructor(folder) {
    this.path = path.resolve(folder);
    const manifestFile = path.join(this.path, 'manifest.json');
    let manifest;
    try {
      manifest = JSON.parse(readFileSync(manifestFile, 'utf8'));
    } catch (e) {
      throw new BundleError(`${manifestFile}: ${e.code === 'ENOENT' ? 'not found: not a bundle' : `unreadable (${e.message})`}`);
    }
    if (manifest?.format !== FORMAT) throw new BundleError(`${manifestFile}: not a ${FORMAT} manifest`);
    if (manifest.format_version !== FORMAT_VERSION) {
      throw new BundleError(`${manifestFile}: bundle format version ${manifest.format_version}, this client reads version ${FORMAT_VERSION}`);
    }
    checkManifest(manifest, manifestFile);
    this.manifest = manifest;
    this.checked = new Set();
  }

  get k() { return this.manifest.model.k; }
  get maxTokens() { return this.manifest.max_tokens; }
  get hiddenSize() { return this.manifest.model.config.hidden_size; }
  get task() { return this.manifest.task ?? null; }
  get trained() { return this.manifest.model.trained !== false; }

  /** The path of a listed file, after its checks. */
  file(name) {
    const expected = this.manifest.files?.[name];
    if (typeof name !== 'string' || !/^[^/\\.][^/\\]*$/.test(name) || name.includes('..') || typeof expected !== 'string') {
      throw new BundleError(`${this.path}: ${JSON.stringify(name)} is not a file listed in the manifest`);
    }
    const file = path.join(this.path, name);
    let stat;
    try {
      stat = lstatSync(file);
    } catch {
      throw new BundleError(`${this.path}: ${name} is missing`);
    }
    if (!stat.isFile() || path.dirname(realpathSync(file)) !== realpathSync(this.path)) {
      throw new BundleError(`${this.path}: ${name} is not a regular file inside the bundle`);
    }
    if (!this.checked.has(name)) {
      if (sha256(file) !== expected) throw new BundleError(`${this.path}: ${name} does not match its checksum (changed or damaged)`);
      this.checked.add(name);
    }
    return file;
  }

  json(name) { return JSON.parse(readFileSync(this.file(name), 'utf8')); }

  /** The ONNX file of a precision: int8 runs the CPU variant (u8s8) on ONNX Runtime's CPU. */
  modelFile(precision) {
    const entry = this.manifest.models?.[precision];
    if (!entry) {
      const why = this.manifest.left_out?.[precision] ? ' (left out at build: below its accuracy gate)' : '';
      throw new BundleError(`${this.path}: no ${precision} model${why}; it has ${Object.keys(this.manifest.models ?? {}).join(', ')}`);
    }
    return this.file(entry.variants?.cpu?.file ?? entry.file);
  }
}

export const TASK_LEVELS = ['sequence', 'nucleotide', 'contact'];
export const PROBLEM_TYPES = ['binary', 'multiclass', 'multilabel', 'regression'];
export const MAX_LABELS = 65536;
const RESERVED_LABELS = ['id', 'label'];
const NOT_PRINTABLE = /[\x00-\x1f\x7f-\x9f]/;

/** The manifest fields this client relies on have the types and ranges it relies on (as utr_runtime checks them):
 * a num_labels of 0 looped for ever, a huge hidden_size exhausted memory, model: null threw a TypeError. */
export function checkManifest(m, where) {
  const fail = (what) => { throw new BundleError(`${where}: malformed manifest: ${what}`); };
  const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);
  const isInt = (x, low, high) => Number.isInteger(x) && x >= low && x <= high;
  const filesByKey = (x) => isObject(x) && Object.values(x).every((v) => isObject(v) && typeof v.file === 'string');
  const named = (x) => Array.isArray(x) && x.every((e) => isObject(e) && typeof e.name === 'string');
  for (const key of ['model', 'max_tokens', 'tokenizer', 'inputs', 'outputs', 'models', 'files']) if (!(key in m)) fail(`missing '${key}'`);
  if (!isObject(m.model) || !isObject(m.model.config)) fail("'model' must be an object with a 'config' object");
  if (!isInt(m.model.k, 1, 8)) fail(`model k must be an integer from 1 to 8, not ${JSON.stringify(m.model.k)}`);
  if (!isInt(m.model.config.hidden_size, 1, 2 ** 31)) fail('model config hidden_size must be a positive integer');
  if (!isInt(m.max_tokens, 3, 65536)) fail(`max_tokens must be an integer from 3 to 65536, not ${JSON.stringify(m.max_tokens)}`);
  if (!isObject(m.files) || !Object.values(m.files).every((v) => typeof v === 'string')) fail("'files' must map file names to sha256 strings");
  if (!filesByKey(m.models) || !Object.values(m.models).every((v) => filesByKey(v.variants ?? {}))) {
    fail("'models' must map precisions to objects with a 'file' (and 'variants' devices to such objects)");
  }
  const leftOut = m.left_out ?? {};
  if (!isObject(leftOut) || !Object.values(leftOut).every(Array.isArray)) fail("'left_out' must map precisions to the failures that left them out");
  if (!named(m.inputs) || !named(m.outputs)) fail("'inputs' and 'outputs' must be lists of objects with a 'name'");
  const inputs = m.inputs.map((i) => i.name);
  if (inputs[0] !== 'input_ids' || inputs[1] !== 'attention_mask' || !m.outputs.some((o) => o.name === 'last_hidden_state')) {
    fail('the model must take input_ids and attention_mask and give last_hidden_state');
  }
  if (typeof m.tokenizer !== 'string') fail("'tokenizer' must be a file name");
  if (m.task !== undefined && m.task !== null) checkTask(m.task, fail, isObject, isInt);
}

function checkTask(task, fail, isObject, isInt) {
  if (!isObject(task) || !TASK_LEVELS.includes(task.level) || !PROBLEM_TYPES.includes(task.problem_type)) {
    fail(`'task' must give a level (${TASK_LEVELS.join(', ')}) and a problem_type (${PROBLEM_TYPES.join(', ')})`);
  }
  const least = task.problem_type === 'multiclass' ? 2 : 1;
  const n = task.num_labels;
  if (!isInt(n, least, MAX_LABELS)) fail(`task num_labels must be an integer from ${least} to ${MAX_LABELS}, not ${JSON.stringify(n)}`);
  const labels = task.labels;
  const names = Array.isArray(labels) ? [...labels, ...(task.negative_label != null ? [task.negative_label] : [])] : null;
  if (!names || labels.length !== n || !names.every((x) => typeof x === 'string' && x && !NOT_PRINTABLE.test(x))) {
    fail(`task labels must be ${n} printable names (num_labels)`);
  }
  if (new Set(labels).size < n || labels.some((x) => RESERVED_LABELS.includes(x))) {
    fail("task labels must be distinct and not 'id' or 'label' (each names a column of its own)");
  }
}

function sha256(file) {
  const hash = createHash('sha256');
  const block = Buffer.alloc(1 << 20);
  const fd = openSync(file, 'r');
  try {
    for (let n; (n = readSync(fd, block, 0, block.length, null)) > 0;) hash.update(block.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}
