// utr-runtime for Node.js: load a utrexport bundle and run it with onnxruntime-node (docs/spec.md).
export { Bundle, BundleError } from './bundle.js';
export { KmerTokenizer, problem, strictPosition } from './tokenizer.js';
export { planBatches, splitWindows, windowBounds } from './windows.js';
export { load, Model, InputError } from './model.js';
