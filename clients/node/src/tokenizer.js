// The 3UTRBERT k-mer tokenizer, as docs/spec.md section 2 defines it. Positions count code points (Array.from),
// never UTF-16 units.

export const SPECIAL_TOKENS = ['<pad>', '<cls>', '<eos>', '<unk>', '<mask>', '<null>'];
export const ALPHABET = 'ACGUN';
export const [PAD, CLS, EOS, UNK, MASK] = [0, 1, 2, 3, 4];
const SPECIAL_SPLIT = new RegExp(`(${SPECIAL_TOKENS.join('|')})`);
const LETTER = new Map([...ALPHABET].map((c, i) => [c, i]));

export class KmerTokenizer {
  constructor(k) {
    if (!Number.isInteger(k) || k < 2 || k > 6) throw new Error(`k must be an integer from 2 to 6, got ${k}`);
    this.k = k;
    this.vocabulary = [...SPECIAL_TOKENS, ...kmers(k)];
  }

  static fromSpec(spec) {
    if (spec?.format !== 'utr-kmer-tokenizer' || spec.version !== 1) throw new Error('not a utr-kmer-tokenizer spec of version 1');
    const tokenizer = new KmerTokenizer(spec.k);
    const same = spec.alphabet === ALPHABET && spec.vocabulary.length === tokenizer.vocabulary.length
      && spec.vocabulary.every((t, i) => t === tokenizer.vocabulary[i]);
    if (!same) throw new Error(`tokenizer spec for k=${spec.k} differs from the 3UTRBERT k-mer vocabulary`);
    return tokenizer;
  }

  get vocabSize() { return this.vocabulary.length; }

  /** Token ids of one text: <cls>, k-mers and special tokens in text order, <eos>; cut to maxLength if given. */
  encode(text, maxLength = null) {
    const ids = [CLS];
    text.split(SPECIAL_SPLIT).forEach((part, i) => {
      if (i % 2) ids.push(SPECIAL_TOKENS.indexOf(part));
      else if (part) this.#kmerIds(part, ids);
    });
    ids.push(EOS);
    if (maxLength !== null) {
      const limit = Math.max(maxLength, 2);
      if (ids.length > limit) return [...ids.slice(0, limit - 1), EOS];
    }
    return ids;
  }

  #kmerIds(piece, out) {
    const codes = Array.from(piece.toUpperCase(), (c) => LETTER.get(c === 'T' ? 'U' : c) ?? -1);
    for (let i = 0; i + this.k <= codes.length; i++) {
      let id = 0;
      for (let j = 0; j < this.k && id >= 0; j++) id = codes[i + j] < 0 ? -1 : id * 5 + codes[i + j];
      out.push(id < 0 ? UNK : SPECIAL_TOKENS.length + id);
    }
  }

  /** Rows of ids right-padded with <pad> into flat (B x L) int64 input_ids and attention_mask (1 on every id of a
   * row, a written <pad> included; 0 on the padding added here). */
  pad(rows) {
    const length = Math.max(...rows.map((r) => r.length));
    const ids = new BigInt64Array(rows.length * length); // <pad> is 0
    const mask = new BigInt64Array(rows.length * length);
    rows.forEach((row, b) => row.forEach((id, j) => { ids[b * length + j] = BigInt(id); mask[b * length + j] = 1n; }));
    return { ids, mask, length };
  }

  decode(ids, skipSpecialTokens = false) {
    return ids.filter((i) => !(skipSpecialTokens && i < SPECIAL_TOKENS.length)).map((i) => this.vocabulary[i]).join(' ');
  }
}

function kmers(k) {
  let out = [''];
  for (let j = 0; j < k; j++) out = out.flatMap((prefix) => [...ALPHABET].map((c) => prefix + c));
  return out;
}

// Section 3 of the spec: why a sequence cannot be run, or null.
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f]/u;
const NUCLEOTIDE = /^[ACGTUNacgtun]$/u;

export function problem(tokenizer, sequence, { strict = false, maxKmers = null } = {}) {
  const points = Array.from(sequence);
  const control = points.findIndex((c) => CONTROL.test(c));
  if (control >= 0) return `control character at position ${control + 1}: not a sequence (a binary file?)`;
  const foreign = points.filter((c) => !NUCLEOTIDE.test(c)).length;
  if (points.length >= 20 && 2 * foreign > points.length) return 'most of its characters are not A, C, G, U, T or N: not a nucleotide sequence';
  if (strict) {
    const at = points.findIndex((c) => !NUCLEOTIDE.test(c));
    if (at >= 0) return `character ${JSON.stringify(points[at])} at position ${at + 1} is not A, C, G, U, T or N (strict mode)`;
  }
  const n = tokenizer.encode(sequence).length - 2;
  if (n < 1) return `no ${tokenizer.k}-mer: the sequence is empty or shorter than k=${tokenizer.k}`;
  if (maxKmers !== null && n > maxKmers) return `${n} ${tokenizer.k}-mers; a contact map covers one window, at most ${maxKmers}`;
  return null;
}

/** The position strict mode refuses a text at, or null. */
export function strictPosition(sequence) {
  const at = Array.from(sequence).findIndex((c) => !NUCLEOTIDE.test(c));
  return at < 0 ? null : at;
}
