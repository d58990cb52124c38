#!/usr/bin/env bash
# Every command of utrexport once, on tiny bundles, in the environment whose bin/ is $1: what `make check-newest` and
# `make check-minimum` run after installing the newest and the lowest versions the project declares. Exits non-zero,
# naming the command, on the first failure; each command's --help too.
set -euo pipefail
bin=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
u() { echo "+ utrexport $*" >&2; "$bin/utrexport" "$@"; }

for command in "" build verify engine embed predict variants fill-mask bench triton serve; do
  u $command --help > /dev/null
done
input="$root/calibration/data/utrbert_seq_to_extract.fasta"
u build --kmer 3 --random-init --layers 1 --precision fp32,int8 --calibration-size 4 -o mlm
u verify mlm
u embed mlm "$input" -o vectors.npz
u embed mlm "$input" -o vectors.parquet --precision int8 --pooling cls
u fill-mask mlm "GGUCAGCUGG<mask>CUGGUUAGACCAGAUC" --json > /dev/null
u build --kmer 3 --checkpoint "$root/tests/data/utrbert-3mer-dev-classifier" --precision fp32 -o classifier
u predict classifier "$input" -o predictions.tsv
printf '>chr1\nGGGGGTTTGGCAGTACATCAATGGGCGTGGATAGCGGTTTGACTCACGGGGATTTCCAAGTCTCCACCCCATTGACGTCAATGGGAGTTTGTTTTGGC\n' > genome.fa
printf 'chr1\t5\t60\tr1\t0\t+\t5\t60\t0\t2\t20,25,\t0,30,\nchr1\t10\t90\tr2\t0\t-\n' > regions.bed
printf '##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n1\t12\tv1\tA\tC\t.\t.\t.\n1\t70\tv2\tC\tG\t.\t.\t.\n' > variants.vcf
u embed mlm --genome genome.fa --bed regions.bed -o regions.parquet
u variants classifier --vcf variants.vcf --genome genome.fa --bed regions.bed -o variants.tsv
u variants mlm --vcf variants.vcf --genome genome.fa --bed regions.bed -o variants.vcf.gz  # zero-shot; contig 1 is chr1
"$bin/python" -c "import pysam; assert len(list(pysam.VariantFile('variants.vcf.gz').fetch('1', 60, 80))) == 1"
u variants classifier "$input" --saturate -o saturation.parquet
u bench mlm --shapes 1x16 --repeats 1 --e2e-sequences 0 --no-torch --no-tokenizer --no-memory > /dev/null
u triton mlm classifier -o repository > /dev/null
test -f repository/classifier_predict/config.pbtxt
"$bin/python" -c "import utrexport.serve, utrexport.front, uvicorn, starlette.routing, tritonclient.grpc.aio, psutil"  # serve's front (run in make test)
"$bin/python" -c "import utr_runtime, numpy; m = utr_runtime.load('mlm'); assert m.embed(['ACGUAGCUAG']).shape == (1, 768)"
echo "smoke test passed: every command ran" >&2
