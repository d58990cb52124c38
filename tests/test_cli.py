"""The command line itself: every command's --help renders (a click release once broke it for custom types)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from utrexport.cli import main


@pytest.mark.parametrize("command", [[]] + [[name] for name in sorted(main.commands)])
def test_every_help_renders(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "Usage: " in result.output and "--help" in result.output


def test_progress_counts_sequences_as_they_finish(tiny_bundle):
    """The runtime reports rows and completed sequences per batch (the CLI's count no longer waits for a chunk)."""
    import utr_runtime
    from conftest import real_sequences

    model = utr_runtime.load(tiny_bundle(3, "pretraining"))
    seqs = [s for _, s in real_sequences()][:20]
    calls = []
    model.embed(seqs, max_batch_tokens=2048, progress=lambda rows, done: calls.append((rows, done)))
    assert len(calls) > 2 and calls[0][1] > 0
    assert sum(done for _, done in calls) == len(seqs) and sum(rows for rows, _ in calls) == sum(len(s) - 2 for s in seqs)


def test_runs_say_what_they_chose_and_long_ones_name_a_faster_passing_precision(all_precisions, tmp_path, monkeypatch):
    from conftest import real_sequences
    from utrexport import runs

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{name}\n{seq}\n" for name, seq in real_sequences()[:6]))
    result = CliRunner().invoke(main, ["embed", str(all_precisions), str(fasta), "-o", str(tmp_path / "a.npy"), "--engine", "onnxruntime", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "running fp32 on onnxruntime (cpu, 1 thread)" in result.stderr and "--precision int8" not in result.stderr
    monkeypatch.setattr(runs, "LONG_RUN", 0.0)  # every run counts as long
    result = CliRunner().invoke(main, ["embed", str(all_precisions), str(fasta), "-o", str(tmp_path / "b.npy"), "--chunk", "2"])
    assert result.exit_code == 0, result.output
    assert "running fp32 on" in result.stderr and "int8 passed its parity check (embeddings: minimum cosine 0.99" in result.stderr
    assert result.stderr.count("--precision int8") == 1  # said once
    result = CliRunner().invoke(main, ["embed", str(all_precisions), str(fasta), "-o", str(tmp_path / "c.npy"), "--precision", "int8"])
    assert result.exit_code == 0 and "parity check" not in result.stderr
    result = CliRunner().invoke(main, ["verify", str(all_precisions), "--engine", "onnxruntime"])
    assert "checking fp32, fp16, int8 on onnxruntime" in result.stderr
