"""embed and predict on a local Ray (--ray): the same answers as one process, with 1 and 2 workers, through a
killed worker. Each run is a fresh CLI process that starts its own local Ray (a few seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import real_sequences

pytest.importorskip("ray", reason="Ray (the [ray] extra) is not installed")
import psutil  # noqa: E402

ATOL = 1e-5  # one process vs the cluster: the same code on differently padded batches, float rounding only
CLI = [sys.executable, "-m", "utrexport.cli"]


def write_fasta(path, records) -> str:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return str(path)


def real_utrs(copies: int = 1) -> list[tuple[str, str]]:
    """The shipped human 3'UTRs: 36 nt to 10.9 kb, so long ones are cut into many windows."""
    return [(f"{name}_{c}", seq) for c in range(copies) for name, seq in real_sequences()]


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_embed_equals_one_process(tiny_bundle, tmp_path, workers):
    bundle = tiny_bundle(3, "pretraining")
    records = real_utrs()
    fasta = write_fasta(tmp_path / "utrs.fa", records[::4] + sorted(records, key=lambda r: -len(r[1]))[:5])
    run("embed", bundle, fasta, "-o", tmp_path / "local.npz")
    run("embed", bundle, fasta, "-o", tmp_path / "ray.npz", "--ray", "--workers", workers, "--threads", 1, "--chunk", 16)
    local, ray = np.load(tmp_path / "local.npz"), np.load(tmp_path / "ray.npz")
    assert ray["ids"].tolist() == local["ids"].tolist()  # input order, every record once
    np.testing.assert_allclose(ray["vectors"], local["vectors"], rtol=0, atol=ATOL)


def test_ray_predict_nucleotide_level_equals_one_process(task_bundle, tmp_path):
    bundle = task_bundle(3, "nucleotide", "multiclass")
    fasta = write_fasta(tmp_path / "utrs.fa", sorted(real_utrs(), key=lambda r: len(r[1]))[::20])
    run("predict", bundle, fasta, "-o", tmp_path / "local.npz")
    run("predict", bundle, fasta, "-o", tmp_path / "ray.npz", "--ray", "--threads", 1, "--chunk", 4)
    local, ray = np.load(tmp_path / "local.npz"), np.load(tmp_path / "ray.npz")
    assert ray["ids"].tolist() == local["ids"].tolist() and ray["lengths"].tolist() == local["lengths"].tolist()
    np.testing.assert_allclose(ray["values"], local["values"], rtol=0, atol=ATOL)


def test_ray_reads_the_regions_of_a_genome(tiny_bundle, tmp_path):
    """--genome with --bed on the cluster: the regions' sequences and coordinates as in one process."""
    from utr_calibration import DATA

    regions = ["--genome", DATA / "toy_genome.fa", "--bed", DATA / "toy_genome.bed"]
    run("embed", tiny_bundle(3, "pretraining"), *regions, "-o", tmp_path / "local.npz")
    run("embed", tiny_bundle(3, "pretraining"), *regions, "-o", tmp_path / "ray.npz", "--ray", "--threads", 1, "--chunk", 2)
    local, ray = np.load(tmp_path / "local.npz"), np.load(tmp_path / "ray.npz")
    for key in ("ids", "chrom", "start", "end", "strand"):
        assert ray[key].tolist() == local[key].tolist(), key
    np.testing.assert_allclose(ray["vectors"], local["vectors"], rtol=0, atol=ATOL)

def test_a_killed_worker_costs_a_retry_not_the_run(tiny_bundle, tmp_path):
    bundle = tiny_bundle(3, "pretraining")
    fasta = write_fasta(tmp_path / "utrs.fa", real_utrs(copies=4))
    run("embed", bundle, fasta, "-o", tmp_path / "local.npz")
    out = tmp_path / "ray.npz"
    driver = subprocess.Popen([*CLI, "embed", bundle, fasta, "-o", out, "--ray", "--workers", "2", "--threads", "1", "--chunk", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, busy, running_after = None, 0.0, False
    deadline = time.monotonic() + 120
    while victim is None and driver.poll() is None and time.monotonic() < deadline:
        workers = [p for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])]
        if len(workers) == 2:
            busy = workers[0].cpu_percent(interval=1.0)  # its model is loaded and running a chunk
            if busy > 10:
                victim = workers[0]
                victim.kill()
                running_after = driver.poll() is None
        time.sleep(0.2)
    stdout, stderr = driver.communicate(timeout=300)
    assert victim is not None, "no busy Ray worker was found to kill before the run ended"
    assert running_after, "the run had ended when the worker was killed"
    assert driver.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    local, ray = np.load(tmp_path / "local.npz"), np.load(out)
    assert ray["ids"].tolist() == local["ids"].tolist()  # none lost, none twice
    np.testing.assert_allclose(ray["vectors"], local["vectors"], rtol=0, atol=ATOL)


