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
