"""Hardening, round 3: outputs never lost or left behind, checks before any model loads, messages a person reads.

Each case failed before: a user's file replaced or written through a symlink, a hidden file left in the output's
folder, a check made after minutes of work, a message naming a temporary file, or an exit status that hid Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import real_sequences
from utrexport.cli import main

UTREXPORT = str(Path(sys.executable).parent / "utrexport")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def classifier(task_bundle):
    return task_bundle(3, "sequence", "binary")


@pytest.fixture
def fasta(tmp_path):
    (tmp_path / "s.fa").write_text("".join(f">{n}\n{s[:60]}\n" for n, s in real_sequences()[:2]))
    return tmp_path / "s.fa"


def test_plot_is_an_output_checked_before_the_run(classifier, fasta, tmp_path):
    important = tmp_path / "important.txt"
    important.write_text("keep me")
    (tmp_path / "fig.png").symlink_to(important)
    result = run("variants", classifier, fasta, "--saturate", "-o", tmp_path / "t.tsv", "--plot", tmp_path / "fig.png")
    assert result.exit_code == 1 and "fig.png exists; pass --force" in result.output and not (tmp_path / "t.tsv").exists()
    result = run("variants", classifier, fasta, "--saturate", "-o", tmp_path / "t.tsv", "--plot", tmp_path / "genome.fa")
    assert result.exit_code == 1 and "name a .png, .pdf, .svg file" in result.output and "Traceback" not in result.output
    result = run("variants", classifier, fasta, "--saturate", "-o", tmp_path / "t.tsv", "--plot", tmp_path / "fig.png", "--force")
    assert result.exit_code == 0, result.output
    assert important.read_text() == "keep me" and not (tmp_path / "fig.png").is_symlink()  # the link replaced, not written through
    assert (tmp_path / "fig.png").read_bytes().startswith(b"\x89PNG") and not hidden(tmp_path)


def test_the_skipped_report_is_an_output_like_the_others(classifier, tmp_path):
    (tmp_path / "s.fa").write_text(">a\nACGUACGUAGCU\n>b\nAC\n")
    (tmp_path / "o.tsv.skipped.tsv").write_text("someone's file\n")
    result = run("predict", classifier, tmp_path / "s.fa", "-o", tmp_path / "o.tsv", "--skip-invalid")
    assert result.exit_code == 1 and "o.tsv.skipped.tsv exists; pass --force" in result.output
    assert (tmp_path / "o.tsv.skipped.tsv").read_text() == "someone's file\n" and not (tmp_path / "o.tsv").exists()
    assert run("predict", classifier, tmp_path / "s.fa", "-o", tmp_path / "o.tsv", "--skip-invalid", "--force").exit_code == 0
    assert "no 3-mer" in (tmp_path / "o.tsv.skipped.tsv").read_text()
    (tmp_path / "s.fa").write_text(">a\nACGUACGUAGCU\n")  # a later run that skips nothing leaves no stale report
    assert run("predict", classifier, tmp_path / "s.fa", "-o", tmp_path / "o.tsv", "--skip-invalid", "--force").exit_code == 0
    assert not (tmp_path / "o.tsv.skipped.tsv").exists()


def test_inputs_and_output_formats_are_checked_before_the_model_loads(classifier, tmp_path, monkeypatch):
    from utrexport import runs

    monkeypatch.setattr(runs, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(runs.Runner, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    for args, words in [(("embed", classifier, tmp_path / "nope.fa", "-o", tmp_path / "x.npz"), "nope.fa: no such file"),
                        (("embed", classifier, classifier / "manifest.json", "-o", tmp_path / "x.csv"), "x.csv: output must end in .npy, .npz, .parquet"),
                        (("predict", classifier, tmp_path / "nope.fa", "-o", tmp_path / "x.tsv"), "nope.fa: no such file")]:
        result = run(*args)
        assert result.exit_code == 1 and words in result.output and "running" not in result.output, result.output


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB filesystem (tmpfs), where an output fills the disk: root only, as CI runs."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_a_full_disk_leaves_no_hidden_file(tiny_bundle, task_bundle, tmp_path, tiny_disk, suffix):
    """Closing fails again on what was buffered; the partial file used to stay."""
    from utrexport.writers import open_prediction_writer

    writer = open_prediction_writer(tiny_disk / f"p{suffix}", {"level": "sequence", "num_labels": 2, "labels": ["x", "y"],
                                                                "problem_type": "multiclass"})
    import numpy as np

    with pytest.raises(OSError), writer:
        for i in range(200):
            values = np.full((64, 2), 0.5, np.float32)
            writer.write([f"record-{i}-{j}-" + "x" * 900 for j in range(64)], (values, values))
    assert sorted(p.name for p in tiny_disk.iterdir()) == []


def test_genome_regions_leave_no_hidden_file_when_a_region_is_bad(classifier, tmp_path):
    (tmp_path / "g.fa").write_text(">chr1\n" + "ACGUUGCAAC" * 20 + "\n")
    (tmp_path / "r.bed").write_text("chr1\t10\t100\tgood\t0\t+\nchr9\t10\t100\tbad\t0\t+\n")
    result = run("predict", classifier, "--genome", tmp_path / "g.fa", "--bed", tmp_path / "r.bed", "-o", tmp_path / "p.tsv")
    assert result.exit_code == 1 and "r.bed line 2: region 'bad'" in result.output
    assert not [p for p in hidden(tmp_path) if ".regions-" in p]


def test_a_region_error_names_the_annotation_line_not_a_temporary_file(classifier, tmp_path):
    (tmp_path / "g.fa").write_text(">chr1\n" + "ACGUUGCAAC" * 20 + "\n")
    (tmp_path / "r.bed").write_text("chr1\t10\t100\tgood\t0\t+\nchr1\t120\t122\ttiny\t0\t+\n")  # 2 nt: no 3-mer
    result = run("predict", classifier, "--genome", tmp_path / "g.fa", "--bed", tmp_path / "r.bed", "-o", tmp_path / "p.tsv")
    assert result.exit_code == 1 and "r.bed line 2: region 'tiny': no 3-mer" in result.output and ".regions-" not in result.output, result.output


def test_triton_on_a_full_disk_names_the_file_it_writes(tiny_bundle, tiny_disk):
    from utrexport import triton

    with pytest.raises(triton.ServeError) as refused:
        triton.write_repository(tiny_bundle(3, "pretraining"), tiny_disk / "repo", triton.RepositoryOptions(capabilities=["embed"]))
    assert str(tiny_disk) in str(refused.value) and str(tiny_bundle(3, "pretraining")) not in str(refused.value)
    assert sorted(p.name for p in tiny_disk.iterdir()) == []


def test_bundle_folders_whose_names_meet_say_why(tiny_bundle, tmp_path):
    import shutil

    for name in ("é", "ü"):
        shutil.copytree(tiny_bundle(3, "pretraining"), tmp_path / name)
    result = run("triton", tmp_path / "é", tmp_path / "ü", "-o", tmp_path / "repo")
    assert result.exit_code == 1 and "'é', 'ü' would give models the same names" in result.output and "rename a folder" in result.output


def test_fill_mask_names_the_mask_token_when_written_otherwise(tiny_bundle):
    result = run("fill-mask", tiny_bundle(3, "pretraining"), "GGUCAGCUGG<MASK>CUGGUUAGACC")
    assert result.exit_code == 1 and "'<MASK>' is not it, the mask token is written <mask>" in result.output


def test_ctrl_c_exits_130_and_leaves_nothing(tiny_bundle, tmp_path):
    records = list(real_sequences())[:300]
    (tmp_path / "in.fa").write_text("".join(f">{n}\n{s}\n" for n, s in records))
    process = subprocess.Popen([UTREXPORT, "embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(tmp_path / "o.npz"),
                                "--chunk", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Aborted" not in stderr and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


def test_progress_counts_read_as_a_person_says_them():
    from utrexport.progress import amount, duration

    assert [amount(n) for n in (120, 9_999, 52_300, 12_345_678)] == ["120 nt", "9,999 nt", "52.3 knt", "12.35 Mnt"]
    assert [duration(s) for s in (12, 300, 7200)] == ["12 s", "5 min", "2.0 h"]