def test_ray_refuses_stdin_clearly(tiny_bundle, tmp_path):
    done = subprocess.run([*CLI, "embed", tiny_bundle(3, "pretraining"), "-", "-o", tmp_path / "x.npy", "--ray"], input="ACGUACGU\n",
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--ray reads a regular file" in done.stderr and not os.path.exists(tmp_path / "x.npy")


def test_an_address_no_cluster_answers_is_one_line_within_seconds(tiny_bundle, tmp_path):
    """Ray itself retries an unreachable address for ever (still retrying at 300 s)."""
    fasta = write_fasta(tmp_path / "in.fa", real_utrs()[:2])
    start = time.monotonic()
    done = subprocess.run([*CLI, "embed", tiny_bundle(3, "pretraining"), fasta, "-o", tmp_path / "x.npz", "--ray", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and time.monotonic() - start < 60
    assert "--ray 127.0.0.1:1: no Ray cluster answers there (connection refused)" in done.stderr, done.stderr


def test_ray_client_without_grpc_is_named(monkeypatch):
    import importlib.util

    from utr_runtime.errors import UtrError
    from utrexport import distributed

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else find_spec(name, *a))
    with pytest.raises(UtrError, match=r"needs grpcio: pip install 'ray\[client\]'"):
        distributed._check_reachable("ray://127.0.0.1:10001")
    with pytest.raises(UtrError, match="give HOST:PORT"):
        distributed._check_reachable("nowhere")


def test_a_node_removed_mid_run_costs_nothing(tiny_bundle, tmp_path):
    """A simulated cluster on this machine (ray.cluster_utils.Cluster: a head and two worker nodes, one CPU each, each
    node its own raylet and object store); one worker node is removed while the run is going. Ray restarts its actors
    on the nodes left and rebuilds lost blocks from lineage: the run completes with every record once, in order, and
    the answers of one process."""
    from ray.cluster_utils import Cluster

    bundle = tiny_bundle(3, "pretraining")
    fasta = write_fasta(tmp_path / "utrs.fa", real_utrs(copies=4))
    run("embed", bundle, fasta, "-o", tmp_path / "local.npz")
    # A removed node is declared dead after 2 missed 1-second health checks (Ray's default waits about 30 s).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": {"health_check_period_ms": 1000,
                                                                                              "health_check_failure_threshold": 2}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        out = tmp_path / "ray.npz"
        driver = subprocess.Popen([*CLI, "embed", bundle, fasta, "-o", out, "--ray", cluster.address, "--workers", "3", "--chunk", "8"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while "running" not in (line := driver.stderr.readline()):
            assert line, driver.stderr.read()
        time.sleep(5)  # the actors are loaded and running chunks
        assert driver.poll() is None, "the run had ended before the node was removed"
        cluster.remove_node(nodes[0])
        _, stderr = driver.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert driver.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    local, ray = np.load(tmp_path / "local.npz"), np.load(out)
    assert ray["ids"].tolist() == local["ids"].tolist()  # none lost, none twice
    np.testing.assert_allclose(ray["vectors"], local["vectors"], rtol=0, atol=ATOL)


def test_ray_variants_equal_one_process(tiny_bundle, tmp_path):
    """A saturation of several sequences (one split over groups) and a VCF over the toy genome: the same tables."""
    from utr_calibration import DATA

    import utrexport.scoring

    bundle = tiny_bundle(3, "pretraining")  # masked-LM: cosine and zero-shot scores both
    short = sorted(real_utrs(), key=lambda r: len(r[1]))
    fasta = write_fasta(tmp_path / "utrs.fa", short[10:14] + [short[200]])  # the last one: more than one group of edits
    assert 3 * len(short[200][1]) > utrexport.scoring.CHUNK
    run("variants", bundle, fasta, "--saturate", "-o", tmp_path / "local.tsv")
    done = run("variants", bundle, fasta, "--saturate", "-o", tmp_path / "ray.tsv", "--ray", "--workers", 2, "--threads", 1)
    assert "in each Ray worker" in done.stderr
    genome = ["--vcf", DATA / "toy_genome.vcf", "--genome", DATA / "toy_genome.fa", "--bed", DATA / "toy_genome.bed"]
    run("variants", bundle, *genome, "-o", tmp_path / "local_vcf.tsv")
    run("variants", bundle, *genome, "-o", tmp_path / "ray_vcf.tsv", "--ray", "--threads", 1)
    for name in ("", "_vcf"):
        local, ray = (np.genfromtxt(tmp_path / f"{kind}{name}.tsv", delimiter="\t", names=True, dtype=None, encoding="utf-8")
                      for kind in ("local", "ray"))
        assert local.dtype.names == ray.dtype.names and "llr" in local.dtype.names and len(local) == len(ray) > 0
        for column in local.dtype.names:
            if local[column].dtype.kind == "f":
                np.testing.assert_allclose(ray[column], local[column], rtol=0, atol=ATOL, err_msg=column)
            else:
                assert ray[column].tolist() == local[column].tolist(), column
